#!/usr/bin/env bash
# `make images`: builds the operator and worker images from operator/Dockerfile and
# worker/Dockerfile with Docker (BuildKit), then prints their layers.
#
#   IMAGE_TAG (default dev), OPERATOR_IMAGE / WORKER_IMAGE (default
#   ghcr.io/clip-operator/clip-{operator,worker}, the chart's repositories), IMAGES_NO_CACHE=1.
# Base images and where the binaries come from: scripts/base-images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${IMAGE_TAG:-dev}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/clip-operator/clip-operator}
WORKER_IMAGE=${WORKER_IMAGE:-ghcr.io/clip-operator/clip-worker}
DOCKER=$(bash scripts/docker.sh)
export DOCKER DOCKER_BUILDKIT=1
declare -A arg
while IFS='=' read -r k v; do arg[$k]=$v; done < <(bash scripts/base-images.sh)
common=(--network host --build-arg "BINARIES=${arg[BINARIES]}")
[ "${IMAGES_NO_CACHE:-0}" = 1 ] && common+=(--no-cache)
operator_args=("${common[@]}")
worker_args=("${common[@]}")
[ -n "${arg[OPERATOR_RUNTIME_IMAGE]:-}" ] && operator_args+=(--build-arg "RUNTIME_IMAGE=${arg[OPERATOR_RUNTIME_IMAGE]}")
[ -n "${arg[WORKER_RUNTIME_IMAGE]:-}" ] && worker_args+=(--build-arg "RUNTIME_IMAGE=${arg[WORKER_RUNTIME_IMAGE]}")
if [ "${arg[BINARIES]}" = host ]; then
  for f in target/release/clip-operator target/release/clip-worker; do
    [ -x "$f" ] || { echo "$f is missing: run make build first" >&2; exit 1; }
  done
  echo "==> no registry reachable: images take the binaries make build made here (BINARIES=host)" >&2
fi
# build IMAGE DOCKERFILE ARGS...: the image this tag named before is removed once it is unused,
# so repeated builds do not pile up gigabytes of dangling images.
build() {
  local image=$1 dockerfile=$2; shift 2
  local before; before=$($DOCKER image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  $DOCKER build -q "$@" -f "$dockerfile" -t "$image" . >/dev/null
  if [ -n "$before" ] && [ "$before" != "$($DOCKER image inspect -f '{{.Id}}' "$image")" ]; then
    $DOCKER rmi "$before" >/dev/null 2>&1 || true
  fi
}
echo "==> building $OPERATOR_IMAGE:$TAG (operator/Dockerfile)" >&2
build "$OPERATOR_IMAGE:$TAG" operator/Dockerfile "${operator_args[@]}"
echo "==> building $WORKER_IMAGE:$TAG (worker/Dockerfile; copies 3.6 GB of libtorch + CUDA the first time)" >&2
build "$WORKER_IMAGE:$TAG" worker/Dockerfile "${worker_args[@]}"
for image in "$OPERATOR_IMAGE:$TAG" "$WORKER_IMAGE:$TAG"; do
  printf '%s  %s\n' "$image" "$($DOCKER image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)"
done
