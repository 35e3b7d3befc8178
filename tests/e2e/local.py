"""What `make e2e` and `make demo` share: the local cluster (tests/cluster/cluster.sh), the images
`make images` built, the chart, a middleware's queues/bucket/topic on the cluster's moto, Lakechain
events, and the model weights served over HTTP the way a cache-warm Job downloads them."""
from __future__ import annotations

import base64
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import boto3
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("CLIP_FIXTURES", ROOT / "target/fixtures"))
CLUSTER = ROOT / "tests/cluster/cluster.sh"
TAG = os.environ.get("IMAGE_TAG", "dev")
OPERATOR_IMAGE = os.environ.get("OPERATOR_IMAGE", "ghcr.io/clip-operator/clip-operator") + ":" + TAG
WORKER_IMAGE = os.environ.get("WORKER_IMAGE", "ghcr.io/clip-operator/clip-worker") + ":" + TAG
ACCOUNT, REGION = "123456789012", "us-east-1"
# Messages a worker holds at once: what a killed worker can leave to be redelivered.
MAX_IN_FLIGHT = 16
MIME = {".jpg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".bmp": "image/bmp",
        ".tiff": "image/tiff", ".webp": "image/webp", ".pcx": "image/x-pcx"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cluster_env() -> dict[str, str]:
    """The variables `cluster.sh env` prints (KUBECONFIG, AWS_ENDPOINT_URL, ...)."""
    out = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    env = {}
    for line in out.splitlines():
        for part in line.removeprefix("export ").split():
            if "=" in part:
                k, v = part.split("=", 1)
                env[k] = v
    return env


def external_env() -> dict[str, str]:
    """DEMO_CLUSTER=external: a cluster the user names (kind, k3d, EKS) instead of the local one.
    KUBECONFIG as usual; DEMO_AWS_ENDPOINT_URL: an S3/SQS/SNS endpoint both this machine and the
    pods reach (moto or LocalStack); DEMO_HOST: this machine's address as the pods see it (the
    weights are served from here)."""
    missing = [v for v in ("KUBECONFIG", "DEMO_AWS_ENDPOINT_URL", "DEMO_HOST") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"DEMO_CLUSTER=external needs {', '.join(missing)} (see README, Demo)")
    return {"KUBECONFIG": os.environ["KUBECONFIG"], "AWS_ENDPOINT_URL": os.environ["DEMO_AWS_ENDPOINT_URL"],
            "CLIP_CLUSTER_HOST": os.environ["DEMO_HOST"], "CLIP_CLUSTER_CACHE": "none"}


class Kube:
    """kubectl against the local cluster (or any cluster KUBECONFIG names)."""

    def __init__(self, env: dict[str, str]):
        self.env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"]}
        tools = subprocess.run(["bash", str(ROOT / "scripts/kube-tools.sh")], capture_output=True, text=True,
                               check=True).stdout.strip()
        self.kubectl_bin, self.helm_bin = f"{tools}/kubectl", f"{tools}/helm"

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([self.kubectl_bin, *args], input=stdin, capture_output=True, text=True, env=self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, manifest: str | dict) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.run("apply", "--server-side", "--field-manager", "e2e", "-f", "-", stdin=text)

    def helm(self, *args: str) -> str:
        r = subprocess.run([self.helm_bin, *args], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


def wait(what: str, timeout: float, check, every: float = 0.5):
    """Polls `check` until it returns something truthy; raises with `what` on timeout."""
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def load_images(images: list[str]) -> None:
    subprocess.run(["bash", str(CLUSTER), "load", *images], check=True)


def upstream_crds(kube: Kube) -> None:
    """Karpenter's and KEDA's CRDs, as on an EKS cluster with Karpenter (scripts/upstream-crds.sh)."""
    path = subprocess.run(["bash", str(ROOT / "scripts/upstream-crds.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()
    kube.run("apply", "--server-side", "-f", path)


_REGISTRY: list = []


def chart_ref() -> str:
    """The chart and the operator image as users install them: pushed by scripts/release.sh to a
    real OCI registry on loopback (started once per run); the chart is installed from oci:// and
    the node's containerd pulls the operator image from the registry (trust-registry). The worker
    image (gigabytes of LibTorch) still reaches the node with cluster.load (containerd's import)."""
    if not _REGISTRY:
        import atexit
        import tempfile
        sys.path.insert(0, str(ROOT / "tests"))
        from oci_registry import Registry, release
        reg = Registry(Path(tempfile.mkdtemp(prefix="clip-e2e-registry-"))).__enter__()
        atexit.register(reg.__exit__)
        subprocess.run(["bash", str(CLUSTER), "trust-registry", reg.host], check=True)
        log(f"pushing the operator image and the chart to the local OCI registry {reg.host} (scripts/release.sh)")
        _REGISTRY.append((release(f"{reg.host}/clip", "operator", OPERATOR_IMAGE.rsplit(":", 1)[1]), reg.host))
    return _REGISTRY[0][0]


def install_chart(kube: Kube, env: dict[str, str], namespace: str = "clip-system", replicas: int = 2) -> None:
    """The chart from the OCI registry, its operator image pulled from there by the node, the
    locally built worker image, and the cluster's moto as the operator's AWS."""
    upstream_crds(kube)
    endpoint = env["AWS_ENDPOINT_URL"]
    extra = [{"name": "AWS_ENDPOINT_URL", "value": endpoint}, {"name": "AWS_ACCESS_KEY_ID", "value": "testing"},
             {"name": "AWS_SECRET_ACCESS_KEY", "value": "testing"}, {"name": "AWS_REGION", "value": REGION}]
    wrepo, wtag = WORKER_IMAGE.rsplit(":", 1)
    ref = chart_ref()
    kube.helm("upgrade", "--install", "clip-operator", ref, "--plain-http", "-n", namespace,
              "--create-namespace", "--wait", "--timeout", "180s",
              "--set", f"replicaCount={replicas}", "--set", f"worker.image.repository={wrepo}",
              "--set", f"worker.image.tag={wtag}", "--set", "worker.image.pullPolicy=Never",
              "--set", f"worker.awsEndpointUrl={endpoint}", "--set", "logFormat=json",
              "--set-json", f"extraEnv={json.dumps(extra)}")
    # The running operator pods' image came from the registry (a registry digest; an imported
    # image has none). containerd names the digest after the first registry it pulled it from.
    host = _REGISTRY[0][1]
    pods = kube.json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=clip-operator")["items"]
    running = [c for p in pods if not p["metadata"].get("deletionTimestamp")
               for c in p["status"].get("containerStatuses", [])]
    # (On a cluster reused across runs, the names are those of an earlier run's registry.)
    assert running and all(re.match(r"^127\.0\.0\.1:\d+/clip/clip-operator:", c["image"]) for c in running), \
        (host, running)
    assert all(re.match(r"^127\.0\.0\.1:\d+/clip/clip-operator@sha256:[0-9a-f]{64}$", c["imageID"])
               for c in running), [c["imageID"] for c in running]


class Middleware:
    """What a Lakechain middleware gives the processor: input queue (with a dead-letter queue),
    documents and cache buckets, output topic; plus a queue subscribed to the topic (raw
    delivery) to read the enriched events."""

    def __init__(self, endpoint: str, prefix: str):
        kw = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        self.s3, self.sqs, self.sns = (boto3.client(s, **kw) for s in ("s3", "sqs", "sns"))
        self.docs_bucket, self.cache_bucket = f"{prefix}-documents", f"{prefix}-cache"
        for b in (self.docs_bucket, self.cache_bucket):
            self.s3.create_bucket(Bucket=b)
        self.dlq = self.sqs.create_queue(QueueName=f"{prefix}-input-dlq")["QueueUrl"]
        redrive = json.dumps({"deadLetterTargetArn": self.arn(self.dlq), "maxReceiveCount": 5})
        self.input_name = f"{prefix}-input"
        self.input = self.sqs.create_queue(QueueName=self.input_name, Attributes={
            "RedrivePolicy": redrive, "VisibilityTimeout": "60"})["QueueUrl"]
        self.topic = self.sns.create_topic(Name=f"{prefix}-output")["TopicArn"]
        self.sink = self.sqs.create_queue(QueueName=f"{prefix}-sink")["QueueUrl"]
        self.sns.subscribe(TopicArn=self.topic, Protocol="sqs", Endpoint=self.arn(self.sink),
                           Attributes={"RawMessageDelivery": "true"})
        self.etags: dict[str, str] = {}

    def arn(self, url: str) -> str:
        return self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    @property
    def queue_url(self) -> str:
        """The queue's AWS URL, as a ClipProcessor names it (moto resolves it by name)."""
        return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{self.input_name}"

    def upload(self, path: Path, key: str) -> str:
        etag = self.s3.put_object(Bucket=self.docs_bucket, Key=key, Body=path.read_bytes())["ETag"].strip('"')
        self.etags[key] = etag
        return etag

    def send_events(self, photos: list[Path], n: int, prefix: str) -> dict[str, dict]:
        """n Lakechain document-created events over the photos (each a distinct document key);
        returns event id -> event."""
        sent, batch = {}, []
        for i in range(n):
            photo = photos[i % len(photos)]
            key = f"{prefix}/{i:04d}-{photo.name}"
            etag = self.upload(photo, key)
            doc = {"url": f"s3://{self.docs_bucket}/{key}", "type": MIME[photo.suffix], "size": photo.stat().st_size,
                   "etag": etag}
            event = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": "document-created",
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                     "data": {"chainId": str(uuid.uuid4()), "source": doc, "document": doc, "metadata": {},
                              "callStack": ["s3-event-trigger"]}}
            sent[event["id"]] = event
            batch.append({"Id": str(i), "MessageBody": json.dumps(event)})
            if len(batch) == 10:
                self.sqs.send_message_batch(QueueUrl=self.input, Entries=batch)
                batch = []
        if batch:
            self.sqs.send_message_batch(QueueUrl=self.input, Entries=batch)
        return sent

    def drain_sink(self) -> list[tuple[dict, float]]:
        """Enriched events waiting on the sink, with the time SNS delivered each (epoch s)."""
        out = []
        while True:
            msgs = self.sqs.receive_message(QueueUrl=self.sink, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                            AttributeNames=["SentTimestamp"]).get("Messages", [])
            if not msgs:
                return out
            for m in msgs:
                out.append((json.loads(m["Body"]), int(m["Attributes"]["SentTimestamp"]) / 1000))
            self.sqs.delete_message_batch(QueueUrl=self.sink, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])

    def hold(self, n: int, seconds: int, timeout: float = 20) -> int:
        """Takes up to n messages off the input queue without deleting them, so they stay in flight
        for `seconds` (what a consumer that died holding them leaves) and then return. Returns
        how many it holds."""
        held, deadline = 0, time.time() + timeout
        while held < n and time.time() < deadline:
            held += len(self.sqs.receive_message(QueueUrl=self.input, MaxNumberOfMessages=min(10, n - held),
                                                 VisibilityTimeout=seconds, WaitTimeSeconds=1).get("Messages", []))
        return held

    def depth(self, url: str) -> tuple[int, int]:
        a = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

    def dead_letters(self) -> list[dict]:
        out = []
        while True:
            msgs = self.sqs.receive_message(QueueUrl=self.dlq, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                            MessageAttributeNames=["All"]).get("Messages", [])
            if not msgs:
                return out
            out.extend(msgs)
            self.sqs.delete_message_batch(QueueUrl=self.dlq, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])


class WeightsServer:
    """A model directory over HTTP on the cluster's bridge address (what CLIP_WEIGHTS_SOURCE
    points a cache-warm Job at instead of Hugging Face); counts the downloads."""

    def __init__(self, directory: Path, host: str):
        self.downloads: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.downloads.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer((host, 0), partial(Handler, directory=str(directory)))
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def photos() -> list[Path]:
    return sorted(p for p in (FIXTURES / "images").iterdir() if p.suffix in MIME and not p.name.startswith("large"))


PRIORITY_CLASS, PULL_SECRET = "clip-e2e", "clip-e2e-registry"


def pod_policy(kube: Kube, namespace: str) -> None:
    """What a shared cluster's namespace has: a PriorityClass the processor names, a pull secret,
    and a ResourceQuota on requests and limits, so every pod (the cache-warm Job's too) must
    declare its resources to be admitted."""
    kube.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": PRIORITY_CLASS}, "value": 1000, "globalDefault": False})
    auth = base64.b64encode(json.dumps({"auths": {"registry.invalid": {"auth": "dTpw"}}}).encode()).decode()
    kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                "metadata": {"name": PULL_SECRET, "namespace": namespace}, "data": {".dockerconfigjson": auth}})
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "compute", "namespace": namespace},
                "spec": {"hard": {"requests.cpu": "8", "requests.memory": "24Gi", "limits.memory": "48Gi"}}})
    # Until the quota controller has counted the namespace, admission refuses every pod.
    wait("the ResourceQuota to be counted", 60, lambda: kube.json(
        "get", "resourcequota", "-n", namespace, "compute").get("status", {}).get("hard"))


