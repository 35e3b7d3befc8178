#!/usr/bin/env python3
"""Validates what the operator emits, offline: for every manifest in examples/, the ClipProcessor
against our CRD's schema, and every object `clip-operator render` prints against the Kubernetes
schemas (kubernetes-validate) or, for Karpenter and KEDA kinds, the upstream CRDs' schemas (taken
from those projects' Go modules by scripts/upstream-crds.sh).

Usage: validate_manifests.py --operator target/release/clip-operator [--k8s-version 1.33]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]


def crd_schemas(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of each served version."""
    out = {}
    for p in paths:
        crd = yaml.safe_load(p.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def check_crd_object(doc: dict, schema: dict) -> list[str]:
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--k8s-version", default="1.33")
    a = ap.parse_args()
    upstream = Path(subprocess.run(["bash", str(ROOT / "scripts/upstream-crds.sh")], check=True,
                                   capture_output=True, text=True).stdout.strip())
    ours = sorted((ROOT / "crds").glob("*.lakechain.dev.yaml"))
    schemas = crd_schemas([*ours, *sorted(upstream.glob("*.yaml"))])
    failures: list[str] = []
    checked = 0
    # Our CRDs are themselves Kubernetes objects.
    for crd in ours:
        try:
            kubernetes_validate.validate(yaml.safe_load(crd.read_text()), a.k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{crd.name}: {e.message}")
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(example.read_text()):
            if not doc or doc.get("kind") not in ("ClipProcessor", "ClipProcessorClass"):
                continue
            for err in check_crd_object(doc, schemas[(doc["apiVersion"], doc["kind"])]):
                failures.append(f"{example.name}: {doc['kind']}: {err}")
        r = subprocess.run([a.operator, "render", "-f", str(example)], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{example.name}: render failed: {r.stderr.strip()}")
            continue
        for doc in yaml.safe_load_all(r.stdout):
            if not doc:
                continue
            what = f"{example.name}: {doc['kind']} {doc['metadata']['name']}"
            key = (doc["apiVersion"], doc["kind"])
            checked += 1
            if key in schemas:
                failures.extend(f"{what}: {e}" for e in check_crd_object(doc, schemas[key]))
            else:
                try:
                    kubernetes_validate.validate(doc, a.k8s_version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    failures.append(f"{what}: {e.message} at {'.'.join(map(str, e.path))}")
                except Exception as e:  # noqa: BLE001 - unknown kinds must fail loudly too
                    failures.append(f"{what}: {e}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"validated {checked} rendered objects from {len(list((ROOT / 'examples').glob('*.yaml')))} examples "
          f"against Kubernetes {a.k8s_version} and the upstream Karpenter/KEDA CRDs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
