"""`make release` against a real OCI registry: the CNCF Distribution registry built from its Go
module (scripts/go-tools.sh registry), run on loopback. scripts/release.sh pushes both images
(`make images` built them, tag dev) and the chart; the chart is then pulled back by `helm` from
oci:// and names the pushed images, and the images are in the registry and pull back with
docker. Installing from the registry onto a cluster: tests/e2e (install_chart)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from oci_registry import Registry, release  # noqa: E402
TAG = os.environ.get("IMAGE_TAG", "dev")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("registry")) as r:
        yield r.host


def manifest(registry: str, repo: str, ref: str) -> dict:
    req = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{ref}", headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json"])})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_release_pushes_both_images_and_a_chart_that_names_them(registry):
    target = f"{registry}/clip"
    t0 = time.time()
    assert release(target, "operator worker", TAG) == f"oci://{target}/charts/clip-operator"
    print(f"release to the local registry took {time.time() - t0:.0f} s")
    for image in ("clip-operator", "clip-worker"):
        m = manifest(registry, f"clip/{image}", TAG)
        assert m.get("layers") or m.get("manifests"), m

    helm = subprocess.run(["bash", str(ROOT / "scripts/kube-tools.sh")], capture_output=True, text=True,
                          check=True).stdout.strip() + "/helm"
    version = yaml.safe_load((ROOT / "charts/clip-operator/Chart.yaml").read_text())["version"]
    chart = subprocess.run([helm, "show", "chart", f"oci://{target}/charts/clip-operator", "--version", version,
                            "--plain-http"], capture_output=True, text=True)
    assert chart.returncode == 0, chart.stderr
    assert yaml.safe_load(chart.stdout)["name"] == "clip-operator"
    rendered = subprocess.run([helm, "template", "clip", f"oci://{target}/charts/clip-operator", "--version", version,
                               "--plain-http", "--namespace", "clip-system"], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    (d,) = [x for x in yaml.safe_load_all(rendered.stdout) if x and x["kind"] == "Deployment"]
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"{target}/clip-operator:{TAG}"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WORKER_IMAGE"] == f"{target}/clip-worker:{TAG}"

    # What a node would do: pull the operator image back from the registry.
    docker = subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], capture_output=True, text=True,
                            check=True).stdout.strip()
    ref = f"{target}/clip-operator:{TAG}"
    pulled = subprocess.run([docker, "pull", "-q", ref], capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    local = subprocess.run([docker, "image", "inspect", "-f", "{{.Id}}", f"ghcr.io/clip-operator/clip-operator:{TAG}"],
                           capture_output=True, text=True, check=True).stdout.strip()
    remote = subprocess.run([docker, "image", "inspect", "-f", "{{.Id}}", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert local == remote, "the pulled image is the one make images built"
    subprocess.run([docker, "rmi", ref], capture_output=True)
