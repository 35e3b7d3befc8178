"""`make e2e`, `engine: keda`: the same 0 -> N -> 0 as test_e2e.py with KEDA doing the scaling.

KEDA is built from its Go module (scripts/keda.sh) and installed from its own manifests
(local.install_keda). The operator emits a ScaledObject and a TriggerAuthentication instead of
scaling itself; KEDA's operator activates the Deployment 0 -> 1 and back, and the HPA it makes
scales 1 -> N on the queue depth KEDA's metrics API server serves through the API server's
aggregation layer. Going past one replica therefore proves the whole external-metrics path.
Runs after test_e2e.py (same cluster, same images, the model cache it warmed); what it observed
is added to target/e2e/report.json under "keda"."""
from __future__ import annotations

import json
import os
import time

import pytest

from local import (OPERATOR_IMAGE, ROOT, WORKER_IMAGE, Kube, Middleware, WeightsServer, cache_volume, install_chart,
                   install_keda, log, photos, pod_policy, processor, wait)
from observe import WEIGHTS, Sink, Watcher, check_enriched, ts

NS, NAME, CLAIM = "e2e-keda", "photos", "clip-model-cache"
REPORT = ROOT / "target/e2e/report.json"
KEDA: dict = {}
HOLD = 60


@pytest.fixture(scope="module")
def stack(cluster):
    env = cluster.env
    kube = Kube(env)
    cluster.load([OPERATOR_IMAGE, WORKER_IMAGE])
    log("installing KEDA (built from its Go module) from its own manifests")
    KEDA.update(install_keda(kube, cluster.load))
    log("installing the chart (helm upgrade --install --wait)")
    install_chart(kube, env)
    kube.run("create", "namespace", NS, check=False)
    pod_policy(kube, NS)
    mw = Middleware(env["AWS_ENDPOINT_URL"], f"keda-{int(time.time())}")
    weights = WeightsServer(WEIGHTS, env["CLIP_CLUSTER_HOST"])
    cache_volume(kube, env, NS, CLAIM)
    kube.apply(processor(NAME, NS, mw, weights.url, CLAIM, engine="keda"))
    watcher = Watcher(kube, NS, NAME)
    watcher.start()
    sink = Sink(mw)
    state = {"env": env, "kube": kube, "mw": mw, "watcher": watcher, "sink": sink, "sent": {}}
    yield state
    watcher.stop()
    KEDA.update(watcher.report())
    KEDA["messages"] = {"sent": len(state["sent"]), "out": len(sink.out), "duplicates": sink.duplicates,
                        "dead_lettered": len(mw.dead_letters())}
    report = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    report["keda"] = KEDA
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("E2E_KEEP") != "1":
        kube.run("delete", "clipprocessor", "-n", NS, NAME, "--wait=true", "--timeout=120s", check=False)
        kube.run("delete", "namespace", NS, "--wait=false", check=False)
    weights.close()


def scaled_object(kube: Kube) -> dict:
    return kube.json("get", "scaledobject", "-n", NS, NAME)


def test_keda_takes_the_scaled_object_and_holds_the_workers_until_the_cache_is_warm(stack):
    kube, watcher = stack["kube"], stack["watcher"]
    job = f"{NAME}-cache-warm-vit-b-32"
    wait("the cache-warm Job to succeed", 300,
         lambda: kube.json("get", "job", "-n", NS, job).get("status", {}).get("succeeded", 0) >= 1)
    completed = ts(kube.json("get", "job", "-n", NS, job)["status"].get("completionTime"))
    # The operator drops KEDA's paused-replicas once the Job is done; KEDA then owns the scale.
    def unpaused_and_ready():
        so = scaled_object(kube)
        paused = "autoscaling.keda.sh/paused-replicas" in (so["metadata"].get("annotations") or {})
        conds = {c["type"]: c["status"] for c in so.get("status", {}).get("conditions", [])}
        # KEDA's status lags the annotation (a first read can still say "ScaledObject is paused"):
        # wait until KEDA itself says it is unpaused and names its HPA.
        ready = conds.get("Ready") == "True" and conds.get("Paused") != "True" and so["status"].get("hpaName")
        return so if ready and not paused else None

    so = wait("the ScaledObject to be unpaused and Ready", 120, unpaused_and_ready)
    hpa = so["status"].get("hpaName")
    assert hpa, f"KEDA made no HPA: {so['status']}"
    assert kube.json("get", "hpa", "-n", NS, hpa)["spec"]["scaleTargetRef"]["name"] == f"{NAME}-worker"
    assert so["spec"]["triggers"][0]["metadata"]["awsEndpoint"] == stack["env"]["AWS_ENDPOINT_URL"]
    assert all(p["created"] >= completed - 1 for p in watcher.pods.values()), \
        "a worker pod started before the cache was warm"
    assert watcher.replicas() == 0
    KEDA["cache_warm_completed"] = completed
    KEDA["hpa"] = hpa