def processor_class(name: str) -> dict:
    """A platform team's ClipProcessorClass for the local node: GPUs on existing nodes (the node
    advertises nvidia.com/gpu), a budget of 2 GPUs, only the worker image built here, the
    namespace's PriorityClass."""
    return {
        "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessorClass", "metadata": {"name": name},
        "spec": {
            "compute": {"nodes": {"nodeSelector": {"kubernetes.io/os": "linux"}}},
            "budget": {"maxGPUs": 2, "maxGPUsPerNamespace": 2},
            "worker": {"allowedImages": [WORKER_IMAGE.rsplit(":", 1)[0] + ":"], "priorityClassName": PRIORITY_CLASS},
        },
    }


def processor(name: str, namespace: str, mw: Middleware, weights_url: str, claim: str,
              class_name: str | None = None, **scaling) -> dict:
    """A GPU ClipProcessor on existing nodes (the local node advertises nvidia.com/gpu): its own
    compute, or `class_name`'s; builtin scaler, shared cache on `claim`, weights from
    `weights_url`, AWS = the cluster's moto."""
    p = _processor(name, namespace, mw, weights_url, claim, **scaling)
    if class_name:
        p["spec"]["className"] = class_name
        del p["spec"]["compute"]
    return p


def _processor(name: str, namespace: str, mw: Middleware, weights_url: str, claim: str, **scaling) -> dict:
    return {
        "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessor",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"queueUrl": mw.queue_url},
            "output": {"topicArn": mw.topic},
            "cacheStorage": {"bucket": mw.cache_bucket},
            "region": REGION,
            "modelCache": {"claimName": claim},
            "compute": {"nodePool": {"provisioner": "none"}},
            "scaling": {"engine": "builtin", "minInstances": 0, "maxInstances": 2, "messagesPerInstance": 10,
                        "pollingIntervalSeconds": 3, "cooldownSeconds": 20, **scaling},
            "worker": {
                # Two workers and the control plane share this machine's 2 cores.
                "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}},
                "batchSize": 8,
                "env": [{"name": "CLIP_WEIGHTS_SOURCE", "value": weights_url},
                        {"name": "AWS_ACCESS_KEY_ID", "value": "testing"},
                        {"name": "AWS_SECRET_ACCESS_KEY", "value": "testing"},
                        {"name": "TORCH_THREADS", "value": "1"},
                        {"name": "MAX_IN_FLIGHT", "value": str(MAX_IN_FLIGHT)},
                        {"name": "PROGRESS_INTERVAL_SECONDS", "value": "5"}],
                # Pod overrides a shared cluster asks for (pod_policy() creates what they name).
                "podLabels": {"team": "e2e"},
                "podAnnotations": {"e2e.lakechain.dev/run": "true"},
                "tolerations": [{"key": "e2e.lakechain.dev/dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                               "whenUnsatisfiable": "ScheduleAnyway",
                                               "labelSelector": {"matchLabels": {"team": "e2e"}}}],
                "priorityClassName": PRIORITY_CLASS,
                "imagePullSecrets": [{"name": PULL_SECRET}],
            },
        },
    }


