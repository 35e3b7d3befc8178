#!/usr/bin/env bash
# KEDA built from its Go module, for `engine: keda` on the local cluster (tests/e2e/test_keda.py).
#
#   scripts/keda.sh          the operator (keda) and the metrics API server (keda-adapter) of
#                            github.com/kedacore/keda/v2 at KEDA_VERSION, built with `go build`
#                            from the module's own go.mod (its replace directives included) and
#                            cached outside the repository with the module's config/ (the
#                            kustomize manifests upstream releases are rendered from); prints
#                            the directory
#   scripts/keda.sh image    also the image (both binaries on the operator's runtime base:
#                            distroless, or its stand-in from scripts/base-images.sh); prints
#                            its name
#
# First run: ~1.5 GB of modules and 20-40 minutes of compiling on 2 cores; later runs: nothing.
# The admission webhooks (cmd/webhooks) are not built: they only validate ScaledObjects.
set -euo pipefail
cd "$(dirname "$0")/.."
KEDA_VERSION=${KEDA_VERSION:-2.21.0}
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
OUT="$CACHE_ROOT/keda/v$KEDA_VERSION"
IMAGE=clip-local/keda:v$KEDA_VERSION

built() { [ -x "$OUT/keda" ] && [ -x "$OUT/keda-adapter" ] && [ -d "$OUT/config" ]; }
if ! built; then
  # One build at a time (make test starts one in the background, scripts/prebuild.sh).
  mkdir -p "$OUT"
  exec 9>"$OUT/.lock"
  flock 9
fi
if ! built; then
  export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  echo "==> downloading github.com/kedacore/keda/v2@v$KEDA_VERSION (Go module proxy)" >&2
  (cd "$WORK" && go mod download -json "github.com/kedacore/keda/v2@v$KEDA_VERSION") > "$WORK/keda.json"
  dir=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Dir"])' "$WORK/keda.json")
  # The module cache is read-only; build in a copy so its go.mod is the main module.
  cp -r "$dir" "$WORK/src" && chmod -R u+w "$WORK/src"
  mkdir -p "$OUT"
  ldflags="-s -w -X=github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION"
  for pair in operator:keda adapter:keda-adapter; do
    cmd=${pair%%:*} bin=${pair#*:}
    echo "==> building $bin v$KEDA_VERSION from its Go module (first run only; the operator took 35 minutes on 2 cores shared with a cargo build, the adapter 8 more)" >&2
    (cd "$WORK/src" && go build -trimpath -ldflags "$ldflags" -o "$OUT/$bin.tmp" "./cmd/$cmd")
    mv "$OUT/$bin.tmp" "$OUT/$bin"
  done
  rm -rf "$OUT/config" && cp -r "$WORK/src/config" "$OUT/config"
fi

if [ "${1:-}" != image ]; then
  echo "$OUT"
  exit 0
fi
DOCKER=$(bash scripts/docker.sh)
if ! $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
  base=gcr.io/distroless/cc-debian12:nonroot
  while IFS='=' read -r k v; do
    [ "$k" = OPERATOR_RUNTIME_IMAGE ] && base=$v
  done < <(DOCKER=$DOCKER bash scripts/base-images.sh)
  echo "==> building $IMAGE on $base" >&2
  printf 'FROM %s\nCOPY keda keda-adapter /\nUSER 65532:65532\nENTRYPOINT ["/keda"]\n' "$base" |
    DOCKER_BUILDKIT=1 $DOCKER build -q --network host -t "$IMAGE" -f - "$OUT" >/dev/null
fi
echo "$IMAGE"
