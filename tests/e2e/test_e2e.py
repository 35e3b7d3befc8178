"""`make e2e`: the operator and the workers the way users run them. The chart installed with the
images `make images` built, on the single-node cluster tests/cluster/cluster.sh runs (real
kube-apiserver, controller-manager, scheduler, kubelet on containerd, kube-proxy); a ClipProcessor
with the builtin scaler, the model cache on a ReadWriteMany volume and weights over local HTTP;
the middleware's queues, buckets and topic on the cluster's moto.

The tests run in order, each on what the one before left: cache warm -> 0 -> N -> 0 -> faults
mid-burst -> 0 again. What they observed goes to target/e2e/report.json."""
from __future__ import annotations

import json
import math
import os
import time

import pytest

from local import (MAX_IN_FLIGHT, OPERATOR_IMAGE, PRIORITY_CLASS, PULL_SECRET, ROOT, WORKER_IMAGE, Kube, Middleware,
                   WeightsServer, cache_volume, install_chart, log, photos, pod_policy, processor, processor_class,
                   wait)
from observe import WEIGHTS, Sink, Watcher, check_enriched, ts

NS, NAME, CLAIM, CLASS = "e2e", "photos", "clip-model-cache", "e2e-gpu"
REPORT = ROOT / "target/e2e/report.json"


REPORT_DATA: dict = {"images": {"operator": OPERATOR_IMAGE, "worker": WORKER_IMAGE}, "phases": {}}


@pytest.fixture(scope="module")
def stack(cluster):
    env = cluster.env
    kube = Kube(env)
    log(f"loading the images into the node ({cluster.name} cluster)")
    cluster.load([OPERATOR_IMAGE, WORKER_IMAGE])
    kube.run("create", "namespace", NS, check=False)
    pod_policy(kube, NS)
    log("installing the chart (helm upgrade --install --wait)")
    install_chart(kube, env)
    mw = Middleware(env["AWS_ENDPOINT_URL"], f"e2e-{int(time.time())}")
    weights = WeightsServer(WEIGHTS, env["CLIP_CLUSTER_HOST"])
    REPORT_DATA["model_cache"] = cache_volume(kube, env, NS, CLAIM)
    # The processor runs under a platform team's class (the keda test's runs without one).
    kube.apply(processor_class(CLASS))
    kube.apply(processor(NAME, NS, mw, weights.url, CLAIM, class_name=CLASS))
    watcher = Watcher(kube, NS, NAME)
    watcher.start()
    sink = Sink(mw)
    state = {"cluster": cluster, "env": env, "kube": kube, "mw": mw, "weights": weights, "watcher": watcher, "sent": {}, "sink": sink}
    yield state
    watcher.stop()
    REPORT_DATA.update(watcher.report())
    REPORT_DATA["messages"] = {"sent": len(state["sent"]), "out": len(sink.out), "duplicates": sink.duplicates,
                               "dead_lettered": len(state.get("dead", []))}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(REPORT_DATA, indent=2) + "\n")
    log(f"report: {REPORT}")
    if os.environ.get("E2E_KEEP") != "1":
        kube.run("delete", "clipprocessor", "-n", NS, NAME, "--wait=true", "--timeout=120s", check=False)
        kube.helm("uninstall", "clip-operator", "-n", "clip-system", "--wait")
        kube.run("delete", "clipprocessorclass", CLASS, "--wait=false", check=False)
        kube.run("delete", "namespace", NS, "--wait=false", check=False)
    weights.close()


def worker_log_times(kube: Kube, pod: str) -> dict[str, float]:
    """When the worker logged each start-up stage (its JSON log lines carry timestamps)."""
    r = kube.run("logs", "-n", NS, pod, check=False)
    stages = {}
    for line in r.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = rec.get("message") or rec.get("fields", {}).get("message")
        if msg in ("model loaded", "label prompts embedded", "worker started") and msg not in stages:
            stages[msg] = ts(rec["timestamp"])
    return stages


