#!/usr/bin/env python3
"""`make bench-operator`: one operator replica and 1,000 ClipProcessors in 50 namespaces, on a real
kube-apiserver + etcd (built by scripts/control-plane.sh) and moto's SQS, all on loopback.

Measures, as the issue asks (figures, not assertions):
  1. time from `kubectl apply` of the 1,000 processors until all are Ready; reconcile p50/p99 (from
     the operator's histogram);
  2. scale latency: 100 trials, each filling one random processor's queue at a random moment and
     timing the `deployments/scale` patch in the API server's audit log;
  3. cost at rest over 5 minutes, from the audit log: the operator's requests per minute by verb and
     resource; queue reads per minute (the operator's own counter);
  4. the operator's RSS and CPU at rest and during the burst (creation and trials).

Every processor uses the builtin engine with the seed's defaults (polling every 15 s, 10 messages
per worker), `provisioner: none` and no model cache (no Job). No controller-manager runs, so the
Deployments do not become pods; the operator's work is the same. Prints a table; writes
target/bench/operator.json. Flags shorten it for a quick look (--processors, --rest, --trials).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench-operator {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_out(script: str) -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def wait(what: str, timeout: float, ok) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.5)


class Rig:
    """etcd, kube-apiserver (audit log on), moto and the operator, in one temporary directory."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        bins = script_out("control-plane.sh")
        self.kubectl_bin = script_out("kube-tools.sh") / "kubectl"
        etcd_port, peer, api = free_port(), free_port(), free_port()
        (work / "certs").mkdir()
        self.spawn("etcd", [bins / "etcd", "--data-dir", work / "etcd",
                            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                            "--quota-backend-bytes", str(4 << 30), "--unsafe-no-fsync"])
        subprocess.run(["openssl", "genrsa", "-out", work / "sa.key", "2048"], check=True, capture_output=True)
        token = "clip-bench-admin-token"
        (work / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
        (work / "audit-policy.yaml").write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n")
        self.audit_log = work / "audit.log"
        self.spawn("kube-apiserver", [
            bins / "kube-apiserver", "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--secure-port", str(api), "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--cert-dir", work / "certs", "--token-auth-file", work / "tokens.csv", "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", work / "sa.key", "--service-account-signing-key-file", work / "sa.key",
            "--service-cluster-ip-range", "10.96.0.0/24", "--disable-admission-plugins", "ServiceAccount",
            "--audit-policy-file", work / "audit-policy.yaml", "--audit-log-path", self.audit_log,
            "--audit-log-maxsize", "0"])
        self.kubeconfig = work / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n"
            f"    server: https://127.0.0.1:{api}\n    insecure-skip-tls-verify: true\n"
            f"users:\n- name: admin\n  user:\n    token: {token}\n"
            "contexts:\n- name: b\n  context:\n    cluster: b\n    user: admin\ncurrent-context: b\n")
        log("starting kube-apiserver and etcd")
        wait("kube-apiserver /readyz", 120, lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0)
        moto_port = free_port()
        self.moto = f"http://127.0.0.1:{moto_port}"
        self.spawn("moto", [ROOT / ".venv/bin/moto_server", "-H", "127.0.0.1", "-p", str(moto_port)])
        wait("moto", 60, lambda: socket.socket().connect_ex(("127.0.0.1", moto_port)) == 0)
        self.sqs = boto3.client("sqs", endpoint_url=self.moto, region_name="us-east-1",
                                aws_access_key_id="test", aws_secret_access_key="test")
        self.metrics_port = free_port()

    def spawn(self, name: str, argv, env=None) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                             stderr=open(self.work / f"{name}.log", "w"), env=env)
        self.procs.append(p)
        return p

    def kubectl(self, *args, check=True, input=None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args],
                              check=check, capture_output=True, text=True, input=input)

    def start_operator(self) -> subprocess.Popen:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), AWS_ENDPOINT_URL=self.moto,
                   AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", LOG_LEVEL="info,kube=warn",
                   RESYNC_SECONDS=str(getattr(self, "resync", 300)))
        self.operator = self.spawn("operator", [ROOT / "target/release/clip-operator", "run",
                                                "--metrics-port", str(self.metrics_port), "--identity", "bench"], env)
        return self.operator

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def audit(self) -> list[dict]:
        out = []
        with open(self.audit_log) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def warnings(self, t0: float, t1: float) -> Counter:
        """The operator's WARN lines between t0 and t1, by what they say (processor names cut)."""
        out: Counter = Counter()
        for line in (self.work / "operator.log").read_text(errors="replace").splitlines():
            parts = line.split(None, 2)
            if len(parts) < 3 or parts[1] != "WARN" or "cert bypassed" in line:
                continue
            try:
                t = ts(parts[0])
            except ValueError:
                continue
            if t0 <= t <= t1:
                # "<target>: <message> <fields>": the message's first words.
                out[parts[2].split(": ", 1)[-1][:50]] += 1
        return out

    def close(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


class Sampler(threading.Thread):
    """RSS and CPU time of one process, once a second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def read(self) -> tuple[float, float, int]:
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / CLK
        rss = next(int(l.split()[1]) for l in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                   if l.startswith("VmRSS:"))
        return time.time(), cpu, rss * 1024

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.read())
            except (OSError, StopIteration):
                return
            time.sleep(1)

    def phase(self, t0: float, t1: float) -> dict:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(s) < 2:
            return {}
        cores = (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])
        return {"cpu_cores": round(cores, 3), "rss_max_mib": round(max(x[2] for x in s) / 2**20, 1),
                "rss_end_mib": round(s[-1][2] / 2**20, 1)}


def histogram_quantile(metrics: str, name: str, q: float) -> float:
    """The Prometheus way: linear interpolation inside the bucket that holds the quantile."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1]
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / max(n - prev_n, 1e-9))
        prev_le, prev_n = le, n
    return prev_le


def counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def is_operator(e: dict) -> bool:
    ua = e.get("userAgent", "")
    return e.get("user", {}).get("username") == "admin" and not ua.startswith("kubectl")


def manifests(n: int, namespaces: int) -> str:
    docs = []
    for i in range(n):
        docs.append(f"""apiVersion: lakechain.dev/v1alpha1
kind: ClipProcessor
metadata:
  name: p{i:04d}
  namespace: team-{i % namespaces:02d}
spec:
  source:
    queueUrl: https://sqs.us-east-1.amazonaws.com/123456789012/q{i:04d}
  output:
    topicArn: arn:aws:sns:us-east-1:123456789012:clip-output
  cacheStorage:
    bucket: lakechain-cache
  modelCache:
    none: true
  compute:
    nodePool:
      provisioner: none
  scaling:
    engine: builtin
    cooldownSeconds: 60
""")
    return "---\n".join(docs)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processors", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--rest", type=int, default=300, help="seconds at rest to count requests over")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--resync", type=int, default=300, help="the operator's --resync-seconds")
    ap.add_argument("--keep", action="store_true", help="keep the logs and the audit log")
    ap.add_argument("--out", default=str(ROOT / "target/bench/operator.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clip-bench-operator-"))
    rig = Rig(work)
    rig.resync = args.resync
    try:
        run(rig, args)
    finally:
        rig.close()
        if args.keep:
            log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(rig: Rig, args) -> None:
    n, interval = args.processors, 15
    results: dict = {"processors": n, "resync_s": args.resync, "namespaces": args.namespaces, "polling_interval_s": interval,
                     "machine": f"{cpu_description()}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"}
    rig.kubectl("apply", "--server-side", "-f", str(ROOT / "crds/clipprocessors.lakechain.dev.yaml"))
    rig.kubectl("wait", "--for=condition=Established", "crd/clipprocessors.lakechain.dev", "--timeout=60s")
    ns_docs = "---\n".join(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-{i:02d}\n" for i in range(args.namespaces))
    rig.kubectl("apply", "-f", "-", input=ns_docs)
    log(f"creating {n} SQS queues in moto")
    urls = [rig.sqs.create_queue(QueueName=f"q{i:04d}")["QueueUrl"] for i in range(n)]
    op = rig.start_operator()
    sampler = Sampler(op.pid)
    sampler.start()
    wait("the operator's /metrics", 60, lambda: _ok(rig.metrics))
    wait("the leader lease", 60, lambda: "clip_operator_leader 1" in rig.metrics())

    # 1. Creation burst until every processor is Ready.
    log(f"applying {n} ClipProcessors in {args.namespaces} namespaces")
    t_apply = time.time()
    rig.kubectl("apply", "--server-side", "-f", "-", input=manifests(n, args.namespaces))
    ready = 0
    while ready < n:
        time.sleep(2)
        items = json.loads(rig.kubectl("get", "clipprocessors", "-A", "-o", "json").stdout)["items"]
        ready = sum(any(c["type"] == "Ready" and c["status"] == "True" for c in i.get("status", {}).get("conditions", []))
                    for i in items)
        log(f"{ready}/{n} Ready after {time.time() - t_apply:.0f} s")
        if time.time() - t_apply > 900:
            sys.exit("not all Ready after 15 minutes")
    t_ready = time.time()
    m = rig.metrics()
    results["all_ready_s"] = round(t_ready - t_apply, 1)
    results["reconciles_to_ready"] = counter(m, "clip_operator_reconciles_total")
    results["reconcile_p50_s"] = round(histogram_quantile(m, "clip_operator_reconcile_duration_seconds", 0.5), 3)
    results["reconcile_p99_s"] = round(histogram_quantile(m, "clip_operator_reconcile_duration_seconds", 0.99), 3)
    results["burst_create"] = sampler.phase(t_apply, t_ready)

    # 3. At rest: wait out the creation's tail (a minute), then count.
    log("settling for 60 s, then counting requests at rest")
    time.sleep(60)
    before = len(rig.audit())
    reads0, rec0 = counter(rig.metrics(), "clip_operator_queue_reads_total"), counter(rig.metrics(), "clip_operator_reconciles_total")
    t_rest = time.time()
    for left in range(args.rest, 0, -60):
        log(f"at rest: {left} s to go")
        time.sleep(min(60, left))
    t_rest_end = time.time()
    m = rig.metrics()
    minutes = (t_rest_end - t_rest) / 60
    rest = [e for e in rig.audit()[before:] if is_operator(e) and t_rest <= ts(e["stageTimestamp"]) <= t_rest_end]
    by = Counter(f'{e["verb"]} {e["objectRef"].get("resource", e.get("requestURI", "?"))}'
                 + (f'/{e["objectRef"]["subresource"]}' if e["objectRef"].get("subresource") else "") for e in rest)
    results["rest"] = {
        "seconds": round(t_rest_end - t_rest),
        "requests_per_min": {k: round(v / minutes, 1) for k, v in sorted(by.items())},
        "writes_per_min": round(sum(v for k, v in by.items() if k.split()[0] in ("create", "update", "patch", "delete")
                                    and "leases" not in k) / minutes, 1),
        "queue_reads_per_min": round((counter(m, "clip_operator_queue_reads_total") - reads0) / minutes, 1),
        "expected_queue_reads_per_min": round(n * 60 / interval, 1),
        "reconciles_per_min": round((counter(m, "clip_operator_reconciles_total") - rec0) / minutes, 1),
        "operator_warnings": dict(rig.warnings(t_rest, t_rest_end).most_common(8)),
        **sampler.phase(t_rest, t_rest_end),
    }

    # 2. Scale latency: trials at random moments over 2.5 polling intervals... per trial a
    # different processor, 5 messages (one worker).
    log(f"{args.trials} scale trials at random moments over {interval * 10} s")
    rng = random.Random(7)
    chosen = rng.sample(range(n), args.trials)
    offsets = sorted(rng.uniform(0, interval * 10) for _ in chosen)
    t_trials = time.time()
    sent: dict[str, float] = {}
    for i, off in zip(chosen, offsets):
        delay = t_trials + off - time.time()
        if delay > 0:
            time.sleep(delay)
        rig.sqs.send_message_batch(QueueUrl=urls[i], Entries=[{"Id": str(k), "MessageBody": "{}"} for k in range(5)])
        sent[f"p{i:04d}-worker"] = time.time()
    time.sleep(interval + 10)
    t_trials_end = time.time()
    scaled: dict[str, float] = {}
    for e in rig.audit():
        o = e.get("objectRef", {})
        if e.get("verb") == "patch" and o.get("resource") == "deployments" and o.get("subresource") == "scale" \
                and o.get("name") in sent and e.get("responseStatus", {}).get("code") == 200:
            t = ts(e["stageTimestamp"])
            if t >= sent[o["name"]] and o["name"] not in scaled:
                scaled[o["name"]] = t
    lat = [scaled[k] - sent[k] for k in sent if k in scaled]
    results["scale"] = {
        "trials": len(sent), "scaled": len(lat),
        "p50_s": round(percentile(lat, 0.5), 2) if lat else None,
        "p99_s": round(percentile(lat, 0.99), 2) if lat else None,
        "max_s": round(max(lat), 2) if lat else None,
        "target_p99_s": interval + 2,
        **sampler.phase(t_trials, t_trials_end),
    }
    results["rss_max_mib"] = round(max(s[2] for s in sampler.samples) / 2**20, 1)
    sampler.stop.set()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    log(f"wrote {out}")


def _ok(f) -> bool:
    try:
        f()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
