#!/usr/bin/env python3
"""`make bench-query`: ViT-B/32 text queries against `clip-worker query` and against a reference in
the same run: transformers' `CLIPModel.get_text_features` behind FastAPI + uvicorn, one request per
forward pass, as a minimal Python embedding service is written. Both load the fixtures' random-weight
ViT-B/32 checkpoint (the real model's shapes and FLOPs), run on this machine's CPU, one at a time,
and are driven by the same asyncio client over keep-alive HTTP/1.1 connections, at concurrency
1, 8 and 32 for --seconds each. Prints a table; writes target/bench/query.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOUNS = ["car", "dog", "cat", "house", "tree", "beach", "mountain", "city at night", "red bicycle",
         "bowl of soup", "astronaut", "coffee cup", "rocket launch", "portrait of a woman"]

REFERENCE = r'''
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import CLIPModel, CLIPTokenizer

weights = WEIGHTS
model = CLIPModel.from_pretrained(weights).eval()
tok = CLIPTokenizer.from_pretrained(weights)
app = FastAPI()

class Req(BaseModel):
    model: str
    input: str | list[str]

@app.post("/v1/embeddings")
def embeddings(r: Req):
    texts = [r.input] if isinstance(r.input, str) else r.input
    batch = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        # transformers 5: the projected features are the output's pooler_output.
        f = model.get_text_features(**batch).pooler_output
    return {"object": "list", "model": r.model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(f.tolist())]}

@app.get("/readyz")
def ready():
    return "ready"
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout} s")


async def one_client(port: int, stop_at: float, start_at: float, lat: list[float], k: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = k
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            body = json.dumps({"model": "ViT-B/32", "input": f"a photo of a {NOUNS[i % len(NOUNS)]}, take {i}"}).encode()
            i += 7
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            t0 = time.perf_counter()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            t1 = time.perf_counter()
            if status != 200:
                raise SystemExit(f"HTTP {status}")
            if t0 >= start_at:
                lat.append(t1 - t0)
    finally:
        writer.close()


async def level(port: int, concurrency: int, seconds: float, warmup: float) -> dict:
    lat: list[float] = []
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds
    await asyncio.gather(*(one_client(port, stop_at, start_at, lat, k) for k in range(concurrency)))
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
    return {"concurrency": concurrency, "requests": len(lat), "rps": len(lat) / seconds,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", default=str(ROOT / "target/release/clip-worker"))
    ap.add_argument("--fixtures", default=os.environ.get("CLIP_FIXTURES", str(ROOT / "target/fixtures")))
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--levels", default="1,8,32")
    args = ap.parse_args()
    weights = Path(args.fixtures) / "models/vit-b-32"
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, list[dict]] = {}
    env = dict(os.environ, CLIP_WEIGHTS_DIR=str(weights), CLIP_DEVICE="cpu")
    script = ROOT / "target/bench/query_reference.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(REFERENCE.replace("WEIGHTS", repr(str(weights))))
    servers = {
        "clip-worker query": lambda port: [args.worker, "query", "--http-port", str(port)],
        "reference (transformers + FastAPI)": lambda port: [
            sys.executable, "-m", "uvicorn", "--app-dir", str(script.parent), "query_reference:app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
    }
    for name, argv in servers.items():
        port = free_port()
        cmd = argv(port)
        print(f"==> starting {name} on port {port}", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            results[name] = []
            for c in levels:
                print(f"    concurrency {c}: {args.warmup:g} s warm-up, {args.seconds:g} s measured", flush=True)
                r = asyncio.run(level(port, c, args.seconds, args.warmup))
                print(f"    {r['rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", flush=True)
                results[name].append(r)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ours, ref = results["clip-worker query"], results["reference (transformers + FastAPI)"]
    print(f"\nViT-B/32 text queries, CPU: {cpu_description()}")
    print("| concurrency | clip-worker query: req/s, p50, p99 | reference: req/s, p50, p99 | throughput ratio |")
    print("|---|---|---|---|")
    for o, r in zip(ours, ref):
        print(f"| {o['concurrency']} | {o['rps']:.1f}, {o['p50_ms']:.1f} ms, {o['p99_ms']:.1f} ms "
              f"| {r['rps']:.1f}, {r['p50_ms']:.1f} ms, {r['p99_ms']:.1f} ms | {o['rps'] / r['rps']:.2f}x |")
    out = ROOT / "target/bench/query.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_description(), "cores": os.cpu_count(), "seconds": args.seconds,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