def test_the_cache_warm_job_fills_the_cache_in_a_real_pod_before_any_worker(stack):
    kube, env = stack["kube"], stack["env"]
    job = f"{NAME}-cache-warm-vit-b-32"
    log(f"waiting for Job {job}")
    def succeeded() -> bool:
        # Not there yet while the operator's class cache catches up with the class just applied.
        r = kube.run("get", "job", "-n", NS, job, "-o", "json", check=False)
        return r.returncode == 0 and json.loads(r.stdout).get("status", {}).get("succeeded", 0) >= 1
    wait("the cache-warm Job to succeed", 300, succeeded)
    (pod,) = kube.json("get", "pods", "-n", NS, "-l", f"job-name={job}")["items"]
    assert pod["status"]["phase"] == "Succeeded"
    # The namespace's ResourceQuota admitted it (it declares requests and limits), with the
    # processor's pull secret, priority and pod labels.
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": PULL_SECRET}]
    assert pod["spec"]["priorityClassName"] == PRIORITY_CLASS and pod["spec"]["priority"] == 1000
    assert pod["metadata"]["labels"]["team"] == "e2e"
    assert pod["spec"]["containers"][0]["image"] == WORKER_IMAGE
    assert pod["spec"]["nodeName"] == env["CLIP_CLUSTER_NODE"]
    marker = stack["cluster"].read_cache_file("ViT-B-32/.complete.json")
    assert marker, "the cache-warm Job wrote the weights and their marker to the RWX volume"
    assert json.loads(marker)
    assert stack["weights"].downloads.count("/model.safetensors") == 1, stack["weights"].downloads
    wait("CacheReady", 60, lambda: any(
        c["type"] == "CacheReady" and c["status"] == "True"
        for c in kube.json("get", "clipprocessor", "-n", NS, NAME).get("status", {}).get("conditions", [])))
    assert stack["watcher"].pods == {}, "no worker pod before the cache was warm"
    REPORT_DATA["phases"]["cache_warm"] = {
        "pod": pod["metadata"]["name"],
        "started": ts(pod["status"].get("startTime")),
        "finished": ts(kube.json("get", "job", "-n", NS, job)["status"].get("completionTime")),
    }


def test_zero_to_n_every_event_enriched_and_its_vector_stored(stack):
    kube, mw, watcher = stack["kube"], stack["mw"], stack["watcher"]
    assert watcher.replicas() == 0
    pics = photos()
    sent_at = time.time()
    sent = mw.send_events(pics, 60, "burst1")
    stack["sent"].update(sent)
    log("sent 60 events; waiting for the operator to scale from 0")
    wait("the Deployment to scale up from 0", 60, lambda: watcher.replicas() > 0)
    decided = ts(kube.json("get", "clipprocessor", "-n", NS, NAME)["status"].get("lastScaleTime"))
    sink = stack["sink"]
    sink.collect(set(sent), 400)
    assert watcher.replicas() == 2, "60 messages / 10 per worker, capped at maxInstances 2"
    # A worker takes messages as soon as its model is loaded; the kubelet's probe may say Ready
    # a little later.
    pods = wait("worker pods Ready", 60, lambda: [p for p in watcher.pods.values() if p.get("ready")])
    for p in pods:
        assert p["image"] == WORKER_IMAGE and p["node"] == stack["env"]["CLIP_CLUSTER_NODE"]
    # worker.pod* overrides reach the running pods; the operator's own labels stay.
    workers = kube.json("get", "pods", "-n", NS, "-l", "team=e2e,app.kubernetes.io/component=worker")["items"]
    assert workers, "the worker pods carry worker.podLabels"
    for pod in workers:
        spec, meta = pod["spec"], pod["metadata"]
        assert meta["labels"]["lakechain.dev/processor"] == NAME
        assert meta["annotations"]["e2e.lakechain.dev/run"] == "true"
        assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
        assert spec["priorityClassName"] == PRIORITY_CLASS and spec["priority"] == 1000
        assert spec["imagePullSecrets"] == [{"name": PULL_SECRET}]
        assert any(t.get("key") == "e2e.lakechain.dev/dedicated" for t in spec["tolerations"])
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"

    check_enriched(mw, sink, sent, pics)
    assert mw.depth(mw.input) == (0, 0)

    # Cold start, stage by stage, for the first pod.
    first = min(pods, key=lambda p: p["created"])
    stages = worker_log_times(kube, first["name"])
    first_out = min(t for e, t in sink.out.values())
    REPORT_DATA["phases"]["scale_up"] = {"events": 60, "sent": sent_at, "scaler_decision": decided}
    REPORT_DATA["cold_start"] = {
        "pod": first["name"], "scaler_decision": decided, "pod_created": first["created"],
        "scheduled": first.get("scheduled"), "container_started": first.get("container_started"),
        "model_loaded": stages.get("model loaded"), "labels_embedded": stages.get("label prompts embedded"),
        "worker_started": stages.get("worker started"), "ready": first.get("ready"),
        "first_message_done": first_out,
    }
    log("cold start: " + json.dumps(REPORT_DATA["cold_start"]))