def cache_volume(kube: Kube, env: dict[str, str], namespace: str, claim: str) -> str:
    """A ReadWriteMany PV + PVC for the model cache: the cluster's NFSv4.1 export, else hostPath.
    Returns which."""
    kind = env["CLIP_CLUSTER_CACHE"]
    path = env["CLIP_CLUSTER_CACHE_PATH"]
    source = ({"nfs": {"server": env["CLIP_CLUSTER_HOST"], "path": path}} if kind == "nfs"
              else {"hostPath": {"path": path, "type": "Directory"}})
    if kind == "nfs":
        source["mountOptions"] = ["nfsvers=4.1"]
    pv = f"{namespace}-{claim}"
    # A run before this one left the volume Released (Retain): free it for the new claim of the
    # same name, as an admin would.
    got = kube.run("get", "pv", pv, "-o", "json", check=False)
    if got.returncode == 0 and json.loads(got.stdout).get("status", {}).get("phase") == "Released":
        kube.run("patch", "pv", pv, "--type", "json", "-p", '[{"op":"remove","path":"/spec/claimRef/uid"}]')
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                         "claimRef": {"namespace": namespace, "name": claim}, **source}})
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                         "resources": {"requests": {"storage": "10Gi"}}}})
    return kind


KEDA_NAMESPACE = "keda"


