"""The Argo CD health check on the statuses the operator writes."""
import copy
import pathlib
import shutil

import pytest
import yaml

from health import CHECK_DIR, SCRIPT, health

ROOT = pathlib.Path(__file__).resolve().parents[2]
LUAS = ["lua5.1", "lua5.4"]


def cond(type_, status, reason, message, gen=2):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": gen, "lastTransitionTime": "2026-11-27T10:00:00Z"}


def processor(conditions=None, generation=2, observed=2, **meta):
    obj = {"apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessor",
           "metadata": {"name": "photos", "namespace": "media", "generation": generation, **meta},
           "spec": {"model": "ViT-B/32"}}
    if conditions is not None:
        obj["status"] = {"observedGeneration": observed, "conditions": conditions}
    return obj


SCALED_TO_ZERO = [
    cond("Ready", "True", "Ready", "the processor is ready"),
    cond("Progressing", "False", "Stable", "nothing in progress"),
    cond("Degraded", "False", "AsExpected", "no problems"),
    cond("CacheReady", "True", "Warm", "ViT-B/32 weights cached"),
    cond("NodePoolReady", "True", "Ready", "Karpenter reports the NodePool ready"),
    cond("ScalerReady", "True", "Polling", "0 messages waiting, 0 in flight"),
    cond("WorkersAvailable", "True", "ScaledToZero", "no messages to process: no workers and no GPU nodes"),
]


def with_(conds, **changes):
    out = copy.deepcopy(conds)
    for c in out:
        if c["type"] in changes:
            c.update(changes[c["type"]])
    return out


@pytest.fixture(params=LUAS)
def lua(request):
    if shutil.which(request.param) is None:
        pytest.fail(f"{request.param} is missing: run scripts/sysdeps.sh")
    return request.param


CASES = yaml.safe_load((CHECK_DIR / "health_test.yaml").read_text())["tests"]


@pytest.mark.parametrize("case", CASES, ids=[pathlib.Path(c["inputPath"]).stem for c in CASES])
def test_argocd_health_test_cases(case, lua):
    # The upstream layout: resource_customizations/<group>/<kind>/{health.lua,health_test.yaml}.
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text())
    expected = case["healthStatus"]
    assert health(obj, lua) == (expected["status"], expected["message"])


def test_the_cases_cover_every_health_argo_cd_shows():
    assert {c["healthStatus"]["status"] for c in CASES} == {"Healthy", "Progressing", "Degraded", "Suspended"}


def test_a_suspended_processor_is_suspended_not_degraded_or_progressing(lua):
    msg = "spec.suspend is true: no workers, the queue is not read, the NodePool allows no nodes"
    conds = with_(SCALED_TO_ZERO, Ready={"status": "False", "reason": "Suspended", "message": msg}) + [
        cond("Suspended", "True", "Suspended", msg)]
    assert health(processor(conds), lua) == ("Suspended", msg)
    # Resumed: the operator reports Suspended False, and the processor is healthy again.
    resumed = SCALED_TO_ZERO + [cond("Suspended", "False", "Active", "the scaler follows the queue")]
    assert health(processor(resumed), lua) == ("Healthy", "the processor is ready")
    # A Suspended condition from an older generation does not hide the new one's progress.
    stale = with_(SCALED_TO_ZERO, Ready={"status": "False", "reason": "Suspended", "message": msg}) + [
        cond("Suspended", "True", "Suspended", msg, gen=1)]
    assert health(processor(stale), lua)[0] != "Suspended"


def test_ready_for_the_current_generation_is_healthy_even_at_zero_workers(lua):
    assert health(processor(SCALED_TO_ZERO), lua) == ("Healthy", "the processor is ready")


def test_no_status_yet_is_progressing(lua):
    assert health(processor(None), lua) == ("Progressing", "Waiting for the operator to report status")
    assert health(processor([]), lua)[0] == "Progressing"


def test_a_generation_the_operator_has_not_observed_is_progressing(lua):
    # A fresh `kubectl apply` (generation 3) over a Ready status for generation 2.
    status, message = health(processor(SCALED_TO_ZERO, generation=3, observed=2), lua)
    assert (status, message) == ("Progressing", "Waiting for the operator to reconcile generation 3")