def test_n_to_zero_after_the_cooldown_nothing_lost(stack):
    watcher, mw = stack["watcher"], stack["mw"]
    assert watcher.replicas() > 0 and watcher.pods, "workers are up after the burst"
    log("waiting for the cooldown (20 s) and the scale to zero")
    wait("the Deployment to scale to 0", 120, lambda: watcher.replicas() == 0)
    scaled_down = time.time()
    wait("every worker pod to be gone", 120,
         lambda: all(p.get("gone") for p in watcher.pods.values()))
    for p in watcher.pods.values():
        if p.get("exit_code") is not None:
            assert p["exit_code"] == 0, f"{p['name']} exited {p['exit_code']} ({p.get('reason')})"
        # Gone within the grace period (45 s) plus a poll.
        assert p["gone"] - scaled_down < 50, p
    assert mw.depth(mw.input) == (0, 0) and not mw.dead_letters()
    REPORT_DATA["phases"]["scale_to_zero"] = {"at": scaled_down, "scaled_to_zero": True}


def test_faults_mid_burst_lose_nothing(stack):
    kube, mw, watcher = stack["kube"], stack["mw"], stack["watcher"]
    sent = mw.send_events(photos(), 200, "burst2")
    stack["sent"].update(sent)
    faults = []
    # The operator's leader deleted mid-scale: the standby takes the lease and scales.
    lease = kube.json("get", "lease", "-n", "clip-system", "clip-operator")["spec"]["holderIdentity"]
    kube.run("delete", "pod", "-n", "clip-system", lease, "--wait=false")
    faults.append({"at": time.time(), "fault": f"operator leader {lease} deleted"})
    log(f"deleted the operator leader {lease}")
    wait("the Deployment to scale up again", 120, lambda: watcher.replicas() > 0)
    wait("a worker to be Ready", 180, lambda: any(p.get("ready") and not p.get("gone") and not p.get("deleting")
                                                  for p in watcher.pods.values()))
    sink = stack["sink"]
    wait("first outputs of the burst", 120, lambda: sink.drain() & set(sent))
    # A worker pod killed with no grace mid-burst.
    victim = next(p["name"] for p in watcher.pods.values() if p.get("ready") and not p.get("gone"))
    kube.run("delete", "pod", "-n", NS, victim, "--grace-period=0", "--force")
    faults.append({"at": time.time(), "fault": f"worker {victim} deleted --grace-period=0"})
    log(f"killed worker {victim}")
    time.sleep(5)
    # The kubelet restarted under running workers.
    stack["cluster"].restart_kubelet()
    faults.append({"at": time.time(), "fault": "kubelet restarted"})
    log("restarted the kubelet")
    sink.collect(set(sent), 600)
    dead = mw.dead_letters()
    stack["dead"] = dead
    assert not dead, f"dead-lettered: {[m['Body'][:200] for m in dead]}"
    assert set(sent) <= sink.out.keys(), "every message came out"
    # At-least-once: only what the killed worker held (published, not yet deleted) may come twice.
    assert sink.duplicates <= MAX_IN_FLIGHT, f"{sink.duplicates} duplicates"
    wait("the Deployment to scale to 0 again", 180, lambda: watcher.replicas() == 0)
    REPORT_DATA["phases"]["faults"] = {"events": 200, "faults": faults, "duplicates": sink.duplicates}