def install_keda(kube: Kube, load=None) -> dict[str, str]:
    """KEDA built from its Go module (scripts/keda.sh): the upstream manifests rendered from the
    module's config/minimal (CRDs, RBAC, operator, metrics API server and its APIService; no
    admission webhooks) with the local image, and three local adjustments: the operator gets the
    cluster's moto credentials (KEDA's aws pod identity with no role falls back to its own
    credential chain) and no webhook patching (there are no webhooks); as the cluster has no DNS,
    the metrics server dials the operator's Service IP with KEDA's gRPC authority override.
    `load` puts the image on the node (default: the local cluster's). Returns {"version",
    "image"}."""
    image = subprocess.run(["bash", str(ROOT / "scripts/keda.sh"), "image"], capture_output=True, text=True,
                           check=True).stdout.strip()
    keda_dir = subprocess.run(["bash", str(ROOT / "scripts/keda.sh")], capture_output=True, text=True,
                              check=True).stdout.strip()
    (load or load_images)([image])
    docs = [d for d in yaml.safe_load_all(kube.run("kustomize", f"{keda_dir}/config/minimal").stdout) if d]
    creds = [{"name": "AWS_ACCESS_KEY_ID", "value": "testing"}, {"name": "AWS_SECRET_ACCESS_KEY", "value": "testing"},
             {"name": "AWS_REGION", "value": REGION}]
    adapter = None
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            c["image"], c["imagePullPolicy"] = image, "Never"
            if d["metadata"]["name"] == "keda-operator":
                c["env"] = [e for e in c.get("env", []) if e["name"] not in {x["name"] for x in creds}] + creds
                # No admission webhooks in config/minimal: nothing to inject a CA bundle into
                # (KEDA's Helm chart sets the same when its webhooks are off).
                c["args"] = [a for a in c["args"] if not a.startswith("--enable-webhook-patching")] + [
                    "--enable-webhook-patching=false"]
        if d["metadata"]["name"] == "keda-metrics-apiserver":
            adapter = d
    assert adapter is not None, "config/minimal renders keda-metrics-apiserver"
    rest = [d for d in docs if d is not adapter]
    # CRDs first (their size needs server-side apply), then the rest.
    crds = [d for d in rest if d["kind"] == "CustomResourceDefinition"]
    kube.run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(crds))
    for d in crds:
        kube.run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{d['metadata']['name']}")
    kube.run("apply", "--server-side", "--force-conflicts", "-f", "-",
             stdin=yaml.safe_dump_all([d for d in rest if d["kind"] != "CustomResourceDefinition"]))
    ip = kube.json("get", "service", "-n", KEDA_NAMESPACE, "keda-operator")["spec"]["clusterIP"]
    c = adapter["spec"]["template"]["spec"]["containers"][0]
    c["args"] = [a for a in c["args"] if not a.startswith("--metrics-service-")] + [
        f"--metrics-service-address={ip}:9666",
        f"--metrics-service-grpc-authority=keda-operator.{KEDA_NAMESPACE}.svc.cluster.local"]
    kube.run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump(adapter))
    for name in ("keda-operator", "keda-metrics-apiserver"):
        kube.run("rollout", "status", "-n", KEDA_NAMESPACE, f"deployment/{name}", "--timeout=180s")
    wait("the external metrics API (KEDA's APIService) to be Available", 120, lambda: any(
        c["type"] == "Available" and c["status"] == "True"
        for c in kube.json("get", "apiservice", "v1beta1.external.metrics.k8s.io").get("status", {})
        .get("conditions", [])), every=2)
    return {"version": os.path.basename(keda_dir), "image": image}
