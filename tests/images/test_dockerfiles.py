"""The Dockerfiles, read as text: both are multi-stage, build through the same make targets CI
runs, feed one runtime stage from either the build stage or the host's binaries, end non-root,
and the worker's runtime stage holds every library the built clip-worker resolves. The built
images themselves are run in test_images.py."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(os.environ.get("CLIP_WORKER_BIN", ROOT / "target/release/clip-worker"))
# What debian:bookworm-slim (plus the libstdc++6 the Dockerfile installs) provides.
SYSTEM_LIBS = {"linux-vdso.so.1", "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1",
               "libpthread.so.0", "libutil.so.1", "libstdc++.so.6", "libgcc_s.so.1",
               "ld-linux-x86-64.so.2"}


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                op, _, args = buf.strip().partition(" ")
                out.append((op.upper(), args.strip()))
            buf = ""
    return out


def global_args(path: pathlib.Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM, with ${...} in them expanded."""
    args: dict[str, str] = {}
    for op, a in instructions(path):
        if op == "FROM":
            break
        if op == "ARG" and "=" in a:
            k, v = a.split("=", 1)
            args[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), v)
    return args


def base(path: pathlib.Path, stage: list[tuple[str, str]]) -> str:
    """The image a stage starts from, its ARG default resolved."""
    ref = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args(path)[m.group(1)], ref)


def stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instructions(path):
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def make_targets() -> dict[str, list[str]]:
    """target -> prerequisites, from the Makefile."""
    targets = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([a-z][\w-]*):(?!=)\s*(.*)$", line)
        if m:
            targets[m.group(1)] = m.group(2).split()
    return targets


def reachable(targets: dict[str, list[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo.extend(targets.get(t, []))
    return seen


@pytest.mark.parametrize("image,target,user", [
    ("operator", "build-operator", "65532:65532"),
    ("worker", "build-worker", "1000:1000"),
])
def test_multi_stage_non_root_and_built_by_the_target_ci_runs(image, target, user):
    dockerfile = ROOT / image / "Dockerfile"
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage"
    build, runtime = st[0], st[-1]
    runs = " ".join(a for op, a in build if op == "RUN")
    assert f"make {target}" in runs, f"{image}: the build stage must run `make {target}`"
    assert target in reachable(make_targets(), "test"), f"CI (make test) must build {target} too"
    names = {s[0][1].split()[-1] for s in st if " AS " in s[0][1].upper()}
    for s in st:
        ref = base(dockerfile, s)
        if ref == "scratch" or ref in names:
            continue
        assert ":" in ref and not ref.endswith(":latest"), f"{image}: unpinned base {ref}"
    # One runtime stage, fed by the build stage or by the host's binaries (BINARIES=build|host).
    assert global_args(dockerfile)["BINARIES"] == "build"
    assert {"build", "host", "binaries"} <= names
    assert all(a.startswith("--from=binaries ") for op, a in runtime if op == "COPY"), runtime
    assert ("USER", user) in runtime, f"{image}: runtime must run as {user}"
    assert not any(op == "RUN" and "make" in a for op, a in runtime), "nothing is built in the runtime stage"
    entry = next(a for op, a in runtime if op == "ENTRYPOINT")
    binary = re.findall(r'"([^"]+)"', entry)[0]
    copied = [a.split()[-1] for op, a in runtime if op == "COPY"]
    assert binary in copied, f"{image}: ENTRYPOINT {binary} is not copied into the runtime stage"


def test_the_operator_image_is_distroless_on_the_builders_glibc():
    path = ROOT / "operator/Dockerfile"
    st = stages(path)
    assert base(path, st[0]) == "rust:1.95-bookworm", "built on bookworm, as the host binary is"
    assert base(path, st[-1]) == "gcr.io/distroless/cc-debian12:nonroot", "glibc, no shell"


def test_the_worker_image_has_cache_and_every_library_clip_worker_loads():
    text = (ROOT / "worker/Dockerfile").read_text()
    runtime = stages(ROOT / "worker/Dockerfile")[-1]
    assert ("VOLUME", '["/cache"]') in runtime
    assert "install -d -o 1000 -g 1000" in text and "/cache" in text
    assert any(op == "ENV" and "CACHE_DIR=/cache" in a for op, a in runtime)
    copied = {a.split()[-1] for op, a in runtime if op == "COPY"}
    assert {"${SITE}/torch/lib", "${SITE}/nvidia"} <= copied
    assert any(op == "ENV" and "SITE=${VENV}/lib/python3.11/site-packages" in a for op, a in runtime)
    # The 3.6 GB of libraries come before anything that changes with a release.
    copies = [a.split()[-1] for op, a in runtime if op in ("COPY", "RUN")]
    assert copies[:2] == ["${SITE}/nvidia", "${SITE}/torch/lib"], copies
    # The binary CI built resolves only system libraries bookworm-slim has, and the venv's
    # torch/lib and nvidia/ (what the runtime stage copies, at the same path).
    ldd = subprocess.run(["ldd", str(WORKER)], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd, ldd
    venv_libs = 0
    for line in ldd.splitlines():
        name = line.split()[0]
        target = line.split("=>")[1].split("(")[0].strip() if "=>" in line else name
        if "/site-packages/" in target:
            assert re.search(r"/site-packages/(torch/lib|torch/lib/\.\./\.\./nvidia|nvidia)/", target), target
            venv_libs += 1
        else:
            assert pathlib.Path(name).name in SYSTEM_LIBS, f"{name} is not in debian:bookworm-slim"
    assert venv_libs > 0
    # Linked against CUDA: the GPU path is in the binary, not only in the docs.
    assert "libtorch_cuda.so" in ldd, "libtorch_cuda was dropped at link time"


def test_the_rpath_points_where_the_runtime_stage_puts_libtorch():
    # worker/build.rs bakes the venv's torch/lib into the binary; the image keeps that path, and
    # bookworm's python3 (3.11) makes the venv's lib/python3.11.
    path = ROOT / "worker/Dockerfile"
    assert "bookworm" in base(path, stages(path)[0])
    dyn = subprocess.run(["readelf", "-d", str(WORKER)], capture_output=True, text=True, check=True).stdout
    paths = re.findall(r"R(?:UN)?PATH.*\[(.+)\]", dyn)
    assert paths, "clip-worker has no rpath"
    assert any(p.endswith("/lib/python3.11/site-packages/torch/lib") for p in paths[0].split(":")), paths
