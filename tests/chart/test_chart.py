"""The Helm chart: lint, render with default and non-default values, validate every object
against the Kubernetes schemas, the values schema, the CRD copy, least-privilege RBAC, and that
the Deployment only sets settings the operator reads."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/clip-operator"
K8S = "1.35.0"
OPERATOR = pathlib.Path(os.environ.get("CLIP_OPERATOR_BIN", ROOT / "target/release/clip-operator"))


@pytest.fixture(scope="session")
def helm() -> str:
    tools = subprocess.run(["bash", str(ROOT / "scripts/kube-tools.sh")], capture_output=True,
                           text=True, check=True).stdout.strip()
    return f"{tools}/helm"


def template(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "clip", str(CHART), "--namespace", "clip-system",
                           "--include-crds", *args], capture_output=True, text=True)


def render(helm: str, *args: str) -> list[dict]:
    out = template(helm, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_is_clean(helm):
    for extra in ([], ["-f", str(ROOT / "tests/chart/values-full.yaml")]):
        out = subprocess.run([helm, "lint", "--strict", str(CHART), *extra], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(ROOT / "tests/chart/values-full.yaml")]],
                         ids=["default", "full"])
def test_every_rendered_object_is_valid_kubernetes(helm, values):
    docs = render(helm, *values)
    kinds = sorted({d["kind"] for d in docs})
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator kinds: checked below
        kubernetes_validate.validate(doc, K8S, strict=True)
    expected = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
                "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount",
                "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    if values:
        expected |= {"ConfigMap", "NetworkPolicy", "PodMonitor", "PrometheusRule", "ServiceMonitor"}
    assert set(kinds) == expected


def test_default_deployment_is_hardened_and_highly_available(helm):
    (d,) = by_kind(render(helm), "Deployment")
    spec = d["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert d["spec"]["replicas"] >= 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    (pdb,) = by_kind(render(helm), "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    # The replicas prefer different nodes and zones (soft, so a one-node cluster still runs both).
    selector = d["spec"]["selector"]["matchLabels"]
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    (spread,) = spec["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"]) == ("topology.kubernetes.io/zone", "ScheduleAnyway")
    assert spread["labelSelector"]["matchLabels"] == selector
    (d,) = by_kind(render(helm, "--set", "spreadReplicas=false"), "Deployment")
    assert "affinity" not in d["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in d["spec"]["template"]["spec"]


def test_values_reach_the_operator(helm):
    docs = render(helm, "-f", str(ROOT / "tests/chart/values-full.yaml"))
    (d,) = by_kind(docs, "Deployment")
    spec = d["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com/clip-operator:v0.1.0-rc1"
    assert env["WORKER_IMAGE"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com/clip-worker:v0.1.0-rc1-cu130"
    assert env["WORKER_IMAGE_PULL_POLICY"] == "Always"
    assert env["WORKER_IMAGE_PULL_SECRETS"] == "ecr-pull,mirror-pull"
    assert spec["imagePullSecrets"] == [{"name": "ecr-pull"}]
    assert d["metadata"]["name"] == "clip-controller", "fullnameOverride"
    assert spec["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert spec["volumes"] == [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}]
    assert c["volumeMounts"][0]["mountPath"] == "/etc/ssl/corporate"
    (np,) = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    assert np["spec"]["ingress"][0]["ports"] == [{"port": c["ports"][0]["name"], "protocol": "TCP"}]
    assert np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert "> 5000" in alerts["ClipQueueNotDraining"]["expr"]
    assert "{{ $labels.namespace }}" in alerts["ClipProcessorDegraded"]["annotations"]["summary"], \
        "Prometheus templates reach the rule unexpanded"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for crd in by_kind(docs, "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {}), "crds.keep=false"
    endpoint = "https://vpce-0123456789abcdef0.sqs.us-east-1.vpce.amazonaws.com"
    assert env["WORKER_AWS_ENDPOINT_URL"] == endpoint
    assert env["AWS_ENDPOINT_URL"] == endpoint and env["AWS_STS_REGIONAL_ENDPOINTS"] == "regional"
    assert env["LOG_FORMAT"] == "text" and env["LOG_LEVEL"] == "clip_operator=debug,info"
    assert env["METRICS_PORT"] == "9090" and c["ports"][0]["containerPort"] == 9090
    assert env["LEASE_NAME"] == "clip-controller-leader" and env["LEASE_SECONDS"] == "30"
    assert spec["serviceAccountName"] == "clip-controller"
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["tolerations"][0]["key"] == "CriticalAddonsOnly"
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/clip-operator"
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clip-controller", "namespace": "clip-system"}]
    (svc,) = by_kind(docs, "Service")
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pm,) = by_kind(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["clip-operator.json"])
    assert shipped == json.loads((CHART / "dashboards/clip-operator.json").read_text())


def test_worker_pod_monitor_selects_the_pods_the_operator_creates(helm):
    (pm,) = by_kind(render(helm, "--set", "metrics.workerPodMonitor.enabled=true"), "PodMonitor")
    example = ROOT / "examples/karpenter-efs-builtin.yaml"
    out = subprocess.run([str(OPERATOR), "render", "-f", str(example)], capture_output=True, text=True, check=True)
    (worker,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = [p["name"] for p in worker["spec"]["template"]["spec"]["containers"][0]["ports"]]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert any(r["sourceLabels"] == ["__meta_kubernetes_pod_label_lakechain_dev_processor"]
               for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"])
    assert "lakechain.dev/processor" in labels


def test_every_env_the_chart_sets_is_read_by_the_operator(helm):
    (d,) = by_kind(render(helm), "Deployment")
    help_text = subprocess.run([str(OPERATOR), "run", "--help"], capture_output=True, text=True, check=True).stdout
    read = set(re.findall(r"\[env: ([A-Z_]+)=?", help_text))
    for e in d["spec"]["template"]["spec"]["containers"][0]["env"]:
        assert e["name"] in read, f"the chart sets {e['name']}, which `clip-operator run` does not read"


@pytest.mark.parametrize("args,message", [
    (["--set", "unknownKey=1"], "additional properties 'unknownKey' not allowed"),
    (["--set", "metrics.serviceMonitor.scrapeTimeout=10s"], "additional properties 'scrapeTimeout' not allowed"),
    (["--set", "replicaCount=two"], "/replicaCount"),
    (["--set", "replicaCount=0"], "/replicaCount"),
    (["--set", "logFormat=xml"], "/logFormat"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "serviceAccount.roleArn=arn:aws:iam::123:user/me"], "/serviceAccount/roleArn"),
    (["--set", "metrics.port=80"], "/metrics/port"),
    (["--set", "leaderElection.leaseSeconds=1"], "/leaderElection/leaseSeconds"),
    (["--set", "resources.requests.memory=lots"], "/resources/requests/memory"),
    (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
    (["--set", "podDisruptionBudget.enabled=maybe"], "/podDisruptionBudget/enabled"),
    (["--set-json", "nodeSelector={\"a\": 1}"], "/nodeSelector/a"),
    (["--set", "worker.awsEndpointUrl=localhost:5000"], "/worker/awsEndpointUrl"),
    (["--set-json", "extraEnv=[{\"value\": \"x\"}]"], "/extraEnv/0"),
    (["--set", "crds.install=maybe"], "/crds/install"),
    (["--set", "networkPolicy.enabeld=true"], "additional properties 'enabeld' not allowed"),
    (["--set", "metrics.prometheusRule.backlog=0"], "/metrics/prometheusRule/backlog"),
    (["--set-json", "worker.imagePullSecrets=[{\"name\": \"Not A Name\"}]"], "/worker/imagePullSecrets/0/name"),
])
def test_values_schema_rejects_bad_values(helm, args, message):
    out = template(helm, *args)
    assert out.returncode != 0, f"{args} accepted"
    assert message in out.stderr, out.stderr


def test_every_value_is_documented_and_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, schema_node, path):
        assert schema_node.get("additionalProperties") is False, f"{path or '<root>'}: schema allows unknown keys"
        for key, value in node.items():
            assert key in schema_node["properties"], f"{path}{key} is not in values.schema.json"
            sub = schema_node["properties"][key]
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub, f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")

    # Line by line: every key is documented by a "# --" comment right above it, or sits inside a
    # block whose key is (e.g. resources.requests.cpu under "# -- Operator container resources.").
    documented_blocks: list[tuple[int, bool]] = []  # (indent, documented)
    comments: list[str] = []  # the comment block right above the current line
    for line in (CHART / "values.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if m:
            indent = len(m.group(1))
            while documented_blocks and documented_blocks[-1][0] >= indent:
                documented_blocks.pop()
            here = any(c.startswith("# --") for c in comments)
            inherited = any(d for _, d in documented_blocks)
            is_parent = line.rstrip().endswith(":")
            assert here or inherited or is_parent, f"values.yaml: {line.strip()} is not documented"
            documented_blocks.append((indent, here))
        comments = comments + [line.strip()] if line.strip().startswith("#") else []


def test_the_chart_crds_are_the_generated_ones(helm):
    rendered = {c["metadata"]["name"]: c for c in by_kind(render(helm), "CustomResourceDefinition")}
    generated = sorted((ROOT / "crds").glob("*.lakechain.dev.yaml"))
    assert {p.name.removesuffix(".yaml") for p in generated} == set(rendered) == {
        "clipprocessors.lakechain.dev", "clipprocessorclasses.lakechain.dev"}
    for path in generated:
        assert (CHART / "files" / path.name).read_bytes() == path.read_bytes(), \
            "charts/clip-operator/files/ is stale: make crd"
        # The template renders it unchanged but for Helm's labels and the keep annotation.
        want = yaml.safe_load(path.read_text())
        crd = dict(rendered[want["metadata"]["name"]])
        meta = crd.pop("metadata")
        assert crd == {k: v for k, v in want.items() if k != "metadata"}
        assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert not by_kind(render(helm, "--set", "crds.install=false"), "CustomResourceDefinition")


def test_the_class_admission_policy_binds_every_class_as_its_parameter(helm):
    docs = render(helm)
    (policy,) = by_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert policy["spec"]["paramKind"] == {"apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessorClass"}
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    assert binding["spec"]["validationActions"] == ["Deny"]
    # Every validation is about the processor's own class only.
    for v in policy["spec"]["validations"]:
        assert v["expression"].startswith("!variables.mine"), v["expression"]
    off = render(helm, "--set", "classes.admissionPolicy=false")
    assert not by_kind(off, "ValidatingAdmissionPolicy") and not by_kind(off, "ValidatingAdmissionPolicyBinding")


def test_classes_required_reaches_the_operator(helm):
    def env(docs):
        (d,) = by_kind(docs, "Deployment")
        return {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "REQUIRE_CLASS" not in env(render(helm))
    assert env(render(helm, "--set", "classes.required=true"))["REQUIRE_CLASS"] == "true"


def test_the_chart_works_as_a_subchart(helm, tmp_path):
    """A platform repository's umbrella chart: `global` values and a name override pass the
    strict schema."""
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    (parent / "Chart.yaml").write_text("apiVersion: v2\nname: platform\nversion: 1.0.0\n")
    (parent / "values.yaml").write_text(
        "global:\n  imageRegistry: registry.example.com\nclip-operator:\n  nameOverride: clip\n")
    subprocess.run(["cp", "-r", str(CHART), str(parent / "charts/clip-operator")], check=True)
    out = subprocess.run([helm, "template", "platform", str(parent), "--namespace", "clip-system"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (d,) = by_kind(docs, "Deployment")
    assert d["metadata"]["name"] == "platform-clip"


def test_the_chart_readme_is_generated_from_values(tmp_path):
    """charts/clip-operator/README.md is what helm-docs makes of values.yaml's comments now."""
    helm_docs = subprocess.run(["bash", str(ROOT / "scripts/go-tools.sh"), "helm-docs"], capture_output=True,
                               text=True, check=True).stdout.strip()
    copy = tmp_path / "charts/clip-operator"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(CHART), str(copy)], check=True)
    (copy / "README.md").unlink()
    subprocess.run([helm_docs, "--chart-search-root", str(tmp_path / "charts"), "--template-files",
                    "README.md.gotmpl"], capture_output=True, check=True)
    assert (copy / "README.md").read_text() == (CHART / "README.md").read_text(), \
        "charts/clip-operator/README.md is stale: make chart-docs"
    readme = (CHART / "README.md").read_text()
    for key in ["crds.install", "worker.imagePullSecrets", "networkPolicy.enabled", "metrics.prometheusRule.enabled"]:
        assert f"| {key} |" in readme, key


