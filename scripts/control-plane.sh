#!/usr/bin/env bash
# Builds Kubernetes' components and etcd from Go modules (no container engine, nothing prebuilt)
# and caches them outside the repository, keyed by version; a second run reuses them.
#
#   scripts/control-plane.sh         kube-apiserver + etcd (the envtest tier)
#   scripts/control-plane.sh node    also kube-controller-manager, kube-scheduler, kubelet and
#                                    kube-proxy (the local cluster, scripts/cluster.sh)
#
#   Kubernetes: a throwaway module requiring k8s.io/kubernetes at the release, with every k8s.io/*
#               staging module replaced by its matching v0.x.y release (the list is read from
#               k8s.io/kubernetes' own go.mod), then `go build .../cmd/<component>`. The Go build
#               cache is shared, so each further component costs seconds to minutes (kubelet
#               ~9 minutes on 2 cores the first time).
#   etcd:       the etcdmain package of go.etcd.io/etcd/server/v3 behind a three-line main.
#
# Prints the directory holding the binaries (use it as KUBEBUILDER_ASSETS / CONTROL_PLANE_BIN).
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.35.4}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
OUT="$CACHE_ROOT/control-plane/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION"
components=(kube-apiserver)
[ "${1:-}" = node ] && components+=(kube-controller-manager kube-scheduler kubelet kube-proxy)

find_missing() {
  missing=()
  for c in "${components[@]}"; do [ -x "$OUT/$c" ] || missing+=("$c"); done
}
find_missing
if [ ${#missing[@]} -eq 0 ] && [ -x "$OUT/etcd" ]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$OUT"
# One build at a time (make test starts one in the background, scripts/prebuild.sh); a second
# caller waits for it, then builds only what is still missing.
exec 9>"$OUT/.lock"
flock 9
find_missing
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local

if [ ${#missing[@]} -gt 0 ]; then
  mkdir -p "$WORK/k8s" && cd "$WORK/k8s"
  go mod init local/k8s >/dev/null 2>&1
  go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" > "$WORK/k8s.json"
  gomod=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' "$WORK/k8s.json")
  minor=${K8S_VERSION#*.}
  staging_version="v0.$minor"
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  for m in $(grep -E '^\s+k8s.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}'); do
    go mod edit -replace="$m=$m@$staging_version"
  done
  {
    echo 'package main'
    echo 'import ('
    for c in "${missing[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c/app\""; done
    echo ')'
    echo 'func main() {}'
  } > main.go
  go mod tidy >/dev/null 2>&1 || go mod tidy
  rm main.go
  for c in "${missing[@]}"; do
    echo "==> building $c v$K8S_VERSION from Go modules (first run only; kubelet takes ~9 minutes on 2 cores)" >&2
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}" \
      -o "$OUT/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$OUT/$c.tmp" "$OUT/$c"
  done
fi

if [ ! -x "$OUT/etcd" ]; then
  echo "==> building etcd v$ETCD_VERSION from Go modules" >&2
  mkdir -p "$WORK/etcd" && cd "$WORK/etcd"
  go mod init local/etcd >/dev/null 2>&1
  cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null 2>&1 || go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" .
  mv "$OUT/etcd.tmp" "$OUT/etcd"
fi
echo "$OUT"
