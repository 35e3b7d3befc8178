//! Reconcile flows against a mocked API server (`fake.rs`): create, update, engine switch,
//! delete with the finalizer, conflicts and API errors, invalid specs.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fake::FakeApi;
use super::validate::OperatorSettings;
use super::{Context, FINALIZER, error_policy, reconcile};
use crate::crd::ClipProcessor;
use crate::metrics::Metrics;
use crate::scaler::sqs::QueueReader;

const CP: &str = "/apis/lakechain.dev/v1alpha1/namespaces/media/clipprocessors/photos";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/media/deployments/photos-worker";
const JOB: &str = "/apis/batch/v1/namespaces/media/jobs/photos-cache-warm-vit-b-32";

fn manifest(spec: Value) -> Value {
    let mut m = json!({
        "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessor",
        "metadata": {"name": "photos", "namespace": "media", "uid": "cp-uid", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "source": {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/clip-input"},
            "output": {"topicArn": "arn:aws:sns:eu-west-1:123456789012:clip-output"},
            "cacheStorage": {"bucket": "lakechain-cache"},
            "scaling": {"engine": "keda"}
        }
    });
    json_patch::merge(&mut m["spec"], &spec);
    m
}

fn setup(spec: Value) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::default();
    fake.insert(CP, manifest(spec));
    // The builtin scaler's queue reads go to a closed port: a fast, deterministic failure.
    let queues = QueueReader::new(Some("http://127.0.0.1:9".into()));
    let ctx = Context::new(
        fake.client(),
        OperatorSettings::default(),
        Arc::new(Metrics::default()),
        None,
        queues,
    );
    (fake, ctx)
}

fn current(fake: &FakeApi) -> Arc<ClipProcessor> {
    Arc::new(serde_json::from_value(fake.get(CP).expect("the ClipProcessor exists")).unwrap())
}

/// Reconciles until the finalizer is in place and one full apply ran.
async fn converge(fake: &FakeApi, ctx: &Arc<Context>) -> Action {
    let mut action = reconcile(current(fake), ctx.clone()).await.unwrap();
    if current(fake)
        .metadata
        .finalizers
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        panic!("the first reconcile adds the finalizer");
    }
    for _ in 0..2 {
        action = reconcile(current(fake), ctx.clone()).await.unwrap();
    }
    action
}

