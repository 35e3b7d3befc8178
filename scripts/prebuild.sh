#!/usr/bin/env bash
# `make test`'s first step: starts the Go builds the end-to-end tests need later (Kubernetes'
# components, then KEDA; scripts/control-plane.sh, scripts/keda.sh) in the background at low
# priority, so they fill the cores the cargo builds leave idle instead of running after them.
# Each script takes a lock while it builds, so the later foreground call waits for the background
# one and then finds the binaries cached (or, if it failed, builds them itself, in the open).
# Nothing to do when everything is cached. Log: target/prebuild.log.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
K8S_VERSION=${K8S_VERSION:-1.35.4} ETCD_VERSION=${ETCD_VERSION:-3.6.16} KEDA_VERSION=${KEDA_VERSION:-2.21.0}
cp="$CACHE_ROOT/control-plane/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION"
keda="$CACHE_ROOT/keda/v$KEDA_VERSION"
todo=()
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  [ -x "$cp/$b" ] || { todo+=("Kubernetes v$K8S_VERSION"); break; }
done
[ -x "$keda/keda" ] && [ -x "$keda/keda-adapter" ] || todo+=("KEDA v$KEDA_VERSION")
[ ${#todo[@]} -eq 0 ] && exit 0
mkdir -p target
echo "==> building ${todo[*]} from Go modules in the background (first run only; log: target/prebuild.log)" >&2
# Not a child of make: setsid, so it outlives this script; the lock files say when it is done.
setsid nice -n 10 bash -c 'bash scripts/control-plane.sh >/dev/null && bash scripts/control-plane.sh node >/dev/null && bash scripts/keda.sh >/dev/null' \
  > target/prebuild.log 2>&1 < /dev/null &
# Give the background build the locks before anyone asks for them.
sleep 1
