"""The images `make images` built, run in containers: they start as their non-root users, the
worker's /cache is writable by uid 1000 on a read-only root filesystem, clip-worker resolves
libtorch_cuda inside the image and reports that it found no GPU, and the operator serves the
CRD the repository commits. No network: every container runs with --network none."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = os.environ.get("IMAGE_TAG", "dev")
OPERATOR = os.environ.get("OPERATOR_IMAGE", "ghcr.io/clip-operator/clip-operator") + ":" + TAG
WORKER = os.environ.get("WORKER_IMAGE", "ghcr.io/clip-operator/clip-worker") + ":" + TAG
FIXTURES = Path(os.environ.get("CLIP_FIXTURES", ROOT / "target/fixtures"))


@pytest.fixture(scope="session")
def docker() -> str:
    return subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def run(docker: str, image: str, *args: str, opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([docker, "run", "--rm", "--network", "none", *opts, image, *args],
                          capture_output=True, text=True, timeout=300)


def test_the_operator_image_runs_as_nonroot_and_prints_the_committed_crd(docker):
    cfg = json.loads(subprocess.run([docker, "image", "inspect", OPERATOR], capture_output=True, text=True,
                                    check=True).stdout)[0]["Config"]
    assert cfg["User"] == "65532:65532" and cfg["Entrypoint"] == ["/usr/local/bin/clip-operator"]
    r = run(docker, OPERATOR, "crd", opts=("--read-only",))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "crds/clipprocessors.lakechain.dev.yaml").read_text()
    # TLS to AWS needs the CA bundle; the user needs its passwd entry, as distroless has them.
    cid = subprocess.run([docker, "create", OPERATOR], capture_output=True, text=True, check=True).stdout.strip()
    try:
        bundle = subprocess.run([docker, "cp", f"{cid}:/etc/ssl/certs/ca-certificates.crt", "-"],
                                capture_output=True, check=True).stdout
        passwd = subprocess.run([docker, "cp", f"{cid}:/etc/passwd", "-"], capture_output=True, check=True).stdout
    finally:
        subprocess.run([docker, "rm", cid], capture_output=True)
    assert bundle.count(b"BEGIN CERTIFICATE") > 100
    assert b"nonroot:x:65532:65532" in passwd
    # distroless: no shell to exec into.
    r = subprocess.run([docker, "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", OPERATOR, "-c", "true"],
                       capture_output=True, text=True)
    assert r.returncode != 0


def test_the_worker_image_resolves_every_library_and_links_libtorch_cuda(docker):
    r = run(docker, WORKER, "/usr/local/bin/clip-worker", opts=("--entrypoint", "ldd"))
    assert r.returncode == 0, r.stderr
    assert "not found" not in r.stdout, r.stdout
    cuda = [l for l in r.stdout.splitlines() if "libtorch_cuda.so" in l]
    assert cuda and "/opt/clip/venv/lib/python3.11/site-packages/torch/lib/" in cuda[0], r.stdout
    assert any("libcudart" in l for l in r.stdout.splitlines()), "CUDA runtime from the image's nvidia/"


def test_the_worker_image_finds_no_gpu_here_and_embeds_on_the_cpu(docker, tmp_path):
    # A weights directory uid 1000 may read (the fixtures are private to the user who made them).
    weights = tmp_path / "tiny"
    shutil.copytree(FIXTURES / "models/tiny", weights)
    for f in [tmp_path, weights, *weights.iterdir()]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    photo = FIXTURES / "images/chelsea-baseline.jpg"
    mounts = ("--read-only", "--tmpfs", "/tmp", "-v", f"{weights}:/weights:ro", "-v", f"{photo}:/in/cat.jpg:ro")
    r = run(docker, WORKER, "embed", "--device", "cuda", "--weights", "/weights", "/in/cat.jpg",
            opts=mounts)
    assert r.returncode == 2 and "libtorch sees no CUDA device" in r.stderr, r.stderr
    r = run(docker, WORKER, "embed", "--weights", "/weights", "/in/cat.jpg", opts=mounts)
    assert r.returncode == 0, r.stderr
    assert "placement=cpu fp32" in r.stderr, r.stderr
    line = json.loads(r.stdout)
    host = subprocess.run([str(ROOT / "target/release/clip-worker"), "embed", "--weights", str(weights), str(photo)],
                          capture_output=True, text=True, check=True)
    want = json.loads(host.stdout)["embedding"]
    assert all(abs(a - b) <= 1e-4 * (1 + abs(b)) for a, b in zip(line["embedding"], want)), \
        "the image's binary and libraries embed as the host's do"


def test_the_worker_image_runs_as_uid_1000_with_a_writable_cache(docker):
    cfg = json.loads(subprocess.run([docker, "image", "inspect", WORKER], capture_output=True, text=True,
                                    check=True).stdout)[0]["Config"]
    assert cfg["User"] == "1000:1000" and "/cache" in (cfg.get("Volumes") or {})
    assert "CACHE_DIR=/cache" in cfg["Env"]
    r = run(docker, WORKER, "-c", "id -u && touch /cache/probe && stat -c %u /cache/probe",
            opts=("--read-only", "--entrypoint", "/bin/sh"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1000", "1000"]
