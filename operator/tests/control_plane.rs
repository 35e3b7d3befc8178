//! The operator against a real control plane (kube-apiserver + etcd built from Go modules), driven
//! with real kubectl, with moto's SQS behind the builtin scaler. One control plane, scenarios in
//! order; each asserts what a user would check with kubectl.
//!
//! No kube-controller-manager runs, so Deployments get no pods and garbage collection does not
//! happen: namespaced children are checked for their owner references instead.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ControlPlane, Moto, Operator, argo_health, path};

const NS: &str = "media";
const T: Duration = Duration::from_secs(60);

fn manifest(extra: &str) -> String {
    format!(
        r#"apiVersion: lakechain.dev/v1alpha1
kind: ClipProcessor
metadata:
  name: photos
  namespace: {NS}
spec:
  source:
    queueUrl: https://sqs.us-east-1.amazonaws.com/123456789012/clip-input
  output:
    topicArn: arn:aws:sns:us-east-1:123456789012:clip-output
  cacheStorage:
    bucket: lakechain-cache
  modelCache:
    efs:
      fileSystemId: fs-0123456789abcdef0
      accessPointId: fsap-0123456789abcdef0
  serviceAccount:
    roleArn: arn:aws:iam::123456789012:role/clip-worker
{extra}"#
    )
}

/// The scaling section most scenarios use: fast polling, short cooldown.
fn scaling(engine: &str, max: i32) -> String {
    format!(
        "  scaling:\n    engine: {engine}\n    maxInstances: {max}\n    pollingIntervalSeconds: 1\n    cooldownSeconds: 3\n"
    )
}

fn condition<'a>(cp: &'a Value, t: &str) -> Option<&'a Value> {
    cp["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
}

/// The claim a pod template mounts (the model cache).
fn claim_of(template: &Value) -> String {
    template["spec"]["volumes"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        })
        .unwrap_or_default()
        .to_string()
}

fn replicas(cp: &ControlPlane) -> i64 {
    cp.get(&["deployment", "photos-worker", "-n", NS])
        .map_or(-1, |d| d["spec"]["replicas"].as_i64().unwrap_or(-1))
}

fn gpu_limit(np: &Value) -> String {
    np["spec"]["limits"]["nvidia.com/gpu"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| np["spec"]["limits"]["nvidia.com/gpu"].to_string())
}

fn node_pool(cp: &ControlPlane) -> Option<Value> {
    let list = cp.get(&[
        "nodepools.karpenter.sh",
        "-l",
        "lakechain.dev/processor=photos,lakechain.dev/processor-namespace=media",
    ])?;
    list["items"].as_array()?.first().cloned()
}

/// The tests share the machine's two cores: one control plane at a time keeps the lease and
/// cooldown timings meaningful.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn upstream_crds(cp: &ControlPlane) {
    let upstream = std::process::Command::new("bash")
        .arg(path("scripts/upstream-crds.sh"))
        .output()
        .unwrap();
    let upstream = String::from_utf8(upstream.stdout).unwrap();
    cp.ok(&["apply", "-f", upstream.trim()]);
}

/// Writes a Job's status as the job controller would on success (none runs here).
fn job_succeeded(cp: &ControlPlane, job: &str) {
    cp.ok(&[
        "patch",
        "job",
        job,
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"startTime":"2026-01-01T00:00:00Z","succeeded":1}}"#,
    ]);
}

/// `kubectl delete` the processor; its finalizer must run and remove the NodePool.
fn delete_processor(cp: &ControlPlane, node_pool: &str) {
    cp.ok(&[
        "delete",
        "clipprocessor",
        "photos",
        "-n",
        NS,
        "--wait=false",
    ]);
    cp.wait_gone(
        "the ClipProcessor (finalizer ran)",
        T,
        &["clipprocessor", "photos", "-n", NS],
    );
    cp.wait_gone("the NodePool", T, &["nodepools.karpenter.sh", node_pool]);
}

/// Our CRD and the upstream Karpenter/KEDA ones, established.
fn crds(cp: &ControlPlane) {
    cp.ok(&["apply", "-f", path("crds").to_str().unwrap()]);
    upstream_crds(cp);
    for crd in [
        "clipprocessors.lakechain.dev",
        "nodepools.karpenter.sh",
        "ec2nodeclasses.karpenter.k8s.aws",
        "scaledobjects.keda.sh",
        "triggerauthentications.keda.sh",
    ] {
        established(cp, crd);
    }
}

/// Waits until the API server serves this CRD.
fn established(cp: &ControlPlane, crd: &str) {
    cp.ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        &format!("crd/{crd}"),
    ]);
}