def test_a_ready_condition_left_from_an_older_generation_is_not_healthy(lua):
    conds = with_(SCALED_TO_ZERO, Ready={"observedGeneration": 1})
    assert health(processor(conds), lua)[0] != "Healthy"


def test_scaling_from_zero_is_progressing_with_the_operators_message(lua):
    conds = with_(
        SCALED_TO_ZERO,
        Ready={"status": "False", "reason": "Starting", "message": "WorkersAvailable: 0 of 3 workers ready"},
        Progressing={"status": "True", "reason": "Reconciling", "message": "0 of 3 workers ready"},
        WorkersAvailable={"status": "False", "reason": "Starting", "message": "0 of 3 workers ready"},
    )
    assert health(processor(conds), lua) == ("Progressing", "0 of 3 workers ready")


def test_cache_warming_is_progressing(lua):
    conds = with_(
        SCALED_TO_ZERO,
        Ready={"status": "False", "reason": "Warming", "message": "CacheReady: downloading ViT-L/14 weights"},
        Progressing={"status": "True", "reason": "Reconciling", "message": "downloading ViT-L/14 weights"},
    )
    assert health(processor(conds), lua) == ("Progressing", "downloading ViT-L/14 weights")


def test_degraded_carries_the_condition_message(lua):
    msg = "cache-warm Job failed: Job has reached the specified backoff limit"
    conds = with_(
        SCALED_TO_ZERO,
        Ready={"status": "False", "reason": "Degraded", "message": msg},
        Degraded={"status": "True", "reason": "WarmFailed", "message": msg},
    )
    assert health(processor(conds), lua) == ("Degraded", msg)


def test_an_invalid_spec_is_degraded(lua):
    msg = "modelCache.claimName: PersistentVolumeClaim weights not found in media"
    conds = [cond("Ready", "False", "InvalidSpec", msg), cond("Progressing", "False", "InvalidSpec", "waiting for a valid spec"),
             cond("Degraded", "True", "InvalidSpec", msg)]
    assert health(processor(conds), lua) == ("Degraded", msg)


def test_not_ready_without_progress_or_failure_is_progressing_with_readys_message(lua):
    conds = with_(SCALED_TO_ZERO, Ready={"status": "False", "reason": "NotReady",
                                         "message": "NodePoolReady: Karpenter: NodeClass not found"})
    assert health(processor(conds), lua) == ("Progressing", "NodePoolReady: Karpenter: NodeClass not found")


def test_deletion_is_progressing(lua):
    obj = processor(SCALED_TO_ZERO, deletionTimestamp="2026-11-27T10:05:00Z")
    assert health(obj, lua)[0] == "Progressing"


def test_messages_with_quotes_and_unicode_survive(lua):
    msg = 'KEDA: "aws-sqs-queue" scaler: AccessDenied — not authorized'
    conds = with_(SCALED_TO_ZERO, Degraded={"status": "True", "message": msg})
    assert health(processor(conds), lua) == ("Degraded", msg)


def test_the_argocd_cm_snippet_registers_this_exact_script():
    cm = yaml.safe_load((ROOT / "examples/argocd/argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    key = "resource.customizations.health.lakechain.dev_ClipProcessor"
    assert cm["data"][key].strip() == SCRIPT.read_text().strip()


def test_the_example_applications_point_at_this_repository_layout():
    apps = list(yaml.safe_load_all((ROOT / "examples/argocd/application.yaml").read_text()))
    assert {a["kind"] for a in apps} == {"Application"}
    chart = next(a for a in apps if a["metadata"]["name"] == "clip-operator")
    assert (ROOT / chart["spec"]["source"]["path"] / "Chart.yaml").exists()
    # The values given to the chart must pass its schema: render them with helm.
    import subprocess, tempfile, json
    tools = subprocess.run(["bash", str(ROOT / "scripts/kube-tools.sh")], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        json.dump(chart["spec"]["source"]["helm"]["valuesObject"], f)
        f.flush()
        out = subprocess.run([f"{tools}/helm", "template", "x", str(ROOT / "charts/clip-operator"), "-f", f.name],
                             capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