def test_keda_scales_zero_to_n_every_event_enriched_then_back_to_zero(stack):
    kube, mw, watcher, sink = stack["kube"], stack["mw"], stack["watcher"], stack["sink"]
    pics = photos()
    sent_at = time.time()
    sent = mw.send_events(pics, 60, "keda")
    stack["sent"].update(sent)
    # A warm worker drains 60 photos in seconds, before the HPA's first 15 s sync could see them.
    # So the burst is first held in flight for HOLD seconds, as a consumer that died holding it
    # would leave it: KEDA counts in-flight messages (scaleOnInFlight), so it activates and the
    # HPA scales on them; then they return to the queue and the workers take them.
    held = mw.hold(60, HOLD)
    assert held == 60, f"held {held} of 60"
    log(f"sent 60 events, held in flight for {HOLD} s; waiting for KEDA to activate the workers")
    wait("KEDA to scale the Deployment up from 0", 90, lambda: watcher.replicas() > 0)
    activated = time.time()
    # The queue depth KEDA serves through the API server's aggregation layer, as the HPA reads it.
    hpa = kube.json("get", "hpa", "-n", NS, KEDA["hpa"])
    ext = hpa["spec"]["metrics"][0]["external"]["metric"]
    served = json.loads(kube.run("get", "--raw", f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{NS}/"
                                 f"{ext['name']}?labelSelector=scaledobject.keda.sh%2Fname%3D{NAME}").stdout)
    assert [i["value"] for i in served["items"]] in (["60"], ["60000m"]), served
    # 60 messages, 10 per worker, maxInstances 2: only the HPA takes it past the one replica
    # KEDA's activation sets.
    wait("the HPA to scale to maxInstances (2)", HOLD, lambda: watcher.most_replicas() == 2)
    metric = kube.json("get", "hpa", "-n", NS, KEDA["hpa"]).get("status", {}).get("currentMetrics") or []
    sink.collect(set(sent), 400)
    check_enriched(mw, sink, sent, pics)
    assert mw.depth(mw.input) == (0, 0)
    assert all(p["image"] == WORKER_IMAGE for p in watcher.pods.values())
    log("every event enriched; waiting for the HPA stabilisation and KEDA's cooldown (20 s each)")
    wait("KEDA to scale the Deployment to 0", 240, lambda: watcher.replicas() == 0)
    scaled_down = time.time()
    wait("every worker pod to be gone", 120, lambda: all(p.get("gone") for p in watcher.pods.values()))
    for p in watcher.pods.values():
        if p.get("exit_code") is not None:
            assert p["exit_code"] == 0, f"{p['name']} exited {p['exit_code']} ({p.get('reason')})"
    assert not mw.dead_letters()
    KEDA["phases"] = {"sent": sent_at, "held_in_flight_seconds": HOLD, "activated": activated,
                      "scaled_to_zero": scaled_down, "external_metric": served["items"], "hpa_metrics_seen": metric}


def test_the_processor_reports_keda_as_its_scaler(stack):
    cp = stack["kube"].json("get", "clipprocessor", "-n", NS, NAME)
    conds = {c["type"]: c for c in cp["status"]["conditions"]}
    assert conds["Ready"]["status"] == "True", conds
    assert (conds["ScalerReady"]["status"], conds["ScalerReady"]["reason"]) == ("True", "KedaReady"), conds["ScalerReady"]
    assert cp["status"]["replicas"]["desired"] == 0