/// `helm install` of the chart in this checkout as release clip-operator in clip-system, with
/// `extra` arguments; fails the test if helm does. Returns helm's output (the notes).
fn helm_install(cp: &ControlPlane, extra: &[&str]) -> String {
    let chart = path("charts/clip-operator");
    let mut args = vec![
        "install",
        "clip-operator",
        chart.to_str().unwrap(),
        "--namespace",
        "clip-system",
        "--create-namespace",
    ];
    args.extend_from_slice(extra);
    let out = cp.helm(&args);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubeconfig with the token of the chart's ServiceAccount: the operator then runs with exactly
/// the chart's RBAC.
fn chart_kubeconfig(cp: &ControlPlane) -> std::path::PathBuf {
    let token = cp.ok(&[
        "create",
        "token",
        "clip-operator",
        "-n",
        "clip-system",
        "--duration=1h",
    ]);
    cp.kubeconfig_for("clip-operator", token.trim())
}

#[test]
fn operator_on_a_real_control_plane() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // --- CRDs: ours and the upstream Karpenter/KEDA ones, so every object we emit is validated.
    crds(&cp);
    cp.ok(&["create", "namespace", NS]);
    // `kubectl explain` describes the kind, not the Rust type it was derived from.
    let explain = cp.ok(&["explain", "clipprocessor"]);
    assert!(
        explain.contains("A CLIP image processor") && !explain.contains("Auto-generated"),
        "{explain}"
    );

    // --- Invalid manifests are rejected by the API server with the CEL or schema message, and
    // `clip-operator render` refuses each of them with the same words; what one accepts, so
    // does the other.
    let settings = clip_operator::reconcile::validate::OperatorSettings::default();
    for good in [manifest(""), manifest(&scaling("keda", 1000))] {
        let out = cp.apply(&good.replace("name: photos", "name: accepted"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        clip_operator::render::render(&good, &settings).expect("render accepts it too");
    }
    cp.ok(&[
        "delete",
        "clipprocessor",
        "accepted",
        "-n",
        NS,
        "--wait=false",
    ]);
    for (what, bad, message) in [
        (
            "no workers at most",
            manifest("  scaling:\n    maxInstances: 0\n"),
            "spec.scaling.maxInstances: Invalid value: 0: spec.scaling.maxInstances in body should be greater than or equal to 1",
        ),
        (
            "a string for a number",
            manifest("  scaling:\n    maxInstances: \"5\"\n"),
            "spec.scaling.maxInstances: Invalid value: \"string\": spec.scaling.maxInstances in body must be of type integer: \"string\"",
        ),
        (
            "a misspelt field",
            manifest("  scaling:\n    engin: keda\n"),
            "unknown field \"spec.scaling.engin\"",
        ),
        (
            "a bucket name too long",
            manifest("").replace("bucket: lakechain-cache", &format!("bucket: {}", "b".repeat(64))),
            "spec.cacheStorage.bucket: Too long: may not be more than 63 bytes",
        ),
        (
            "no source",
            manifest("").replace("  source:\n    queueUrl: https://sqs.us-east-1.amazonaws.com/123456789012/clip-input\n", ""),
            "spec.source: Required value",
        ),
        (
            "no instance type",
            manifest("  compute:\n    instanceTypes: []\n"),
            "spec.compute.instanceTypes: Invalid value: 0: spec.compute.instanceTypes in body should have at least 1 items",
        ),
        (
            "min > max",
            manifest("  scaling:\n    minInstances: 6\n    maxInstances: 5\n"),
            "scaling.minInstances must not be greater than scaling.maxInstances",
        ),
        (
            "unknown model",
            manifest("  model: ViT-H/14\n"),
            "Unsupported value: \"ViT-H/14\"",
        ),
        (
            "two cache kinds",
            manifest("").replace("    efs:\n", "    claimName: weights\n    efs:\n"),
            "modelCache: set exactly one of efs, claimName or none: true",
        ),
        (
            "bad ARN",
            manifest("").replace(
                "arn:aws:sns:us-east-1:123456789012:clip-output",
                "arn:aws:sqs:oops",
            ),
            "output.topicArn must be an SNS topic ARN",
        ),
        (
            "bad role",
            manifest("").replace("role/clip-worker", "user/someone"),
            "serviceAccount.roleArn must be an IAM role ARN",
        ),
        (
            "long name",
            manifest("").replace("name: photos", &format!("name: {}", "p".repeat(44))),
            "metadata.name",
        ),
    ] {
        let out = cp.apply(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(message), "{what}: {err}");
        let offline = clip_operator::render::render(&bad, &settings)
            .expect_err(&format!("render accepts what the API server refused ({what})"));
        assert!(offline.contains(message), "{what}: render says {offline}");
    }

    // --- The operator and a real queue.
    let moto = Moto::start();
    let sqs = rt.block_on(support::sqs(&moto));
    let queue = rt
        .block_on(sqs.create_queue().queue_name("clip-input").send())
        .unwrap()
        .queue_url
        .unwrap();
    let mut op_a = Operator::start(&cp, &moto, "operator-a");

    // --- Create: every child, status, printer columns.
    let out = cp.apply(&(manifest("") + &scaling("builtin", 5)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cr = cp.wait(
        "status of the new processor",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| {
            v["status"]["observedGeneration"] == 1
                && condition(v, "ScalerReady").is_some_and(|c| c["status"] == "True")
        },
    );
    let uid = cr["metadata"]["uid"].as_str().unwrap().to_string();
    // Prometheus is told it gets OpenMetrics, which is what prometheus-client writes.
    let exposition = op_a.metrics();
    assert!(
        exposition
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{exposition}"
    );
    assert!(exposition.trim_end().ends_with("# EOF"), "{exposition}");
    for t in [
        "Ready",
        "Progressing",
        "Degraded",
        "CacheReady",
        "NodePoolReady",
        "ScalerReady",
        "WorkersAvailable",
    ] {
        let c = condition(&cr, t).unwrap_or_else(|| panic!("no {t} condition"));
        assert_eq!(c["observedGeneration"], 1, "{t}");
    }
    assert_eq!(cr["metadata"]["finalizers"][0], "lakechain.dev/cleanup");
    let sa = cp
        .get(&["serviceaccount", "photos-worker", "-n", NS])
        .expect("ServiceAccount");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/clip-worker"
    );
    let d = cp
        .get(&["deployment", "photos-worker", "-n", NS])
        .expect("Deployment");
    assert_eq!(d["spec"]["replicas"], 0, "created at zero");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(pod["securityContext"]["runAsUser"], 1000);
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"],
        "true"
    );
    let job = cp
        .get(&["job", "photos-cache-warm-vit-b-32", "-n", NS])
        .expect("cache-warm Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "fetch-weights"
    );
    let pvc_name = claim_of(&d["spec"]["template"]);
    assert!(pvc_name.starts_with("photos-model-cache-"), "{pvc_name}");
    let pvc = cp.get(&["pvc", &pvc_name, "-n", NS]).expect("PVC");
    for child in [&sa, &d, &job, &pvc] {
        let owner = &child["metadata"]["ownerReferences"][0];
        assert_eq!(
            (
                owner["uid"].as_str(),
                owner["kind"].as_str(),
                owner["controller"].as_bool()
            ),
            (Some(uid.as_str()), Some("ClipProcessor"), Some(true))
        );
    }
    let pv_name = pvc["spec"]["volumeName"].as_str().unwrap().to_string();
    let pv = cp.get(&["pv", &pv_name]).expect("PersistentVolume");
    assert_eq!(
        pv["spec"]["csi"]["volumeHandle"],
        "fs-0123456789abcdef0::fsap-0123456789abcdef0"
    );
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    let np = node_pool(&cp).expect("NodePool");
    assert_eq!(gpu_limit(&np), "5");
    assert_eq!(np["spec"]["disruption"]["consolidationPolicy"], "WhenEmpty");
    let table = cp.ok(&["get", "clipprocessors", "-n", NS]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "MODEL", "READY", "REPLICAS", "QUEUE", "AGE"]
    );
    assert!(
        table.contains("ViT-B/32") && table.contains("0/0"),
        "{table}"
    );

    // --- The builtin scaler starts workers only once the cache-warm Job has filled the cache
    // (no job controller runs here: its status is written as it would be).
    job_succeeded(&cp, "photos-cache-warm-vit-b-32");
    // ... then messages raise replicas through the scale subresource...
    rt.block_on(async {
        for chunk in 0..3 {
            let entries = (0..10)
                .filter(|i| chunk * 10 + i < 25)
                .map(|i| {
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body("{}")
                        .build()
                        .unwrap()
                })
                .collect();
            sqs.send_message_batch()
                .queue_url(&queue)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
        }
    });
    cp.wait(
        "scale up to 3",
        T,
        &["deployment", "photos-worker", "-n", NS],
        |d| d["spec"]["replicas"] == 3,
    );
    // ... a re-apply of the ClipProcessor (server-side apply, new generation) never resets them ...
    let out = cp.apply(&(manifest("  labelExtraction: false\n") + &scaling("builtin", 5)));
    assert!(out.status.success());
    cp.wait(
        "generation 2 observed",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| v["status"]["observedGeneration"] == 2,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replicas(&cp), 3, "a reconcile reset the replica count");
    let env = cp.get(&["deployment", "photos-worker", "-n", NS]).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "EXTRACT_LABELS" && e["value"] == "false")
    );
    // ... and an empty queue brings them to zero after the cooldown.
    rt.block_on(sqs.purge_queue().queue_url(&queue).send())
        .unwrap();
    cp.wait(
        "scale to zero",
        T,
        &["deployment", "photos-worker", "-n", NS],
        |d| d["spec"]["replicas"] == 0,
    );

    // --- Updates: a model change rolls the workers and warms the new model's cache.
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("builtin", 5)))
            .status
            .success()
    );
    cp.wait(
        "new model in the workers",
        T,
        &["deployment", "photos-worker", "-n", NS],
        |d| {
            d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .is_some_and(|e| {
                    e.iter()
                        .any(|v| v["name"] == "CLIP_MODEL" && v["value"] == "ViT-B/16")
                })
        },
    );
    cp.wait(
        "new model's cache-warm Job",
        T,
        &["job", "photos-cache-warm-vit-b-16", "-n", NS],
        |_| true,
    );
    cp.wait_gone(
        "old model's Job",
        T,
        &["job", "photos-cache-warm-vit-b-32", "-n", NS],
    );
    // maxInstances reaches the NodePool's limits (and the scaler).
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("builtin", 7)))
            .status
            .success()
    );
    cp.wait(
        "NodePool limit 7",
        T,
        &[
            "nodepools.karpenter.sh",
            node_pool(&cp).unwrap()["metadata"]["name"]
                .as_str()
                .unwrap(),
        ],
        |np| gpu_limit(np) == "7",
    );
    // builtin -> keda: a ScaledObject and TriggerAuthentication with the same settings...
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("keda", 7)))
            .status
            .success()
    );
    let so = cp.wait(
        "ScaledObject",
        T,
        &["scaledobjects.keda.sh", "photos", "-n", NS],
        |_| true,
    );
    assert_eq!(so["spec"]["maxReplicaCount"], 7);
    assert_eq!(so["spec"]["triggers"][0]["metadata"]["queueLength"], "10");
    cp.wait(
        "TriggerAuthentication",
        T,
        &["triggerauthentications.keda.sh", "photos-sqs", "-n", NS],
        |_| true,
    );
    cp.wait(
        "queue status dropped under keda",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| v["status"]["queue"].is_null(),
    );
    // ... and back: what KEDA needed goes away.
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("builtin", 7)))
            .status
            .success()
    );
    cp.wait_gone(
        "ScaledObject removed",
        T,
        &["scaledobjects.keda.sh", "photos", "-n", NS],
    );
    cp.wait_gone(
        "TriggerAuthentication removed",
        T,
        &["triggerauthentications.keda.sh", "photos-sqs", "-n", NS],
    );

    // --- The operator restarts mid-flight and converges.
    op_a.stop();
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("builtin", 6)))
            .status
            .success()
    );
    let mut op_a = Operator::start(&cp, &moto, "operator-a");
    let np_name = node_pool(&cp).unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    cp.wait(
        "NodePool limit 6 after the restart",
        T,
        &["nodepools.karpenter.sh", &np_name],
        |np| gpu_limit(np) == "6",
    );

    // --- Two replicas: only the lease holder acts; the other takes over when it goes.
    let mut op_b = Operator::start(&cp, &moto, "operator-b");
    std::thread::sleep(Duration::from_secs(6));
    let lease = cp
        .get(&["lease", "clip-operator", "-n", "default"])
        .expect("Lease");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        (op_a.is_leader(), op_b.is_leader()),
        (holder == "operator-a", holder == "operator-b"),
        "exactly the holder leads"
    );
    assert!(
        op_a.is_leader() ^ op_b.is_leader(),
        "one leader: a={} b={}",
        op_a.is_leader(),
        op_b.is_leader()
    );
    let (leader, standby) = if op_a.is_leader() {
        (&mut op_a, &mut op_b)
    } else {
        (&mut op_b, &mut op_a)
    };
    leader.stop();
    assert!(
        cp.apply(&(manifest("  model: ViT-B/16\n") + &scaling("builtin", 4)))
            .status
            .success()
    );
    cp.wait(
        "the standby takes over and reconciles",
        T,
        &["nodepools.karpenter.sh", &np_name],
        |np| gpu_limit(np) == "4",
    );
    assert!(standby.is_leader(), "{}", standby.logs());

    // --- SIGTERM: a standby replica and the leader both exit cleanly and at once.
    let mut op_c = Operator::start(&cp, &moto, "operator-c");
    support::wait_for("operator-c serving", T, || {
        op_c.metrics().contains("clip_operator_leader 0")
    });
    let status = op_c.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "standby on SIGTERM: {status:?}\n{}",
        op_c.logs()
    );

    // --- A new EFS access point. A volume's source and a claim's volumeName are immutable, so
    // re-applying the same names would be refused forever: a new volume and claim instead, the
    // workers and the cache-warm Job follow, the old pair is deleted.
    let moved = manifest("  model: ViT-B/16\n")
        .replace("fsap-0123456789abcdef0", "fsap-0fedcba987654321")
        + &scaling("builtin", 4);
    assert!(cp.apply(&moved).status.success());
    let d = cp.wait(
        "the workers mount a new claim",
        T,
        &["deployment", "photos-worker", "-n", NS],
        |d| claim_of(&d["spec"]["template"]) != pvc_name,
    );
    let new_claim = claim_of(&d["spec"]["template"]);
    let new_pvc = cp
        .get(&["pvc", &new_claim, "-n", NS])
        .expect("the new claim");
    let new_pv_name = new_pvc["spec"]["volumeName"].as_str().unwrap().to_string();
    assert_ne!(new_pv_name, pv_name);
    let new_pv = cp.get(&["pv", &new_pv_name]).expect("the new volume");
    assert_eq!(
        new_pv["spec"]["csi"]["volumeHandle"],
        "fs-0123456789abcdef0::fsap-0fedcba987654321"
    );
    assert_eq!(new_pv["spec"]["claimRef"]["name"], new_claim.as_str());
    cp.wait(
        "the cache-warm Job recreated on the new claim",
        T,
        &["job", "photos-cache-warm-vit-b-16", "-n", NS],
        |j| claim_of(&j["spec"]["template"]) == new_claim,
    );
    // The API server's storage-object-in-use protection finalizers hold both until
    // kube-controller-manager (not running here) sees them unused; the operator asks.
    cp.wait(
        "the old claim deleted",
        T,
        &["pvc", &pvc_name, "-n", NS],
        |v| v["metadata"]["deletionTimestamp"].is_string(),
    );
    cp.wait("the old volume deleted", T, &["pv", &pv_name], |v| {
        v["metadata"]["deletionTimestamp"].is_string()
    });
    let cr = cp.wait(
        "the processor converged on the new volume",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| condition(v, "Degraded").is_some_and(|c| c["status"] == "False"),
    );
    assert!(
        !condition(&cr, "Degraded").unwrap()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("PersistentVolume"),
        "{cr}"
    );
    let pv_name = new_pv_name;

    // --- Delete: the finalizer removes the cluster-scoped NodePool and PersistentVolume.
    delete_processor(&cp, &np_name);
    // The API server puts kubernetes.io/pv-protection on every PV; kube-controller-manager (not
    // running here) removes it once unbound. The operator's part is the delete: it is requested.
    let pv = cp.wait("the PersistentVolume deleted", T, &["pv", &pv_name], |pv| {
        pv["metadata"]["deletionTimestamp"].is_string()
    });
    assert_eq!(
        pv["metadata"]["finalizers"],
        serde_json::json!(["kubernetes.io/pv-protection"]),
        "only the platform's finalizer holds it"
    );
    let status = standby.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "leader on SIGTERM: {status:?}\n{}",
        standby.logs()
    );
}

