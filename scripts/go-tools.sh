#!/usr/bin/env bash
# Go tools the chart's release path needs, built from their modules (nothing prebuilt) and cached
# outside the repository, keyed by version:
#
#   helm-docs  github.com/norwoodj/helm-docs: charts/clip-operator/README.md from values.yaml's
#              "# --" comments (make chart-docs; tests/chart checks the README is current);
#   registry   github.com/distribution/distribution/v3 (the CNCF Distribution registry): the
#              local OCI registry tests/chart/test_oci.py pushes the chart and images to.
#
#   scripts/go-tools.sh helm-docs|registry   builds (once) and prints the binary's path
set -euo pipefail
HELM_DOCS_VERSION=${HELM_DOCS_VERSION:-1.14.2}
DISTRIBUTION_VERSION=${DISTRIBUTION_VERSION:-3.1.2}
CACHE_ROOT=${CLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clip-operator}
case "${1:-}" in
  helm-docs) pkg=github.com/norwoodj/helm-docs/cmd/helm-docs@v$HELM_DOCS_VERSION; OUT="$CACHE_ROOT/go-tools/helm-docs-v$HELM_DOCS_VERSION" ;;
  registry) pkg=github.com/distribution/distribution/v3/cmd/registry@v$DISTRIBUTION_VERSION; OUT="$CACHE_ROOT/go-tools/distribution-v$DISTRIBUTION_VERSION" ;;
  *) echo "usage: $0 helm-docs|registry" >&2; exit 2 ;;
esac
bin="$OUT/$1"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
if [ ! -x "$bin" ]; then
  echo "building $1 from $pkg (first run: a minute or two)" >&2
  GOBIN="$OUT" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go install "$pkg" >&2
fi
echo "$bin"