def test_the_packaged_chart_renders_like_the_directory(helm, tmp_path):
    """`make chart`: helm package; what users pull is what the tests render."""
    out = subprocess.run([helm, "package", str(CHART), "-d", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (tgz,) = tmp_path.glob("clip-operator-*.tgz")
    packaged = subprocess.run([helm, "template", "clip", str(tgz), "--namespace", "clip-system"],
                              capture_output=True, text=True, check=True).stdout
    assert packaged == template(helm).stdout


def test_rbac_is_least_privilege(helm):
    docs = render(helm)
    rules = {}
    tenant = [r for r in by_kind(docs, "ClusterRole")
              if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"]["labels"])]
    assert sorted(r["metadata"]["name"].rsplit("-", 1)[1] for r in tenant) == ["edit", "view"]
    edit = next(r for r in tenant if r["metadata"]["name"].endswith("-edit"))
    assert [x["resources"] for x in edit["rules"]] == [["clipprocessors"]], "tenants never edit classes"
    view = next(r for r in tenant if r["metadata"]["name"].endswith("-view"))
    assert all(set(x["verbs"]) == {"get", "list", "watch"} for x in view["rules"])
    for role in [r for r in by_kind(docs, "ClusterRole") if r not in tenant] + by_kind(docs, "Role"):
        for r in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in r[field], f"{role['metadata']['name']}: wildcard in {field}"
            assert "resourceNames" not in r or r["resourceNames"]
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    rules.setdefault((role["kind"], g, res), set()).update(r["verbs"])
    # Exactly what the operator touches (issue 6's list); anything else is a review item.
    assert set(rules) == {
        ("ClusterRole", "lakechain.dev", "clipprocessors"),
        ("ClusterRole", "lakechain.dev", "clipprocessors/status"),
        ("ClusterRole", "lakechain.dev", "clipprocessorclasses"),
        ("ClusterRole", "lakechain.dev", "clipprocessors/finalizers"),
        ("ClusterRole", "apps", "deployments"),
        ("ClusterRole", "apps", "deployments/scale"),
        ("ClusterRole", "batch", "jobs"),
        ("ClusterRole", "", "persistentvolumeclaims"),
        ("ClusterRole", "", "persistentvolumes"),
        ("ClusterRole", "", "serviceaccounts"),
        ("ClusterRole", "", "services"),
        ("ClusterRole", "policy", "poddisruptionbudgets"),
        ("ClusterRole", "autoscaling", "horizontalpodautoscalers"),
        ("ClusterRole", "events.k8s.io", "events"),
        ("ClusterRole", "karpenter.sh", "nodepools"),
        ("ClusterRole", "keda.sh", "scaledobjects"),
        ("ClusterRole", "keda.sh", "triggerauthentications"),
        ("Role", "coordination.k8s.io", "leases"),
    }
    for key, verbs in rules.items():
        assert not verbs & {"escalate", "bind", "impersonate"}, key
    assert "create" not in rules[("ClusterRole", "lakechain.dev", "clipprocessors")], "users create processors"
    assert "delete" not in rules[("ClusterRole", "lakechain.dev", "clipprocessors")]
    (role,) = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "clip-system", "leases only in the release namespace"


def test_notes_tell_the_user_what_to_do_next(helm):
    # helm template does not render NOTES; `helm install --dry-run` does.
    out = subprocess.run([helm, "install", "clip", str(CHART), "--dry-run=client", "--namespace", "clip-system"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kubectl get clipprocessors -A" in out.stdout
    assert "serviceAccount.roleArn is empty" in out.stdout


def test_artifact_hub_annotations_parse_and_their_example_is_a_valid_processor():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    notes = chart["annotations"]
    app = chart["appVersion"]
    images = yaml.safe_load(notes["artifacthub.io/images"])
    assert [i["image"].rsplit(":", 1)[1] for i in images] == [app, app], "images tagged with appVersion"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [i["image"].rsplit(":", 1)[0] for i in images] == [values["image"]["repository"],
                                                               values["worker"]["image"]["repository"]]
    crds = yaml.safe_load(notes["artifacthub.io/crds"])
    assert sorted(c["name"] for c in crds) == sorted(
        yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.lakechain.dev.yaml"))
    (example,) = yaml.safe_load(notes["artifacthub.io/crdsExamples"])
    out = subprocess.run([str(OPERATOR), "render", "-f", "-"], input=yaml.safe_dump(example),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert chart["annotations"]["artifacthub.io/license"] == "Apache-2.0"


def test_watch_namespaces_bind_the_operator_in_those_namespaces_only(helm):
    docs = render(helm, "--set", "watchNamespaces={team-a,team-b}")
    (d,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WATCH_NAMESPACES"] == "team-a,team-b"
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    cluster_role = next(r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == crb["roleRef"]["name"])
    # Cluster-wide, only what is cluster-scoped.
    assert sorted(res for r in cluster_role["rules"] for res in r["resources"]) == [
        "clipprocessorclasses", "nodepools", "persistentvolumes"]
    everywhere = render(helm)
    (crb,) = by_kind(everywhere, "ClusterRoleBinding")
    assert not crb["roleRef"]["name"].endswith("-cluster"), "by default one binding for every namespace"
    assert not [b for b in by_kind(everywhere, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
