"""What the end-to-end tests observe on the cluster and check on the sink, whatever the scaling
engine: the worker pods and the replica count over time, the enriched events, the vectors."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from local import FIXTURES, ROOT, Kube, Middleware, log, wait

WORKER = ROOT / "target/release/clip-worker"
WEIGHTS = FIXTURES / "models/vit-b-32"


def ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def worker_selector(name: str) -> str:
    return f"lakechain.dev/processor={name},app.kubernetes.io/component=worker"


class Watcher(threading.Thread):
    """Polls a processor's worker pods and Deployment every second: every pod ever seen (name,
    node, image, phase, start, ready and end times) and every change of the replica count."""

    def __init__(self, kube: Kube, namespace: str, name: str):
        super().__init__(daemon=True)
        self.kube, self.ns, self.name = kube, namespace, name
        self.pods, self.scale, self.stopped = {}, [], threading.Event()
        self.lock, self.last_error = threading.Lock(), ""

    def run(self):
        while not self.stopped.is_set():
            try:
                self.poll()
            except Exception as e:  # a restarting control plane must not end the watch
                if str(e) != self.last_error:
                    log(f"watcher: {e}")
                self.last_error = str(e)
            self.stopped.wait(1)

    def poll(self):
        got = self.kube.run("get", "deployment", "-n", self.ns, f"{self.name}-worker", "-o", "json", check=False)
        if got.returncode != 0:  # not created yet
            return
        d = json.loads(got.stdout)
        pods = self.kube.json("get", "pods", "-n", self.ns, "-l", worker_selector(self.name))["items"]
        now = time.time()
        with self.lock:
            want = d["spec"].get("replicas", 0)
            ready = d.get("status", {}).get("readyReplicas", 0)
            if not self.scale or self.scale[-1][1:] != (want, ready):
                self.scale.append((now, want, ready))
            seen = set()
            for p in pods:
                name = p["metadata"]["name"]
                seen.add(name)
                conds = {c["type"]: c for c in p["status"].get("conditions", [])}
                cs = (p["status"].get("containerStatuses") or [{}])[0]
                rec = self.pods.setdefault(name, {"name": name, "created": ts(p["metadata"]["creationTimestamp"])})
                rec.update({
                    "node": p["spec"].get("nodeName"), "image": p["spec"]["containers"][0]["image"],
                    "phase": p["status"].get("phase"),
                    "restarts": cs.get("restartCount", 0),
                })
                if conds.get("PodScheduled", {}).get("status") == "True":
                    rec.setdefault("scheduled", ts(conds["PodScheduled"]["lastTransitionTime"]))
                started = cs.get("state", {}).get("running", {}).get("startedAt")
                if started:
                    rec.setdefault("container_started", ts(started))
                if conds.get("Ready", {}).get("status") == "True":
                    rec.setdefault("ready", ts(conds["Ready"]["lastTransitionTime"]))
                if p["metadata"].get("deletionTimestamp"):
                    rec.setdefault("deleting", now)
                term = cs.get("state", {}).get("terminated") or cs.get("lastState", {}).get("terminated")
                if term:
                    rec["exit_code"] = term.get("exitCode")
                    rec["reason"] = term.get("reason")
            for name, rec in self.pods.items():
                if name not in seen:
                    rec.setdefault("gone", now)

    def replicas(self) -> int:
        with self.lock:
            return self.scale[-1][1] if self.scale else 0

    def most_replicas(self) -> int:
        with self.lock:
            return max((w for _, w, _ in self.scale), default=0)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)

    def report(self) -> dict:
        return {"pods": sorted(self.pods.values(), key=lambda p: p["created"] or 0),
                "scale": [{"at": t, "desired": w, "ready": r} for t, w, r in self.scale]}


class Sink:
    """The enriched events read off a middleware's sink, by event id, with duplicates counted."""

    def __init__(self, mw: Middleware):
        self.mw, self.out, self.duplicates = mw, {}, 0

    def drain(self) -> set[str]:
        for event, sent_at in self.mw.drain_sink():
            if event["id"] in self.out:
                self.duplicates += 1
            else:
                self.out[event["id"]] = (event, sent_at)
        return set(self.out)

    def collect(self, want: set[str], timeout: float) -> None:
        """Reads until every id in `want` came out."""
        wait(f"{len(want)} enriched events (have {len(want & self.out.keys())})", timeout,
             lambda: want <= self.drain(), every=1)


def key_of(event: dict) -> str:
    return event["data"]["document"]["url"].split("/", 3)[3]


def embed_reference(files: list[Path]) -> dict[str, list[float]]:
    out = subprocess.run([str(WORKER), "embed", "--device", "cpu", "--weights", str(WEIGHTS), *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    return {(v := json.loads(l))["file"]: v["embedding"] for l in out.splitlines()}


def check_enriched(mw: Middleware, sink: Sink, sent: dict[str, dict], pics: list[Path]) -> None:
    """Every event out enriched, its vector in the cache bucket equal to `clip-worker embed`'s on
    the host (checked as worker/tests/service.rs checks them)."""
    reference = embed_reference(pics)
    by_name = {p.name: str(p) for p in pics}
    for eid in sent:
        out, _ = sink.out[eid]
        emb = out["data"]["metadata"]["properties"]["attrs"]["embeddings"]
        assert emb["model"] == "ViT-B/32" and emb["dimensions"] == 512
        assert out["data"]["document"] == sent[eid]["data"]["document"]
        assert out["data"]["chainId"] == sent[eid]["data"]["chainId"]
        assert out["data"]["callStack"] == ["clip-image-processor", "s3-event-trigger"]
        key = emb["vectors"].removeprefix(f"s3://{mw.cache_bucket}/")
        assert key == f"clip-image-processor/ViT-B-32/{sent[eid]['data']['document']['etag']}"
        vector = json.loads(mw.s3.get_object(Bucket=mw.cache_bucket, Key=key)["Body"].read())
        # keys are <burst>/<nnnn>-<photo name>
        photo = by_name[key_of(sent[eid]).split("/", 1)[1].split("-", 1)[1]]
        want = reference[photo]
        assert len(vector) == 512 and all(abs(a - b) <= 1e-4 * (1 + abs(b)) for a, b in zip(vector, want)), \
            f"{photo}: the pod's vector differs from clip-worker embed on the host"
        assert out["data"]["metadata"].get("keywords"), "labels extracted"