fn condition(fake: &FakeApi, type_: &str) -> Value {
    fake.get(CP).unwrap()["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

fn exists(fake: &FakeApi, fragment: &str) -> bool {
    fake.paths().iter().any(|p| p.contains(fragment))
}

/// Waits (real time, at most 20 s) until `what` holds; the scaler loop runs beside the test.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn replicas(fake: &FakeApi) -> Value {
    fake.get(DEPLOYMENT).unwrap()["spec"]["replicas"].clone()
}

#[tokio::test]
async fn create_applies_every_child_and_reports_status() {
    let (fake, ctx) = setup(
        json!({"modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}, "none": null}}),
    );
    let action = converge(&fake, &ctx).await;
    assert_eq!(
        current(&fake).metadata.finalizers.clone().unwrap(),
        vec![FINALIZER.to_string()]
    );
    for child in [
        "/api/v1/namespaces/media/serviceaccounts/photos-worker",
        DEPLOYMENT,
        "/api/v1/namespaces/media/persistentvolumeclaims/photos-model-cache",
        "/apis/batch/v1/namespaces/media/jobs/photos-cache-warm-vit-b-32",
        "/apis/karpenter.sh/v1/nodepools/clip-photos-",
        "/api/v1/persistentvolumes/clip-photos-",
        "/apis/keda.sh/v1alpha1/namespaces/media/scaledobjects/photos",
        "/apis/keda.sh/v1alpha1/namespaces/media/triggerauthentications/photos-sqs",
    ] {
        assert!(
            exists(&fake, child),
            "{child} was not applied; have {:?}",
            fake.paths()
        );
    }
    // Namespaced children carry the processor as controller owner.
    let d = fake.get(DEPLOYMENT).unwrap();
    assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "cp-uid");
    assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
    // Created once at zero replicas by the create manager; applies never carry replicas.
    let seen = fake.seen();
    let create = seen
        .iter()
        .find(|s| s.method == Method::POST && s.path.ends_with("/deployments"))
        .unwrap();
    assert!(
        create.query.contains("fieldManager=clip-operator-create"),
        "{}",
        create.query
    );
    assert_eq!(create.body.as_ref().unwrap()["spec"]["replicas"], 0);
    for apply in seen
        .iter()
        .filter(|s| s.method == Method::PATCH && s.path == DEPLOYMENT)
    {
        assert!(
            apply.query.contains("fieldManager=clip-operator")
                && apply.query.contains("force=true")
        );
        assert!(
            apply.body.as_ref().unwrap()["spec"]
                .get("replicas")
                .is_none(),
            "an apply carried replicas"
        );
    }
    // Status: observedGeneration, every condition, the replica summary.
    let status = &fake.get(CP).unwrap()["status"];
    assert_eq!(status["observedGeneration"], 1);
    for t in [
        "Ready",
        "Progressing",
        "Degraded",
        "CacheReady",
        "NodePoolReady",
        "ScalerReady",
        "WorkersAvailable",
    ] {
        let c = condition(&fake, t);
        assert_eq!(c["observedGeneration"], 1, "{t}");
        assert!(
            c["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{t} has no reason"
        );
    }
    assert_eq!(condition(&fake, "CacheReady")["reason"], "Warming");
    assert_eq!(status["replicas"]["summary"], "0/0");
    assert_eq!(action, Action::requeue(super::RESYNC));
}

#[tokio::test]
async fn the_scalers_replica_count_survives_reconciles() {
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    // KEDA (or our scaler) sets 3 workers through the scale subresource.
    let mut d = fake.get(DEPLOYMENT).unwrap();
    d["spec"]["replicas"] = json!(3);
    fake.insert(DEPLOYMENT, d);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert_eq!(fake.get(DEPLOYMENT).unwrap()["spec"]["replicas"], 3);
}

#[tokio::test]
async fn a_model_change_rolls_the_workers_and_warms_the_new_model() {
    let (fake, ctx) = setup(json!({"modelCache": {"claimName": "weights", "none": null}}));
    converge(&fake, &ctx).await;
    assert!(exists(&fake, "/jobs/photos-cache-warm-vit-b-32"));
    let mut cp = fake.get(CP).unwrap();
    cp["spec"]["model"] = json!("ViT-B/16");
    cp["metadata"]["generation"] = json!(2);
    fake.insert(CP, cp);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(exists(&fake, "/jobs/photos-cache-warm-vit-b-16"));
    assert!(
        !exists(&fake, "/jobs/photos-cache-warm-vit-b-32"),
        "the old model's Job is removed"
    );
    let env =
        fake.get(DEPLOYMENT).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "CLIP_MODEL" && e["value"] == "ViT-B/16")
    );
    assert_eq!(fake.get(CP).unwrap()["status"]["observedGeneration"], 2);
}

#[tokio::test]
async fn switching_engines_removes_what_no_longer_applies() {
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    assert!(exists(&fake, "/scaledobjects/photos"));
    let mut cp = fake.get(CP).unwrap();
    cp["spec"]["scaling"]["engine"] = json!("builtin");
    cp["spec"]["compute"] = json!({"nodePool": {"provisioner": "none"}});
    fake.insert(CP, cp);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(
        ctx.scalers.is_running("media", "photos"),
        "the scaler loop started"
    );
    assert!(!exists(&fake, "/scaledobjects/"), "ScaledObject removed");
    assert!(
        !exists(&fake, "/triggerauthentications/"),
        "TriggerAuthentication removed"
    );
    assert!(
        !exists(&fake, "/nodepools/"),
        "NodePool removed with provisioner none"
    );
    // The builtin scaler now reads the queue; here it cannot, and (at the reconcile it asks
    // for) the status says so.
    eventually("the scaler's first read", || {
        ctx.scalers
            .observation("media", "photos")
            .is_some_and(|o| o.queue.is_some())
    })
    .await;
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    let scaler = condition(&fake, "ScalerReady");
    assert_eq!(
        (scaler["status"].as_str(), scaler["reason"].as_str()),
        (Some("False"), Some("QueueUnreadable"))
    );
    assert_eq!(condition(&fake, "Degraded")["status"], "True");

    // And back to KEDA: the loop stops.
    let mut cp = fake.get(CP).unwrap();
    cp["spec"]["scaling"]["engine"] = json!("keda");
    fake.insert(CP, cp);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(!ctx.scalers.is_running("media", "photos"));
}

/// Label-selected list requests: the orphan sweep's.
fn sweep_lists(fake: &FakeApi) -> usize {
    fake.seen()
        .iter()
        .filter(|r| r.method == Method::GET && r.query.contains("labelSelector"))
        .count()
}

#[tokio::test]
async fn the_orphan_sweep_runs_when_the_wanted_children_change_not_on_every_tick() {
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    let swept = sweep_lists(&fake);
    assert_eq!(swept, 10, "the first full reconcile sweeps each kind once");
    for _ in 0..3 {
        reconcile(current(&fake), ctx.clone()).await.unwrap();
    }
    assert_eq!(sweep_lists(&fake), swept, "nothing changed: no sweep");

    // The engine switch changes what is wanted: the sweep runs, and a failed one runs again on
    // the next reconcile.
    let mut cp = fake.get(CP).unwrap();
    cp["spec"]["scaling"]["engine"] = json!("builtin");
    cp["metadata"]["generation"] = json!(2);
    fake.insert(CP, cp);
    fake.fail_times(Method::GET, "/scaledobjects", 500, "InternalError", 1);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(sweep_lists(&fake) > swept);
    assert!(exists(&fake, "/scaledobjects/"), "the failed sweep kept it");
    assert_eq!(condition(&fake, "Degraded")["status"], "True");
    let retried = sweep_lists(&fake);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(sweep_lists(&fake) > retried, "a failed sweep is retried");
    assert!(!exists(&fake, "/scaledobjects/"), "ScaledObject removed");
    let done = sweep_lists(&fake);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert_eq!(sweep_lists(&fake), done);
}

#[tokio::test]
async fn deletion_removes_cluster_scoped_children_and_the_finalizer() {
    let (fake, ctx) = setup(
        json!({"modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}, "none": null}}),
    );
    converge(&fake, &ctx).await;
    assert!(exists(&fake, "/nodepools/") && exists(&fake, "/persistentvolumes/"));
    let mut cp = fake.get(CP).unwrap();
    cp["metadata"]["deletionTimestamp"] = json!("2026-11-27T01:00:00Z");
    fake.insert(CP, cp);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(!exists(&fake, "/nodepools/"), "NodePool deleted");
    assert!(
        !exists(&fake, "/persistentvolumes/"),
        "PersistentVolume deleted"
    );
    assert!(fake.get(CP).is_none(), "finalizer removed, object gone");
}

#[tokio::test]
async fn a_conflicting_child_degrades_the_status_with_the_reason() {
    let (fake, ctx) = setup(json!({}));
    fake.fail(Method::PATCH, "/nodepools/", 409, "Conflict");
    converge(&fake, &ctx).await;
    let d = condition(&fake, "Degraded");
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("True"), Some("ApplyFailed"))
    );
    assert!(d["message"].as_str().unwrap().contains("NodePool"), "{d}");
    assert_eq!(condition(&fake, "Ready")["status"], "False");
    // The rest was still applied.
    assert!(exists(&fake, "/deployments/photos-worker"));
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    fake.fail(
        Method::PATCH,
        "/clipprocessors/photos/status",
        500,
        "InternalError",
    );
    let mut cp = fake.get(CP).unwrap();
    cp["metadata"]["generation"] = json!(2);
    fake.insert(CP, cp);
    let err = reconcile(current(&fake), ctx.clone()).await.unwrap_err();
    assert!(err.to_string().contains("injected 500"), "{err}");
    let first = error_policy(current(&fake), &err, ctx.clone());
    let second = error_policy(current(&fake), &err, ctx.clone());
    assert_eq!(
        (first, second),
        (
            Action::requeue(Duration::from_secs(5)),
            Action::requeue(Duration::from_secs(10))
        )
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_created() {
    let (fake, ctx) = setup(json!({"scaling": {"minInstances": 8, "maxInstances": 2}}));
    let action = converge(&fake, &ctx).await;
    assert_eq!(action, Action::await_change());
    let d = condition(&fake, "Degraded");
    assert_eq!(d["reason"], "InvalidSpec");
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("scaling.minInstances must not be greater than scaling.maxInstances")
    );
    assert!(
        !exists(&fake, "/deployments/"),
        "nothing applied for an invalid spec"
    );
}

/// moto's server, an SQS client for it and the queue `clip-input`.
async fn moto_queue() -> (clip_test_support::Moto, aws_sdk_sqs::Client, String) {
    let moto = clip_test_support::Moto::start();
    let sqs = aws_sdk_sqs::Client::new(&moto.sdk_config().await);
    let queue = sqs
        .create_queue()
        .queue_name("clip-input")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    (moto, sqs, queue)
}

#[tokio::test]
async fn the_builtin_scaler_follows_a_real_queue() {
    let (moto, sqs, queue) = moto_queue().await;
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
    let fake = FakeApi::default();
    // The spec carries the real-AWS form of the URL (what CEL accepts); the emulator resolves the
    // queue by its name.
    fake.insert(
        CP,
        manifest(json!({
            "source": {"queueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/clip-input"},
            "scaling": {"engine": "builtin", "cooldownSeconds": 2, "messagesPerInstance": 10, "pollingIntervalSeconds": 1},
            "compute": {"nodePool": {"provisioner": "none"}},
            "modelCache": {"claimName": "weights", "none": null}
        })),
    );
    let ctx = Context::new(
        fake.client(),
        OperatorSettings::default(),
        Arc::new(Metrics::default()),
        None,
        QueueReader::for_emulator(&moto.endpoint),
    );
    let action = converge(&fake, &ctx).await;
    assert_eq!(
        action,
        Action::requeue(super::RESYNC),
        "the scaler polls in its own loop: reconcile only resyncs"
    );
    // Messages wait (the loop wrote what it read), but the cache-warm Job has not filled the
    // shared cache: no workers yet.
    eventually("status.queue from the scaler", || {
        fake.get(CP).unwrap()["status"]["queue"]["visible"] == 25
    })
    .await;
    assert_eq!(replicas(&fake), 0);
    assert_eq!(condition(&fake, "CacheReady")["status"], "False");
    let mut job = fake.get(JOB).expect("the cache-warm Job");
    job["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    fake.insert(JOB, job);
    // The Job's change starts a reconcile, which tells the loop: 25 messages, 10 per worker,
    // 3 workers, set through the scale subresource.
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    eventually("3 workers", || replicas(&fake) == 3).await;
    assert!(fake.seen().iter().any(|s| s.method == Method::PATCH
        && s.path.ends_with("/photos-worker/scale")
        && s.query.contains("fieldManager=clip-operator-scaler")));
    eventually("lastScaleTime", || {
        fake.get(CP).unwrap()["status"]["lastScaleTime"].is_string()
    })
    .await;
    let status = fake.get(CP).unwrap()["status"].clone();
    assert_eq!(status["queue"]["visible"], 25);
    assert!(status["lastActiveTime"].is_string());
    // The Deployment's change starts a reconcile: replicas and conditions.
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert_eq!(condition(&fake, "ScalerReady")["reason"], "QueueReadable");
    let status = fake.get(CP).unwrap()["status"].clone();
    assert_eq!(status["replicas"]["desired"], 3);
    assert!(
        status["queue"].is_object(),
        "reconcile's status write leaves the scaler's fields alone"
    );

    // Drained: the workers stay through the cooldown, then go to zero.
    let drained = std::time::Instant::now();
    sqs.purge_queue().queue_url(&queue).send().await.unwrap();
    eventually("to zero after the cooldown", || replicas(&fake) == 0).await;
    assert!(
        drained.elapsed() >= Duration::from_secs(1),
        "the 2 s cooldown (from the last non-empty read, at most 1 s before the purge) held the workers"
    );
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert_eq!(
        condition(&fake, "WorkersAvailable")["reason"],
        "ScaledToZero"
    );
}

#[tokio::test]
async fn keda_holds_the_workers_at_zero_until_the_cache_warm_job_succeeded() {
    const SO: &str = "/apis/keda.sh/v1alpha1/namespaces/media/scaledobjects/photos";
    let (fake, ctx) = setup(json!({"modelCache": {"claimName": "weights", "none": null}}));
    converge(&fake, &ctx).await;
    let last_apply = |fake: &FakeApi| {
        fake.seen()
            .iter()
            .rev()
            .find(|s| s.method == Method::PATCH && s.path == SO)
            .and_then(|s| s.body.clone())
            .expect("the ScaledObject was applied")
    };
    assert_eq!(
        last_apply(&fake)["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"],
        "0",
        "KEDA must not start workers before the shared cache holds the weights"
    );
    let mut job = fake.get(JOB).expect("the cache-warm Job");
    job["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    fake.insert(JOB, job);
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(
        last_apply(&fake)["metadata"]
            .get("annotations")
            .is_none_or(|a| a.get("autoscaling.keda.sh/paused-replicas").is_none()),
        "the apply after the Job succeeded gives KEDA the scale"
    );
}

#[tokio::test]
async fn a_refused_child_is_one_failure_of_its_kind_and_the_others_still_apply() {
    let (fake, ctx) = setup(json!({}));
    fake.fail(
        Method::PATCH,
        "/apis/karpenter.sh/v1/nodepools/",
        404,
        "NotFound",
    );
    converge(&fake, &ctx).await;
    let degraded = condition(&fake, "Degraded");
    assert_eq!(degraded["reason"], "ApplyFailed");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("NodePool (is Karpenter installed?): "),
        "{degraded}"
    );
    assert!(exists(&fake, DEPLOYMENT), "the other children are applied");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &ctx.metrics.registry).unwrap();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("clip_operator_apply_failures_total{"))
        .collect();
    // One count per refused write (one per reconcile), all of kind NodePool.
    assert!(
        !counted.is_empty()
            && counted
                .iter()
                .all(|l| l.starts_with(r#"clip_operator_apply_failures_total{child="NodePool"}"#)),
        "{counted:?}"
    );
}

#[tokio::test]
async fn the_builtin_scaler_keeps_scaling_while_status_writes_are_refused() {
    let (moto, sqs, queue) = moto_queue().await;
    let fake = FakeApi::default();
    fake.insert(
        CP,
        manifest(json!({
            "source": {"queueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/clip-input"},
            "scaling": {"engine": "builtin", "messagesPerInstance": 10, "pollingIntervalSeconds": 1},
            "compute": {"nodePool": {"provisioner": "none"}},
            "modelCache": {"none": true, "efs": null}
        })),
    );
    let ctx = Context::new(
        fake.client(),
        OperatorSettings::default(),
        Arc::new(Metrics::default()),
        None,
        QueueReader::for_emulator(&moto.endpoint),
    );
    converge(&fake, &ctx).await;
    fake.fail(
        Method::PATCH,
        "/clipprocessors/photos/status",
        403,
        "Forbidden",
    );
    let send = |n: usize| {
        let (sqs, queue) = (sqs.clone(), queue.clone());
        async move {
            for _ in 0..n {
                sqs.send_message()
                    .queue_url(&queue)
                    .message_body("{}")
                    .send()
                    .await
                    .unwrap();
            }
        }
    };
    send(2).await;
    eventually("1 worker", || replicas(&fake) == 1).await;
    // Reconcile's own status write fails and backs off; the scaler's loop does not wait for it.
    let err = reconcile(current(&fake), ctx.clone()).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    send(20).await;
    eventually("3 workers", || replicas(&fake) == 3).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &ctx.metrics.registry).unwrap();
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"clip_operator_apply_failures_total{child="Status"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        refused >= 3,
        "the scaler's and reconcile's refused writes are counted: {refused}\n{text}"
    );
}

fn node_pool_gpus(fake: &FakeApi) -> Value {
    let path = fake
        .paths()
        .into_iter()
        .find(|p| p.contains("/nodepools/"))
        .expect("the NodePool");
    fake.get(&path).unwrap()["spec"]["limits"]["nvidia.com/gpu"].clone()
}

fn set_spec(fake: &FakeApi, generation: i64, f: impl FnOnce(&mut Value)) {
    let mut cp = fake.get(CP).unwrap();
    f(&mut cp["spec"]);
    cp["metadata"]["generation"] = json!(generation);
    fake.insert(CP, cp);
}

#[tokio::test]
async fn suspend_stops_the_scaler_scales_to_zero_and_closes_the_node_pool() {
    let (fake, ctx) = setup(json!({"scaling": {"engine": "builtin"}}));
    converge(&fake, &ctx).await;
    assert!(ctx.scalers.is_running("media", "photos"));
    assert_eq!(node_pool_gpus(&fake), "5");
    let mut d = fake.get(DEPLOYMENT).unwrap();
    d["spec"]["replicas"] = json!(3);
    fake.insert(DEPLOYMENT, d);

    set_spec(&fake, 2, |s| s["suspend"] = json!(true));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(
        !ctx.scalers.is_running("media", "photos"),
        "a suspended processor's queue is not read"
    );
    assert_eq!(replicas(&fake), 0, "workers scaled to zero");
    assert_eq!(node_pool_gpus(&fake), "0", "no room for a GPU node");
    assert_eq!(condition(&fake, "Suspended")["status"], "True");
    assert_eq!(condition(&fake, "Ready")["reason"], "Suspended");
    assert_eq!(condition(&fake, "ScalerReady")["reason"], "Suspended");
    assert_eq!(condition(&fake, "Degraded")["status"], "False");
    assert!(exists(&fake, DEPLOYMENT), "the children stay");

    set_spec(&fake, 3, |s| s["suspend"] = json!(false));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(ctx.scalers.is_running("media", "photos"), "resumed");
    assert_eq!(node_pool_gpus(&fake), "5");
    assert_eq!(condition(&fake, "Suspended")["status"], "False");
}

#[tokio::test]
async fn suspend_with_keda_pauses_the_scaled_object_at_zero() {
    const SO: &str = "/apis/keda.sh/v1alpha1/namespaces/media/scaledobjects/photos";
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    let paused = |fake: &FakeApi| {
        fake.get(SO).unwrap()["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"]
            .clone()
    };
    assert_eq!(paused(&fake), Value::Null);
    set_spec(&fake, 2, |s| s["suspend"] = json!(true));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert_eq!(paused(&fake), "0");
    assert_eq!(condition(&fake, "Suspended")["status"], "True");
}

#[tokio::test]
async fn the_query_endpoint_comes_and_goes_with_spec_query() {
    const QUERY: &str = "/apis/apps/v1/namespaces/media/deployments/photos-query";
    const SVC: &str = "/api/v1/namespaces/media/services/photos-query";
    const PDB: &str = "/apis/policy/v1/namespaces/media/poddisruptionbudgets/photos-query";
    const HPA: &str = "/apis/autoscaling/v2/namespaces/media/horizontalpodautoscalers/photos-query";
    let (fake, ctx) = setup(json!({}));
    converge(&fake, &ctx).await;
    assert!(!exists(&fake, "photos-query"));
    assert_eq!(fake.get(CP).unwrap()["status"]["query"], Value::Null);

    set_spec(&fake, 2, |s| {
        s["query"] = json!({"minReplicas": 1, "maxReplicas": 3})
    });
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    for path in [QUERY, SVC, PDB, HPA] {
        assert!(fake.get(path).is_some(), "{path} applied");
    }
    let d = fake.get(QUERY).unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["query"])
    );
    assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "cp-uid");
    assert_eq!(
        fake.get(CP).unwrap()["status"]["query"],
        json!({"url": "http://photos-query.media.svc:8080", "readyReplicas": 0})
    );
    assert!(fake.get(DEPLOYMENT).is_some(), "the workers stay");

    // A fixed count: the HPA goes; disabled: everything goes, the workers stay.
    set_spec(&fake, 3, |s| s["query"] = json!({"replicas": 2}));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(fake.get(HPA).is_none(), "HPA removed");
    assert_eq!(fake.get(QUERY).unwrap()["spec"]["replicas"], 2);
    set_spec(&fake, 4, |s| s["query"] = json!({"enabled": false}));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    for path in [QUERY, SVC, PDB] {
        assert!(fake.get(path).is_none(), "{path} removed");
    }
    assert!(fake.get(DEPLOYMENT).is_some(), "the workers stay");
    assert_eq!(fake.get(CP).unwrap()["status"]["query"], Value::Null);
}

#[tokio::test]
async fn the_sweep_leaves_kedas_hpa_alone() {
    // KEDA copies the ScaledObject's labels, ours included, onto the HPA it makes.
    const KEDA_HPA: &str =
        "/apis/autoscaling/v2/namespaces/media/horizontalpodautoscalers/keda-hpa-photos";
    let (fake, ctx) = setup(json!({}));
    fake.insert(
        KEDA_HPA,
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "keda-hpa-photos", "namespace": "media", "labels": {
                   "lakechain.dev/processor": "photos", "lakechain.dev/processor-namespace": "media",
                   "app.kubernetes.io/managed-by": "clip-operator"}},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "photos-worker"}, "maxReplicas": 5}}),
    );
    converge(&fake, &ctx).await;
    set_spec(&fake, 2, |s| s["scaling"]["maxInstances"] = json!(4));
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(
        fake.get(KEDA_HPA).is_some(),
        "KEDA's HPA is not ours to sweep"
    );
    assert!(fake.get(DEPLOYMENT).is_some());
}
