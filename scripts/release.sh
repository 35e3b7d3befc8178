#!/usr/bin/env bash
# `make release REGISTRY=<host>[:port]/<path>`: pushes the operator and worker images and the Helm
# chart to an OCI registry, so `helm install oci://<host>/<path>/charts/clip-operator` works as is:
#
#   images  <registry>/clip-operator:<tag> and <registry>/clip-worker:<tag>, retagged from what
#           `make images` built (IMAGE_TAG, default the chart's appVersion);
#   chart   packaged from a copy of charts/clip-operator whose values.yaml names those
#           repositories and that tag, pushed with `helm push` to oci://<registry>/charts (its own
#           repository, <path>/charts/clip-operator: the operator image's repository has the
#           same tag, and one repository cannot hold both under one tag).
#
# RELEASE_IMAGES (default "operator worker"; "none": the chart only) picks the images; RELEASE_PLAIN_HTTP=1 (the default
# for localhost and 127.0.0.1) talks HTTP to the registry. Log in first (docker login, helm
# registry login) for a registry that needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REGISTRY:?set REGISTRY=<host>[:port]/<path>, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/clip}"
REGISTRY=${REGISTRY%/}
CHART=charts/clip-operator
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")
TAG=${IMAGE_TAG:-$APP_VERSION}
SOURCE_OPERATOR=${OPERATOR_IMAGE:-ghcr.io/clip-operator/clip-operator}
SOURCE_WORKER=${WORKER_IMAGE:-ghcr.io/clip-operator/clip-worker}
host=${REGISTRY%%/*}
plain=${RELEASE_PLAIN_HTTP:-}
if [ -z "$plain" ]; then
  case "$host" in localhost|localhost:*|127.0.0.1|127.0.0.1:*) plain=1 ;; *) plain=0 ;; esac
fi
DOCKER=$(bash scripts/docker.sh)
HELM=$(bash scripts/kube-tools.sh)/helm
for image in ${RELEASE_IMAGES:-operator worker}; do
  case "$image" in
    none) continue ;;
    operator) src=$SOURCE_OPERATOR ;;
    worker) src=$SOURCE_WORKER ;;
    *) echo "RELEASE_IMAGES: unknown image $image (operator, worker)" >&2; exit 2 ;;
  esac
  dst="$REGISTRY/clip-$image:$TAG"
  $DOCKER image inspect "$src:$TAG" >/dev/null 2>&1 || {
    echo "$src:$TAG is not built: run make images IMAGE_TAG=$TAG first" >&2; exit 1; }
  echo "==> pushing $dst" >&2
  $DOCKER tag "$src:$TAG" "$dst"
  $DOCKER push -q "$dst" >&2
  $DOCKER rmi "$dst" >/dev/null
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$CHART" "$WORK/clip-operator"
python3 - "$WORK/clip-operator/values.yaml" "$REGISTRY" "$TAG" <<'PY'
import re, sys
path, registry, tag = sys.argv[1:]
text = open(path).read()
for old, new in [("ghcr.io/clip-operator/clip-operator", f"{registry}/clip-operator"),
                 ("ghcr.io/clip-operator/clip-worker", f"{registry}/clip-worker")]:
    assert text.count(f"repository: {old}\n") == 1, old
    text = text.replace(f"repository: {old}\n", f"repository: {new}\n")
# Both images' tags: the one pushed.
text, n = re.subn(r'^(  |    )tag: ""$', lambda m: f'{m.group(1)}tag: "{tag}"', text, flags=re.M)
assert n == 2, n
open(path, "w").write(text)
PY
"$HELM" package "$WORK/clip-operator" -d "$WORK" >/dev/null
pkg=$(ls "$WORK"/clip-operator-*.tgz)
echo "==> pushing $(basename "$pkg") to oci://$REGISTRY/charts" >&2
args=()
[ "$plain" = 1 ] && args+=(--plain-http)
"$HELM" push "$pkg" "oci://$REGISTRY/charts" "${args[@]}" >&2
echo "oci://$REGISTRY/charts/clip-operator"