/// `helm install` of the chart, then the operator running with exactly the chart's RBAC (the
/// token of the chart's ServiceAccount) reconciles a processor end to end; `helm uninstall` leaves
/// only the CRD behind.
#[test]
fn helm_chart_on_a_real_control_plane() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    upstream_crds(&cp);
    let notes = helm_install(
        &cp,
        &[
            "--set",
            "serviceAccount.roleArn=arn:aws:iam::123456789012:role/clip-operator",
            "--set",
            "worker.image.tag=test",
            "--set",
            "logFormat=text",
        ],
    );
    assert!(notes.contains("kubectl get clipprocessors -A"), "{notes}");

    // What the release created.
    established(&cp, "clipprocessors.lakechain.dev");
    let d = cp
        .get(&["deployment", "clip-operator", "-n", "clip-system"])
        .expect("the operator Deployment");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "clip-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    assert_eq!(
        env("WORKER_IMAGE").as_deref(),
        Some("ghcr.io/clip-operator/clip-worker:test")
    );
    assert_eq!(env("LOG_FORMAT").as_deref(), Some("text"));
    let sa = cp
        .get(&["serviceaccount", "clip-operator", "-n", "clip-system"])
        .expect("the ServiceAccount");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/clip-operator"
    );
    for what in [
        "service/clip-operator-metrics",
        "poddisruptionbudget/clip-operator",
    ] {
        cp.ok(&["get", what, "-n", "clip-system"]);
    }

    // The API server's own answer on what the ServiceAccount may do.
    let me = "system:serviceaccount:clip-system:clip-operator";
    let can = |args: &[&str]| {
        let mut a = vec!["auth", "can-i", "--as", me];
        a.extend_from_slice(args);
        let out = cp.kubectl(&a);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for allowed in [
        &["watch", "clipprocessors.lakechain.dev", "--all-namespaces"][..],
        &[
            "patch",
            "clipprocessors.lakechain.dev",
            "--subresource=status",
            "-n",
            NS,
        ],
        &["patch", "deployments.apps", "--subresource=scale", "-n", NS],
        &["create", "jobs.batch", "-n", NS],
        &["create", "persistentvolumes"],
        &["delete", "nodepools.karpenter.sh"],
        &["create", "scaledobjects.keda.sh", "-n", NS],
        &["create", "events.events.k8s.io", "-n", NS],
        &["update", "leases.coordination.k8s.io", "-n", "clip-system"],
    ] {
        assert!(can(allowed), "the operator may not {allowed:?}");
    }
    for denied in [
        &["get", "secrets", "-n", NS][..],
        &["create", "pods", "-n", NS],
        &["update", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["delete", "namespaces"],
        &["create", "clusterroles.rbac.authorization.k8s.io"],
        &["delete", "customresourcedefinitions.apiextensions.k8s.io"],
        &["create", "clipprocessors.lakechain.dev", "-n", NS],
    ] {
        assert!(!can(denied), "the operator may {denied:?}");
    }

    // The operator with the ServiceAccount's token: the chart's RBAC is enough for a full
    // lifecycle (create, scale, status, events, delete with the finalizer).
    let kubeconfig = chart_kubeconfig(&cp);
    let moto = Moto::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sqs = rt.block_on(support::sqs(&moto));
    let queue = rt
        .block_on(sqs.create_queue().queue_name("clip-input").send())
        .unwrap()
        .queue_url
        .unwrap();
    let mut op = Operator::start_as(
        &cp,
        &moto,
        "chart-operator",
        &kubeconfig,
        &[("POD_NAMESPACE", "clip-system")],
    );
    cp.ok(&["create", "namespace", NS]);
    assert!(
        cp.apply(&(manifest("") + &scaling("builtin", 2)))
            .status
            .success()
    );
    let cr = cp.wait(
        "status written with the chart's RBAC",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| condition(v, "ScalerReady").is_some_and(|c| c["status"] == "True"),
    );
    assert_eq!(cr["metadata"]["finalizers"][0], "lakechain.dev/cleanup");
    let np_name = node_pool(&cp).expect("NodePool")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // Argo CD's view of the real status: warming the cache is Progressing ...
    let (health, message) = argo_health(&cr);
    assert_eq!(health, "Progressing", "{message}");
    assert!(!message.is_empty());
    // ... and once the cache-warm Job succeeds and Karpenter reports the NodePool ready (their
    // controllers do not run here: their status is written as they would), a processor at zero
    // workers is Healthy.
    job_succeeded(&cp, "photos-cache-warm-vit-b-32");
    cp.ok(&[
        "patch",
        "nodepools.karpenter.sh",
        &np_name,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"Ready","message":"","lastTransitionTime":"2026-01-01T00:00:00Z","observedGeneration":1}]}}"#,
    ]);
    let cr = cp.wait(
        "Ready at zero workers",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| condition(v, "Ready").is_some_and(|c| c["status"] == "True"),
    );
    assert_eq!(argo_health(&cr).0, "Healthy", "{:?}", argo_health(&cr));
    for child in [
        &["serviceaccount", "photos-worker", "-n", NS][..],
        &[
            "pvc",
            &claim_of(
                &cp.get(&["deployment", "photos-worker", "-n", NS]).unwrap()["spec"]["template"],
            ),
            "-n",
            NS,
        ],
        &["job", "photos-cache-warm-vit-b-32", "-n", NS],
    ] {
        assert!(cp.get(child).is_some(), "no {child:?}");
    }
    rt.block_on(
        sqs.send_message()
            .queue_url(&queue)
            .message_body("{}")
            .send(),
    )
    .unwrap();
    cp.wait(
        "scaled through deployments/scale",
        T,
        &["deployment", "photos-worker", "-n", NS],
        |d| d["spec"]["replicas"] == 1,
    );
    // Scaling from zero: workers starting, Argo CD shows Progressing with the operator's words.
    let cr = cp.wait(
        "workers starting",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| condition(v, "Progressing").is_some_and(|c| c["status"] == "True"),
    );
    let (health, message) = argo_health(&cr);
    assert_eq!(health, "Progressing");
    assert_eq!(
        message,
        condition(&cr, "Progressing").unwrap()["message"]
            .as_str()
            .unwrap()
    );
    let events = cp.ok(&["get", "events", "-n", NS, "-o", "json"]);
    assert!(events.contains("photos"), "no events recorded: {events}");
    delete_processor(&cp, &np_name);
    let logs = op.logs();
    assert!(
        !logs.contains("forbidden"),
        "the operator hit an RBAC denial:\n{logs}"
    );
    // Its text log went to a file, not a terminal: plain text, no colour codes.
    assert!(logs.contains(" INFO "), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal:\n{logs}"
    );
    op.stop();

    // The CRD is the release's (a template, not crds/), so `helm upgrade` upgrades it: a chart
    // whose CRD gained a printer column and a new description reaches the API server.
    let crd = cp.get(&["crd", "clipprocessors.lakechain.dev"]).unwrap();
    assert_eq!(
        crd["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let chart = path("charts/clip-operator");
    let next = std::env::temp_dir().join(format!("clip-chart-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&next);
    std::fs::create_dir_all(&next).unwrap();
    let copy = next.join("clip-operator");
    assert!(
        std::process::Command::new("cp")
            .args(["-r", chart.to_str().unwrap(), copy.to_str().unwrap()])
            .status()
            .unwrap()
            .success()
    );
    let file = copy.join("files/clipprocessors.lakechain.dev.yaml");
    let mut next_crd: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let v = &mut next_crd["spec"]["versions"][0];
    v["schema"]["openAPIV3Schema"]["description"] = "Upgraded. A CLIP image processor.".into();
    v["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "Region", "type": "string", "jsonPath": ".spec.region"}));
    std::fs::write(&file, serde_yaml_ng::to_string(&next_crd).unwrap()).unwrap();
    let out = cp.helm(&[
        "upgrade",
        "clip-operator",
        copy.to_str().unwrap(),
        "--namespace",
        "clip-system",
        "--reuse-values",
    ]);
    assert!(
        out.status.success(),
        "helm upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crd = cp.get(&["crd", "clipprocessors.lakechain.dev"]).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert!(
        version["schema"]["openAPIV3Schema"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Upgraded."),
        "{version}"
    );
    assert!(
        version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "Region"),
        "{version}"
    );

    let _ = std::fs::remove_dir_all(&next);

    // Uninstall: the release's objects go, the CRD (and so users' processors) stays.
    let out = cp.helm(&["uninstall", "clip-operator", "--namespace", "clip-system"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gone in [
        &["deployment", "clip-operator", "-n", "clip-system"][..],
        &["serviceaccount", "clip-operator", "-n", "clip-system"],
        &["clusterrole", "clip-operator"],
        &["clusterrolebinding", "clip-operator"],
        &["role", "clip-operator-leader-election", "-n", "clip-system"],
    ] {
        cp.wait_gone("a release object", T, gone);
    }
    assert!(
        cp.get(&["crd", "clipprocessors.lakechain.dev"]).is_some(),
        "helm uninstall must keep the CRD"
    );
}

/// The operator's requests (not kubectl's, not the lease's) in the audit log from entry `since`
/// whose verb `verb` accepts, as `verb resource/subresource`.
fn operator_requests(cp: &ControlPlane, since: usize, verb: impl Fn(&str) -> bool) -> Vec<String> {
    cp.audit()[since..]
        .iter()
        .filter(|e| {
            e["user"]["username"] == "admin"
                && !e["userAgent"].as_str().unwrap_or("").starts_with("kubectl")
                && verb(e["verb"].as_str().unwrap_or(""))
                && e["objectRef"]["resource"] != "leases"
        })
        .map(|e| {
            format!(
                "{} {}/{}",
                e["verb"].as_str().unwrap_or(""),
                e["objectRef"]["resource"].as_str().unwrap_or(""),
                e["objectRef"]["subresource"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The counter `clip_operator_reconciles_total` on the operator's /metrics.
fn reconciles(op: &Operator) -> u64 {
    counter(op, "clip_operator_reconciles_total")
}

/// A counter on the operator's /metrics.
fn counter(op: &Operator, name: &str) -> u64 {
    op.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// At rest, the builtin scaler's loop reads the queue once per polling interval and writes
/// nothing but a status heartbeat once a minute; its status writes do not start reconciles (the
/// watch on processors only passes spec, deletion and finalizer changes), and reconcile itself
/// only resyncs every 5 minutes. Counted over two minutes in the API server's audit log.
#[test]
fn at_rest_the_operator_reads_the_queue_and_writes_only_a_heartbeat() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    crds(&cp);
    cp.ok(&["create", "namespace", NS]);
    let moto = Moto::start();
    let sqs = rt.block_on(support::sqs(&moto));
    rt.block_on(sqs.create_queue().queue_name("clip-input").send())
        .unwrap();
    let op = Operator::start(&cp, &moto, "operator-a");
    let interval = 2;
    let spec = manifest("").replace(
        "  modelCache:\n    efs:\n      fileSystemId: fs-0123456789abcdef0\n      accessPointId: fsap-0123456789abcdef0\n",
        "  modelCache:\n    none: true\n",
    ) + &format!(
        "  compute:\n    nodePool:\n      provisioner: none\n  scaling:\n    pollingIntervalSeconds: {interval}\n"
    );
    assert!(cp.apply(&spec).status.success());
    let read_at = |cp: &ControlPlane| {
        cp.get(&["clipprocessor", "photos", "-n", NS])
            .and_then(|v| v["status"]["queue"]["readAt"].as_str().map(String::from))
    };
    cp.wait(
        "Ready, with the scaler's first queue read in status",
        T,
        &["clipprocessor", "photos", "-n", NS],
        |v| {
            v["status"]["queue"]["readAt"].is_string()
                && condition(v, "Ready").is_some_and(|c| c["status"] == "True")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let (reconciled, read, first_read) = (
        reconciles(&op),
        counter(&op, "clip_operator_queue_reads_total"),
        read_at(&cp),
    );
    let since = cp.audit().len();
    let window = 120;
    std::thread::sleep(Duration::from_secs(window));
    let ran = reconciles(&op) - reconciled;
    let reads = counter(&op, "clip_operator_queue_reads_total") - read;
    let writes = operator_requests(&cp, since, |verb| {
        matches!(verb, "create" | "update" | "patch" | "delete")
    });
    let logs = op.logs();
    assert!(
        ran <= 1,
        "{ran} reconciles in {window}s at rest (the resync is every 5 minutes)\n{logs}"
    );
    let ticks = window / interval;
    assert!(
        (ticks - 5..=ticks + 2).contains(&reads),
        "{reads} queue reads in {window}s with a {interval}s polling interval"
    );
    // The heartbeat: once a minute, and nothing else.
    assert!(
        !writes.is_empty()
            && writes.iter().all(|w| w == "patch clipprocessors/status")
            && writes.len() <= 3,
        "writes at rest: {writes:?}"
    );
    assert_ne!(
        read_at(&cp),
        first_read,
        "the heartbeat moved status.queue.readAt"
    );
}

/// The resync finds everything as it left it: it makes no request (every child comes from the
/// watch caches and nothing is re-applied), while a child deleted or edited by hand is put back
/// at once, since every kind of child is watched.
#[test]
fn a_resync_with_nothing_to_change_makes_no_request_and_drift_is_put_back() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Only this project's CRD: the watches of NodePools, ScaledObjects and
    // TriggerAuthentications fail and must back off, not list again every second.
    cp.ok(&["apply", "-f", path("crds").to_str().unwrap()]);
    established(&cp, "clipprocessors.lakechain.dev");
    cp.ok(&["create", "namespace", NS]);
    let moto = Moto::start();
    let sqs = rt.block_on(support::sqs(&moto));
    rt.block_on(sqs.create_queue().queue_name("clip-input").send())
        .unwrap();
    let op = Operator::start_as(
        &cp,
        &moto,
        "operator-a",
        &cp.kubeconfig,
        &[("RESYNC_SECONDS", "10")],
    );
    let spec = manifest("").replace(
        "  modelCache:\n    efs:\n      fileSystemId: fs-0123456789abcdef0\n      accessPointId: fsap-0123456789abcdef0\n",
        "  modelCache:\n    none: true\n",
    ) + "  compute:\n    nodePool:\n      provisioner: none\n";
    assert!(cp.apply(&spec).status.success());
    cp.wait("Ready", T, &["clipprocessor", "photos", "-n", NS], |v| {
        condition(v, "Ready").is_some_and(|c| c["status"] == "True")
    });
    std::thread::sleep(Duration::from_secs(3));
    let reconciled = reconciles(&op);
    let since = cp.audit().len();
    let window = 45;
    std::thread::sleep(Duration::from_secs(window));
    let ran = reconciles(&op) - reconciled;
    let requests = operator_requests(&cp, since, |verb| verb != "watch");
    let logs = op.logs();
    assert!(
        ran >= 3,
        "{ran} reconciles in {window}s with a 10 s resync\n{logs}"
    );
    // The scaler's heartbeat (once a minute) is the only request besides watches, the lease and
    // the backed-off lists of the kinds whose CRDs are missing.
    let retries = |kind: &str| {
        requests
            .iter()
            .filter(|r| *r == &format!("list {kind}/"))
            .count()
    };
    let missing = ["nodepools", "scaledobjects", "triggerauthentications"];
    let others: Vec<&String> = requests
        .iter()
        .filter(|r| !missing.iter().any(|k| **r == format!("list {k}/")))
        .collect();
    assert!(
        others.iter().all(|r| *r == "patch clipprocessors/status") && others.len() <= 1,
        "requests at rest over {ran} resyncs: {requests:?}"
    );
    // Doubling from 0.8 s allows at most 6 lists in any 45 s; a backoff reset before every list
    // (kube's default here) gives about 50.
    for kind in missing {
        assert!(
            retries(kind) <= 6,
            "{} lists of {kind} (CRD not installed) in {window}s: {requests:?}",
            retries(kind)
        );
    }

    // Drift: a deleted ServiceAccount and a hand-edited worker Deployment are put back without
    // waiting for a resync or a spec change. A second operator with the default 5-minute resync
    // takes over, so only the watches of the children can explain a repair within seconds.
    drop(op);
    let op = Operator::start_as(&cp, &moto, "operator-b", &cp.kubeconfig, &[]);
    let deadline = std::time::Instant::now() + T;
    while reconciles(&op) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "operator-b never reconciled\n{}",
            op.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let sa = ["serviceaccount", "photos-worker", "-n", NS];
    let uid = cp.get(&sa).unwrap()["metadata"]["uid"].clone();
    cp.ok(&["delete", "serviceaccount", "photos-worker", "-n", NS]);
    cp.wait(
        "the deleted ServiceAccount created again",
        Duration::from_secs(8),
        &sa,
        |v| v["metadata"]["uid"] != uid,
    );
    let image = |v: &Value| v["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let want = image(&cp.get(&["deployment", "photos-worker", "-n", NS]).unwrap());
    cp.ok(&[
        "patch",
        "deployment",
        "photos-worker",
        "-n",
        NS,
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"example.com/edited:1"}]"#,
    ]);
    cp.wait(
        "the hand-edited worker image put back",
        Duration::from_secs(8),
        &["deployment", "photos-worker", "-n", NS],
        |v| image(v) == want,
    );
}

/// A processor of a tenant namespace, with the keda engine (no queue is read here, so status
/// shows only what the class does).
fn tenant_processor(ns: &str, name: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: lakechain.dev/v1alpha1
kind: ClipProcessor
metadata:
  name: {name}
  namespace: {ns}
spec:
  source:
    queueUrl: https://sqs.us-east-1.amazonaws.com/123456789012/{name}
  output:
    topicArn: arn:aws:sns:us-east-1:123456789012:clip-output
  cacheStorage:
    bucket: lakechain-cache
{extra}"#
    )
}

const CLASS: &str = r#"apiVersion: lakechain.dev/v1alpha1
kind: ClipProcessorClass
metadata:
  name: ml
spec:
  compute:
    karpenter:
      nodeClassRef:
        name: gpu
      instanceFamilies: [g5, g6]
      capacityTypes: [spot, on-demand]
  budget:
    maxGPUs: 3
    maxGPUsPerNamespace: 2
  modelCache:
    storageClassName: efs-ap
  worker:
    allowedImages: ["registry.example.com/ml/"]
    image: registry.example.com/ml/clip-worker:1
    maxResources:
      cpu: "4"
      memory: 16Gi
      nvidia.com/gpu: "1"
"#;

#[test]
fn classes_on_a_real_control_plane() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    upstream_crds(&cp);
    helm_install(&cp, &[]);
    established(&cp, "clipprocessors.lakechain.dev");
    established(&cp, "clipprocessorclasses.lakechain.dev");
    let out = cp.apply(CLASS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A class whose own defaults exceed its maximum is refused by the class's schema.
    let out = cp.apply(&CLASS.replace("name: ml\n", "name: loose\n").replace(
        "    maxResources:\n",
        "    resources:\n      limits:\n        memory: 32Gi\n    maxResources:\n",
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a class above its own maximum was admitted"
    );
    assert!(
        err.contains("the class's default requests and limits must not exceed worker.maxResources"),
        "{err}"
    );
    let out = cp.apply(
        &CLASS
            .replace("name: ml\n", "name: loose\n")
            .replace("memory: 16Gi", "memory: lots"),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("every value must be a quantity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Tenants: alice edits team-a, bob team-b, with the chart's tenant role (the built-in edit
    // role aggregates it where kube-controller-manager runs; none runs here).
    for (user, ns) in [("alice", "team-a"), ("bob", "team-b")] {
        cp.ok(&["create", "namespace", ns]);
        cp.ok(&[
            "create",
            "rolebinding",
            &format!("{user}-edit"),
            "-n",
            ns,
            "--clusterrole=clip-operator-edit",
            &format!("--user={user}"),
        ]);
    }
    let can = |user: &str, args: &[&str]| {
        let mut a = vec!["auth", "can-i", "--as", user];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&cp.kubectl(&a).stdout).trim() == "yes"
    };
    assert!(can("alice", &["create", "clipprocessors", "-n", "team-a"]));
    assert!(!can("alice", &["create", "clipprocessors", "-n", "team-b"]));
    for verb in ["create", "patch", "delete"] {
        assert!(
            !can("alice", &[verb, "clipprocessorclasses"]),
            "a tenant may {verb} classes"
        );
    }

    // What the API server refuses at admission (the chart's ValidatingAdmissionPolicy, with the
    // class as its parameter), in the tenant's own namespace.
    for (what, extra, message) in [
        (
            "an image outside the class's",
            "  className: ml\n  worker:\n    image: docker.io/someone/miner:1\n",
            "worker image docker.io/someone/miner:1 is not allowed by ClipProcessorClass ml",
        ),
        (
            "more GPUs than a namespace may have",
            "  className: ml\n  scaling:\n    engine: keda\n    maxInstances: 3\n",
            "is 3 GPUs; ClipProcessorClass ml allows 2 per namespace (budget.maxGPUsPerNamespace)",
        ),
        (
            "a file system of their choosing",
            "  className: ml\n  modelCache:\n    efs:\n      fileSystemId: fs-0123456789abcdef0\n",
            "modelCache.efs: the file systems are ClipProcessorClass ml's to choose",
        ),
        (
            "more memory than a worker may have",
            "  className: ml\n  scaling:\n    engine: keda\n    maxInstances: 1\n  worker:\n    resources:\n      requests:\n        cpu: 500m\n      limits:\n        memory: 20Gi\n",
            "worker.resources.limits.memory 20Gi > 16Gi: more than ClipProcessorClass ml allows one worker (worker.maxResources)",
        ),
        (
            "more GPUs per worker than a worker may have",
            "  className: ml\n  compute:\n    gpusPerInstance: 2\n  scaling:\n    engine: keda\n    maxInstances: 1\n",
            "compute.gpusPerInstance is 2; ClipProcessorClass ml allows 1 per worker",
        ),
        (
            "instance types of their choosing",
            "  className: ml\n  compute:\n    instanceTypes: [p5.48xlarge]\n",
            "are chosen by ClipProcessorClass ml",
        ),
    ] {
        let out = cp.apply_as(Some("alice"), &tenant_processor("team-a", "bad", extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} was admitted");
        assert!(err.contains(message), "{what}: {err}");
    }

    // The operator with the chart's RBAC.
    let kubeconfig = chart_kubeconfig(&cp);
    let moto = Moto::start();
    let mut op = Operator::start_as(
        &cp,
        &moto,
        "class-operator",
        &kubeconfig,
        &[("POD_NAMESPACE", "clip-system")],
    );
    let keda = |max: i32| {
        format!("  className: ml\n  scaling:\n    engine: keda\n    maxInstances: {max}\n")
    };
    let ok = |user: &str, ns: &str, name: &str, extra: &str| {
        let out = cp.apply_as(Some(user), &tenant_processor(ns, name, extra));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok("alice", "team-a", "first", &keda(2));
    cp.wait(
        "the first processor's workers",
        T,
        &["deployment", "first-worker", "-n", "team-a"],
        |_| true,
    );
    std::thread::sleep(Duration::from_millis(1100)); // a later creationTimestamp
    ok("bob", "team-b", "second", &keda(2));

    // One NodePool for the class, owned by it, its GPU limit the class budget; both processors'
    // workers select it; the class's image and claim apply.
    let np = cp
        .wait(
            "the class's NodePool",
            T,
            &["nodepools.karpenter.sh", "clip-class-ml"],
            |_| true,
        )
        .clone();
    assert_eq!(gpu_limit(&np), "3");
    assert_eq!(
        np["metadata"]["ownerReferences"][0]["kind"],
        "ClipProcessorClass"
    );
    let pools = cp.ok(&["get", "nodepools.karpenter.sh", "-o", "name"]);
    assert_eq!(
        pools.trim(),
        "nodepool.karpenter.sh/clip-class-ml",
        "one pool: {pools}"
    );
    for (ns, name) in [("team-a", "first"), ("team-b", "second")] {
        let d = cp.wait(
            "workers",
            T,
            &["deployment", &format!("{name}-worker"), "-n", ns],
            |_| true,
        );
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["nodeSelector"]["karpenter.sh/nodepool"],
            "clip-class-ml"
        );
        assert_eq!(
            pod["containers"][0]["image"],
            "registry.example.com/ml/clip-worker:1"
        );
        // No worker of the class is unbounded: the unset cpu limit is the class maximum.
        assert_eq!(pod["containers"][0]["resources"]["limits"]["cpu"], "4");
        let claim = claim_of(&d["spec"]["template"]);
        let pvc = cp.get(&["pvc", &claim, "-n", ns]).expect("the cache claim");
        assert_eq!(pvc["spec"]["storageClassName"], "efs-ap");
    }

    // The budget is shared: first holds 2 of 3 GPUs, so second gets 1 worker, Degraded with
    // the limit named; KEDA is told the same bound.
    let second = cp.wait(
        "the budget shortfall",
        T,
        &["clipprocessor", "second", "-n", "team-b"],
        |v| condition(v, "Degraded").is_some_and(|c| c["reason"] == "ClassBudgetExceeded"),
    );
    let message = condition(&second, "Degraded").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("ClipProcessorClass \"ml\" budget.maxGPUs is 3 GPUs: the class's processors created earlier hold 2, and this one asks for 2")
            && message.contains("so at most 1 workers run"),
        "{message}"
    );
    let so = cp
        .get(&["scaledobject", "second", "-n", "team-b"])
        .expect("ScaledObject");
    assert_eq!(so["spec"]["maxReplicaCount"], 1);
    // The first gives back a GPU: the second gets its two, without being touched.
    ok("alice", "team-a", "first", &keda(1));
    cp.wait(
        "the shortfall resolved",
        T,
        &["clipprocessor", "second", "-n", "team-b"],
        |v| condition(v, "Degraded").is_some_and(|c| c["status"] == "False"),
    );
    cp.wait(
        "KEDA's bound raised",
        T,
        &["scaledobject", "second", "-n", "team-b"],
        |v| v["spec"]["maxReplicaCount"] == 2,
    );

    // A class that does not exist: admitted (no class to check against), Degraded by name.
    ok(
        "alice",
        "team-a",
        "lost",
        "  className: missing\n  scaling:\n    engine: keda\n",
    );
    let lost = cp.wait(
        "ClassNotFound",
        T,
        &["clipprocessor", "lost", "-n", "team-a"],
        |v| condition(v, "Degraded").is_some_and(|c| c["reason"] == "ClassNotFound"),
    );
    assert!(
        condition(&lost, "Degraded").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("\"missing\", which does not exist")
    );
    assert!(
        cp.get(&["deployment", "lost-worker", "-n", "team-a"])
            .is_none()
    );
    // Creating it (a cpu class on existing nodes) brings the processor up: the class watch
    // reconciles the processors that name it.
    let out = cp.apply(
        "apiVersion: lakechain.dev/v1alpha1\nkind: ClipProcessorClass\nmetadata:\n  name: missing\nspec:\n  compute:\n    device: cpu\n    nodes:\n      nodeSelector:\n        pool: general\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = cp.wait(
        "the processor of the new class",
        T,
        &["deployment", "lost-worker", "-n", "team-a"],
        |_| true,
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["nodeSelector"]["pool"],
        "general"
    );

    // Migration: a processor from before classes (no className, its own NodePool) moves to the
    // class once the class is made the default; its own pool is removed.
    cp.ok(&["create", "namespace", "legacy"]);
    let out = cp.apply(&tenant_processor(
        "legacy",
        "old",
        "  scaling:\n    engine: keda\n    maxInstances: 1\n",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let own = cp.wait(
        "its own NodePool",
        T,
        &[
            "nodepools.karpenter.sh",
            "-l",
            "lakechain.dev/processor=old",
        ],
        |v| v["items"].as_array().is_some_and(|i| i.len() == 1),
    );
    let own = own["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    cp.ok(&[
        "annotate",
        "clipprocessorclass",
        "ml",
        "lakechain.dev/is-default-class=true",
    ]);
    cp.wait(
        "the old processor on the class's pool",
        T,
        &["deployment", "old-worker", "-n", "legacy"],
        |d| {
            d["spec"]["template"]["spec"]["nodeSelector"]["karpenter.sh/nodepool"]
                == "clip-class-ml"
        },
    );
    cp.wait_gone("its own NodePool", T, &["nodepools.karpenter.sh", &own]);
    op.stop();
}

#[test]
fn an_operator_limited_to_namespaces_serves_those_only_with_rights_there_only() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cp = ControlPlane::start();
    upstream_crds(&cp);
    for ns in ["team-a", "team-b"] {
        cp.ok(&["create", "namespace", ns]);
    }
    helm_install(&cp, &["--set", "watchNamespaces={team-a}"]);
    established(&cp, "clipprocessors.lakechain.dev");
    let me = "system:serviceaccount:clip-system:clip-operator";
    let can = |args: &[&str]| {
        let mut a = vec!["auth", "can-i", "--as", me];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&cp.kubectl(&a).stdout).trim() == "yes"
    };
    assert!(can(&["create", "deployments.apps", "-n", "team-a"]));
    assert!(can(&["create", "nodepools.karpenter.sh"]));
    assert!(can(&["watch", "clipprocessorclasses.lakechain.dev"]));
    assert!(!can(&["create", "deployments.apps", "-n", "team-b"]));
    assert!(!can(&[
        "list",
        "clipprocessors.lakechain.dev",
        "--all-namespaces"
    ]));

    let kubeconfig = chart_kubeconfig(&cp);
    let moto = Moto::start();
    let mut op = Operator::start_as(
        &cp,
        &moto,
        "namespaced-operator",
        &kubeconfig,
        &[
            ("POD_NAMESPACE", "clip-system"),
            ("WATCH_NAMESPACES", "team-a"),
        ],
    );
    let keda = "  scaling:\n    engine: keda\n";
    for ns in ["team-b", "team-a"] {
        let out = cp.apply(&tenant_processor(ns, "photos", keda));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cp.wait(
        "team-a's processor served",
        T,
        &["clipprocessor", "photos", "-n", "team-a"],
        |v| v["status"]["observedGeneration"].as_i64().is_some(),
    );
    cp.wait(
        "team-a's workers",
        T,
        &["deployment", "photos-worker", "-n", "team-a"],
        |_| true,
    );
    // team-b's was created first and is never touched: no finalizer, no status, no children.
    let b = cp
        .get(&["clipprocessor", "photos", "-n", "team-b"])
        .unwrap();
    assert!(b["metadata"]["finalizers"].is_null(), "{b}");
    assert!(b["status"].is_null(), "{b}");
    assert!(
        cp.get(&["deployment", "photos-worker", "-n", "team-b"])
            .is_none()
    );
    let logs = op.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the operator asked for what it may not: {logs}"
    );
    op.stop();
}
