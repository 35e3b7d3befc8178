#!/usr/bin/env bash
# Regenerates operator/src/external/*.rs from the upstream CRDs (../shared/schemas, the same files
# the Karpenter and KEDA Go modules ship) with kopium. The output is committed; run this when the
# upstream CRDs change. Needs: cargo install kopium --version 0.24.1 --locked
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SCHEMAS:-../shared/schemas}
OUT=operator/src/external
gen() { kopium -f "$1" "${@:2}" --docs --derive Default --derive PartialEq --smart-derive-elision; }
gen "$S/karpenter.sh_nodepools.yaml" --api-version v1 > "$OUT/karpenter.rs"
gen "$S/keda.sh_scaledobjects.yaml" > "$OUT/keda_scaled_object.rs"
gen "$S/keda.sh_triggerauthentications.yaml" > "$OUT/keda_trigger_authentication.rs"
cargo fmt -p clip-operator
