#!/usr/bin/env bash
# Makes a Docker engine with BuildKit available and prints the client command to use.
#
# Where none answers, installs Debian's docker.io (needs root) and starts dockerd with no bridge
# and no iptables rules (containers and builds use the host's network: loopback and the package
# registries only), its log in $CLIP_CACHE/dockerd.log. BuildKit: the client's buildx plugin
# where present, else Debian's 20.10 client, whose DOCKER_BUILDKIT=1 needs no plugin.
# Idempotent. `scripts/docker.sh stop` stops the dockerd this script started (and only that one;
# an engine the machine already ran is left alone); `make test` ends with it.
set -euo pipefail
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
PIDFILE=$CACHE_ROOT/dockerd.pid
mkdir -p "$CACHE_ROOT"
if [ "${1:-}" = stop ]; then
  [ -f "$PIDFILE" ] || exit 0
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    echo "==> stopping the dockerd scripts/docker.sh started (pid $pid)" >&2
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$PIDFILE"
  exit 0
fi
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
  echo $! > "$PIDFILE"
  for _ in $(seq 60); do $client info >/dev/null 2>&1 && break; sleep 1; done
  $client info >/dev/null 2>&1 || { echo "dockerd did not start: see $CACHE_ROOT/dockerd.log" >&2; exit 1; }
fi
echo "$client"
