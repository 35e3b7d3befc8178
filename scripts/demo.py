#!/usr/bin/env python3
"""`make demo`: the main job the way users run it, on the local cluster (tests/cluster/cluster.sh).

Installs the chart with the images `make images` built, creates a middleware's queue, buckets and
topic on the cluster's moto, applies a ClipProcessor (builtin scaler, shared model cache on the
cluster's ReadWriteMany volume, weights served over HTTP as a cache-warm Job downloads them),
sends one Lakechain event per sample photo, prints a line for each change of the workers
(0 -> N -> 0, as `kubectl get -w` would), then the enriched events and where the vectors are,
and removes what it made.

Weights: $CLIP_WEIGHTS_DIR (a Hugging Face clip-vit-base-patch32 directory) if set, else the
random-weight ViT-B/32 the test fixtures generate (a banner says so: no model hub here).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/e2e"))
from local import (FIXTURES, OPERATOR_IMAGE, WORKER_IMAGE, Kube, Middleware, WeightsServer,  # noqa: E402
                   cache_volume, cluster_env, external_env, install_chart, load_images, log, photos, processor, wait)

NS, NAME, CLAIM = "demo", "photos", "clip-model-cache"


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    print("#" * width)
    for x in lines:
        print(f"# {x.ljust(width - 4)} #")
    print("#" * width)


def main() -> None:
    if os.environ.get("CLIP_WEIGHTS_DIR"):
        weights_dir = Path(os.environ["CLIP_WEIGHTS_DIR"])
    else:
        weights_dir = FIXTURES / "models/vit-b-32"
        banner(["DEMO WITH RANDOM WEIGHTS: no model hub is reachable, so the cluster runs a",
                "ViT-B/32-shaped CLIP with random weights generated locally. The pipeline is",
                "real; the vectors and keywords are meaningless. For real embeddings:",
                "    CLIP_WEIGHTS_DIR=/path/to/clip-vit-base-patch32 make demo"])
    external = os.environ.get("DEMO_CLUSTER", "local") == "external"
    env = external_env() if external else cluster_env()
    kube = Kube(env)
    if external:
        log(f"using the cluster in $KUBECONFIG; it must have {OPERATOR_IMAGE} and {WORKER_IMAGE} "
            "(e.g. kind load docker-image)")
    else:
        log(f"loading {OPERATOR_IMAGE} and {WORKER_IMAGE} into the node (first time: ~1 minute for 3.6 GB)")
        load_images([OPERATOR_IMAGE, WORKER_IMAGE])
    log("helm install clip-operator ./charts/clip-operator -n clip-system (waits for the operator pods)")
    install_chart(kube, env)
    kube.run("create", "namespace", NS, check=False)
    mw = Middleware(env["AWS_ENDPOINT_URL"], f"demo-{int(time.time())}")
    weights = WeightsServer(weights_dir, env["CLIP_CLUSTER_HOST"])
    cp = processor(NAME, NS, mw, weights.url, CLAIM, maxInstances=2, messagesPerInstance=3)
    # CPU workers (compute.device: cpu): no GPU request, no node pool; `make e2e` runs the GPU path.
    cp["spec"]["compute"] = {"device": "cpu"}
    if external:
        cp["spec"]["modelCache"] = {"none": True}
        log(f"model cache: none (each worker downloads from {weights.url})")
    else:
        kind = cache_volume(kube, env, NS, CLAIM)
        log(f"model cache: a ReadWriteMany {kind} volume; weights served at {weights.url}")
    kube.apply(cp)
    log(f"kubectl apply: ClipProcessor {NS}/{NAME} (CPU workers, builtin scaler, 0..2 workers, cooldown 20 s)")
    try:
        if not external:
            log("the cache-warm Job downloads the weights into the shared cache")
            wait("the cache-warm Job", 300, lambda: kube.json("get", "job", "-n", NS, f"{NAME}-cache-warm-vit-b-32")
                 .get("status", {}).get("succeeded", 0) >= 1, every=1)
        pics = photos()
        sent = mw.send_events(pics, len(pics), "photos")
        log(f"sent {len(sent)} Lakechain events ({', '.join(p.suffix[1:] for p in pics)}) to {mw.input_name}")
        out, last, peak, started = {}, None, 0, time.time()
        print(f"{'TIME':>8}  {'DESIRED':>7}  {'READY':>5}  {'QUEUE':>5}  {'DONE':>4}")
        while True:
            for event, _ in mw.drain_sink():
                out[event["id"]] = event
            d = kube.json("get", "deployment", "-n", NS, f"{NAME}-worker")
            row = (d["spec"].get("replicas", 0), d.get("status", {}).get("readyReplicas", 0),
                   sum(mw.depth(mw.input)), len(out))
            if row != last:
                print(f"{time.time() - started:7.0f}s  {row[0]:>7}  {row[1]:>5}  {row[2]:>5}  {row[3]:>4}", flush=True)
                last = row
            peak = max(peak, row[0])
            if peak and row[0] == 0 and len(out) >= len(sent):
                break
            if time.time() - started > 600:
                sys.exit("the demo did not finish within 10 minutes: kubectl -n demo get pods,events")
            time.sleep(1)
        print(f"\n{len(out)} enriched events on {mw.topic}:")
        for ev in sorted(out.values(), key=lambda e: e["data"]["document"]["url"]):
            meta = ev["data"]["metadata"]
            emb = meta["properties"]["attrs"]["embeddings"]
            print(f"  {ev['data']['document']['url']:52} {emb['model']} {emb['dimensions']}-d -> {emb['vectors']}"
                  f"  keywords: {', '.join(meta.get('keywords', []))}")
        print("\none event in full:\n" + json.dumps(next(iter(out.values())), indent=2))
        print(f"\nvectors: s3://{mw.cache_bucket}/clip-image-processor/ViT-B-32/ on {env['AWS_ENDPOINT_URL']}"
              f"; dead-lettered: {len(mw.dead_letters())}; workers went 0 -> {peak} -> 0")
    finally:
        if os.environ.get("DEMO_KEEP") != "1":
            log("cleaning up: the processor, the chart, the namespace")
            kube.run("delete", "clipprocessor", "-n", NS, NAME, "--wait=true", "--timeout=120s", check=False)
            kube.helm("uninstall", "clip-operator", "-n", "clip-system", "--wait")
            kube.run("delete", "namespace", NS, "--wait=false", check=False)
        weights.close()


if __name__ == "__main__":
    main()
