#!/usr/bin/env python3
"""`make bench-images`: the layers of the images `make images` built, largest last-changed first:
for each layer the instruction that made it, its size uncompressed and gzip-compressed (what a
registry stores and a node pulls), and its digest. With --rebuild, the worker image is built
again with no cache and the digests compared, to show which layers a release re-ships."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAG = os.environ.get("IMAGE_TAG", "dev")
IMAGES = [os.environ.get("OPERATOR_IMAGE", "ghcr.io/clip-operator/clip-operator") + ":" + TAG,
          os.environ.get("WORKER_IMAGE", "ghcr.io/clip-operator/clip-worker") + ":" + TAG]


def docker() -> str:
    return subprocess.run(["bash", str(ROOT / "scripts/docker.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def gzip_size(stream, chunk: int = 1 << 20) -> int:
    c, n = zlib.compressobj(6, zlib.DEFLATED, 31), 0
    while block := stream.read(chunk):
        n += len(c.compress(block))
    return n + len(c.flush())


def layers(d: str, image: str) -> list[dict]:
    """Per layer, bottom first: digest, uncompressed and gzip sizes, the instruction."""
    digests = json.loads(subprocess.run([d, "image", "inspect", image], capture_output=True, text=True,
                                        check=True).stdout)[0]["RootFS"]["Layers"]
    with tempfile.TemporaryDirectory(dir=ROOT / "target") as tmp:
        archive = Path(tmp) / "image.tar"
        subprocess.run([d, "save", "-o", str(archive), image], check=True)
        with tarfile.open(archive) as t:
            manifest = json.load(t.extractfile("manifest.json"))[0]
            # The steps that made a layer (empty_layer ones only set metadata), bottom first.
            history = json.load(t.extractfile(manifest["Config"]))["history"]
            made = [h.get("created_by") or "(base image)" for h in history if not h.get("empty_layer")]
            rows = []
            for digest, name, by in zip(digests, manifest["Layers"], made):
                m = t.getmember(name)
                rows.append({"digest": digest, "bytes": m.size, "gzip_bytes": gzip_size(t.extractfile(m)),
                             "created_by": by})
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebuild", action="store_true", help="rebuild the worker with --no-cache and compare")
    args = ap.parse_args()
    d = docker()
    for image in IMAGES:
        rows = layers(d, image)
        total, total_gz = sum(r["bytes"] for r in rows), sum(r["gzip_bytes"] for r in rows)
        print(f"\n{image}: {mib(total)} MiB uncompressed, {mib(total_gz)} MiB gzip, {len(rows)} layers")
        print(f"| layer | uncompressed MiB | gzip MiB | digest | made by |\n|---|---:|---:|---|---|")
        for i, r in enumerate(rows):
            what = r["created_by"].replace("|", "\\|")
            what = what[:90] + ("..." if len(what) > 90 else "")
            print(f"| {i} | {mib(r['bytes'])} | {mib(r['gzip_bytes'])} | `{r['digest'][7:19]}` | `{what}` |")
    if args.rebuild:
        worker = IMAGES[1]
        before = json.loads(subprocess.run([d, "image", "inspect", worker], capture_output=True, text=True,
                                           check=True).stdout)[0]["RootFS"]["Layers"]
        subprocess.run(["bash", str(ROOT / "scripts/images.sh")], env={**os.environ, "IMAGES_NO_CACHE": "1"},
                       check=True)
        after = json.loads(subprocess.run([d, "image", "inspect", worker], capture_output=True, text=True,
                                          check=True).stdout)[0]["RootFS"]["Layers"]
        same = [i for i, (a, b) in enumerate(zip(before, after)) if a == b]
        print(f"\nrebuilt {worker} with --no-cache: layers {same} have the same digests; "
              f"{[i for i in range(len(after)) if i not in same]} changed")


if __name__ == "__main__":
    main()
