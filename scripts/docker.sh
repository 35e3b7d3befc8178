#!/usr/bin/env bash
# Makes a Docker engine with BuildKit available and prints the client command to use.
#
# Where none answers, installs Debian's docker.io (needs root) and starts dockerd with no bridge
# and no iptables rules (containers and builds use the host's network: loopback and the package
# registries only), its log in $CLIP_CACHE/dockerd.log. BuildKit: the client's buildx plugin
# where present, else Debian's 20.10 client, whose DOCKER_BUILDKIT=1 needs no plugin.
# Idempotent.
set -euo pipefail
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
mkdir -p "$CACHE_ROOT"
if [ -n "${DOCKER:-}" ]; then echo "$DOCKER"; exit 0; fi
client=docker
if ! command -v docker >/dev/null || ! docker buildx version >/dev/null 2>&1; then
  if [ ! -x /usr/bin/docker ] || ! command -v dockerd >/dev/null; then
    echo "==> installing docker.io (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null 2>&1 || {
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
    }
  fi
  client=/usr/bin/docker
fi
if ! $client info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "no Docker engine answers and starting one needs root" >&2; exit 1; }
  echo "==> starting dockerd (no bridge, no iptables; log: $CACHE_ROOT/dockerd.log)" >&2
  setsid dockerd --bridge=none --iptables=false --ip6tables=false \
    >>"$CACHE_ROOT/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do $client info >/dev/null 2>&1 && break; sleep 1; done
  $client info >/dev/null 2>&1 || { echo "dockerd did not start: see $CACHE_ROOT/dockerd.log" >&2; exit 1; }
fi
echo "$client"