def test_the_class_decides_the_nodes_and_the_chart_admission_policy_refuses_what_it_forbids(stack):
    kube = stack["kube"]
    d = kube.json("get", "deployment", "-n", NS, f"{NAME}-worker")
    pod = d["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}, "the class's nodes"
    assert pod["priorityClassName"] == PRIORITY_CLASS
    # The real API server, with the chart's ValidatingAdmissionPolicy: an image outside the
    # class, and more GPUs than its budget, are refused at apply time.
    bad = processor("intruder", NS, stack["mw"], stack["weights"].url, CLAIM, class_name=CLASS)
    bad["spec"]["worker"]["image"] = "docker.io/someone/miner:1"
    r = kube.run("apply", "-f", "-", stdin=json.dumps(bad), check=False)
    assert r.returncode != 0 and "is not allowed by ClipProcessorClass e2e-gpu" in r.stderr, r.stderr
    big = processor("intruder", NS, stack["mw"], stack["weights"].url, CLAIM, class_name=CLASS, maxInstances=3)
    r = kube.run("apply", "-f", "-", stdin=json.dumps(big), check=False)
    assert r.returncode != 0 and "allows 2 per namespace (budget.maxGPUsPerNamespace)" in r.stderr, r.stderr


def test_the_processor_reports_ready_and_scaled_to_zero(stack):
    cp = stack["kube"].json("get", "clipprocessor", "-n", NS, NAME)
    conds = {c["type"]: c for c in cp["status"]["conditions"]}
    assert conds["Ready"]["status"] == "True", conds
    assert conds["WorkersAvailable"]["reason"] == "ScaledToZero", conds["WorkersAvailable"]
    assert cp["status"]["observedGeneration"] == cp["metadata"]["generation"]
    assert math.isclose(cp["status"]["replicas"]["desired"], 0)


def test_the_query_endpoint_runs_beside_the_workers_and_gives_the_stored_vectors(stack):
    """spec.query on the running processor: the operator's Deployment becomes a Ready pod on the
    workers' model cache, its Service selects it, status and `kubectl get -o wide` give the
    address, and the vector it returns for a photo is the one a worker stored for that photo."""
    import base64
    import urllib.request

    kube, mw = stack["kube"], stack["mw"]
    query = {"replicas": 1, "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}}
    kube.run("patch", "clipprocessor", "-n", NS, NAME, "--type", "merge", "-p", json.dumps({"spec": {"query": query}}))
    log("spec.query set; waiting for the query endpoint to be Ready")
    started = time.time()

    def ready():
        cp = kube.json("get", "clipprocessor", "-n", NS, NAME)
        q = cp.get("status", {}).get("query") or {}
        return cp if q.get("readyReplicas") == 1 else None
    cp = wait("status.query.readyReplicas == 1", 300, ready, every=2)
    url = cp["status"]["query"]["url"]
    assert url == f"http://{NAME}-query.{NS}.svc:8080"
    wide = kube.run("get", "clipprocessor", "-n", NS, NAME, "-o", "wide").stdout
    assert url in wide, wide
    REPORT_DATA["phases"]["query_ready_seconds"] = round(time.time() - started, 1)
    (pod,) = kube.json("get", "pods", "-n", NS, "-l",
                       f"lakechain.dev/processor={NAME},app.kubernetes.io/component=query")["items"]
    assert pod["spec"]["containers"][0]["args"] == ["query"]
    ip = pod["status"]["podIP"]
    slices = kube.json("get", "endpointslices", "-n", NS, "-l", f"kubernetes.io/service-name={NAME}-query")["items"]
    assert ip in [a for s in slices for e in (s.get("endpoints") or []) for a in e["addresses"]], slices

    # A photo the workers embedded: the endpoint gives its stored vector (same model, same
    # weights from the same cache, same preprocessing; batch composition moves the last bits).
    eid, event = next(iter(stack["sent"].items()))
    doc_key = event["data"]["document"]["url"].split("/", 3)[3]
    image = mw.s3.get_object(Bucket=mw.docs_bucket, Key=doc_key)["Body"].read()
    stored = json.loads(mw.s3.get_object(
        Bucket=mw.cache_bucket, Key=f"clip-image-processor/ViT-B-32/{event['data']['document']['etag']}")["Body"].read())
    body = json.dumps({"model": "ViT-B/32", "input": [{"image": base64.b64encode(image).decode()}, "a photo"]}).encode()
    req = urllib.request.Request(f"http://{ip}:8080/v1/embeddings", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got = json.loads(r.read())
    vec = got["data"][0]["embedding"]
    assert got["model"] == "ViT-B/32" and len(vec) == 512 and len(got["data"][1]["embedding"]) == 512
    assert all(abs(a - b) <= 1e-4 * (1 + abs(b)) for a, b in zip(vec, stored)), "the stored vector"

    # Disabled: the endpoint's objects go, the workers stay.
    kube.run("patch", "clipprocessor", "-n", NS, NAME, "--type", "merge", "-p",
             json.dumps({"spec": {"query": {"enabled": False}}}))
    wait("the query Deployment and Service to be removed", 120, lambda: not kube.json(
        "get", "deployments,services", "-n", NS, "-l", "app.kubernetes.io/component=query")["items"])
    assert kube.json("get", "deployment", "-n", NS, f"{NAME}-worker")
