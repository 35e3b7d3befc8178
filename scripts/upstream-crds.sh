#!/usr/bin/env bash
# Fetches the upstream Karpenter (NodePool, EC2NodeClass) and KEDA (ScaledObject,
# TriggerAuthentication) CRDs from those projects' Go modules, through the Go module proxy, into a
# cache outside the repository (keyed by version). Prints the directory.
set -euo pipefail
KARPENTER_VERSION=${KARPENTER_VERSION:-v1.15.1}
KEDA_VERSION=${KEDA_VERSION:-v2.21.0}
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
OUT="$CACHE_ROOT/upstream-crds/karpenter-$KARPENTER_VERSION-keda-$KEDA_VERSION"
if [ -f "$OUT/.complete" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT"
PROXY=$(go env GOPROXY | tr ',' '\n' | grep -m1 '^https://' || echo https://proxy.golang.org)
fetch() { # module version file...
  local module=$1 version=$2; shift 2
  local zip="$OUT/$(basename "$module").zip"
  curl -fsSL "$PROXY/$module/@v/$version.zip" -o "$zip"
  python3 - "$zip" "$module@$version" "$OUT" "$@" <<'PY'
import sys, zipfile, pathlib
zip_path, prefix, out, *files = sys.argv[1:]
with zipfile.ZipFile(zip_path) as z:
    for f in files:
        pathlib.Path(out, pathlib.Path(f).name).write_bytes(z.read(f"{prefix}/{f}"))
PY
  rm -f "$zip"
}
fetch github.com/aws/karpenter-provider-aws "$KARPENTER_VERSION" \
  pkg/apis/crds/karpenter.sh_nodepools.yaml pkg/apis/crds/karpenter.k8s.aws_ec2nodeclasses.yaml
fetch github.com/kedacore/keda/v2 "$KEDA_VERSION" \
  config/crd/bases/keda.sh_scaledobjects.yaml config/crd/bases/keda.sh_triggerauthentications.yaml
touch "$OUT/.complete"
echo "$OUT"
