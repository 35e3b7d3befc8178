//! The scaler loop on tokio's paused clock, with a fake queue and a fake cluster: minutes of
//! polling run in milliseconds, and every read and write is counted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::mpsc;

use super::*;
use crate::crd::Scaling;
use crate::metrics::Metrics;

#[derive(Default)]
struct FakeQueue {
    depth: Mutex<Option<Result<QueueDepth, ScalerError>>>,
    reads: Mutex<u32>,
}

impl FakeQueue {
    fn set(&self, visible: u64, in_flight: u64) {
        *self.depth.lock().unwrap() = Some(Ok(QueueDepth { visible, in_flight }));
    }
    fn fail(&self, why: &str) {
        *self.depth.lock().unwrap() = Some(Err(ScalerError::Queue(why.into())));
    }
    fn reads(&self) -> u32 {
        *self.reads.lock().unwrap()
    }
}

impl QueueDepths for FakeQueue {
    fn depth<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, ScalerError>> {
        *self.reads.lock().unwrap() += 1;
        let d = self.depth.lock().unwrap().clone().unwrap_or(Ok(QueueDepth {
            visible: 0,
            in_flight: 0,
        }));
        Box::pin(async move { d })
    }
}

/// A Deployment's replicas, the scale writes and the status writes.
#[derive(Default)]
struct FakeCluster {
    replicas: Mutex<Option<i32>>,
    scales: Mutex<Vec<i32>>,
    statuses: Mutex<Vec<ScalerStatus>>,
    refuse_status: Mutex<bool>,
    refuse_scale: Mutex<bool>,
    events: Mutex<Vec<String>>,
}

impl FakeCluster {
    fn with_replicas(n: i32) -> Self {
        let c = FakeCluster::default();
        *c.replicas.lock().unwrap() = Some(n);
        c
    }
    fn scales(&self) -> Vec<i32> {
        self.scales.lock().unwrap().clone()
    }
    fn statuses(&self) -> Vec<ScalerStatus> {
        self.statuses.lock().unwrap().clone()
    }
    fn replicas_now(&self) -> Option<i32> {
        *self.replicas.lock().unwrap()
    }
}

impl ScaleTarget for FakeCluster {
    fn replicas<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<i32>, ScalerError>> {
        let r = *self.replicas.lock().unwrap();
        Box::pin(async move { Ok(r) })
    }
    fn scale<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        replicas: i32,
    ) -> BoxFuture<'a, Result<(), ScalerError>> {
        let r = if *self.refuse_scale.lock().unwrap() {
            Err(ScalerError::Scale("deployments.apps is forbidden".into()))
        } else {
            self.scales.lock().unwrap().push(replicas);
            *self.replicas.lock().unwrap() = Some(replicas);
            Ok(())
        };
        Box::pin(async move { r })
    }
    fn write_status<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        status: &'a ScalerStatus,
    ) -> BoxFuture<'a, Result<(), ScalerError>> {
        let r = if *self.refuse_status.lock().unwrap() {
            Err(ScalerError::Status(
                "clipprocessors/status is forbidden".into(),
            ))
        } else {
            self.statuses.lock().unwrap().push(status.clone());
            Ok(())
        };
        Box::pin(async move { r })
    }
    fn event<'a>(
        &'a self,
        _: &'a ObjectReference,
        reason: &'a str,
        _: String,
    ) -> BoxFuture<'a, ()> {
        self.events.lock().unwrap().push(reason.into());
        Box::pin(async {})
    }
}

struct Rig {
    queue: Arc<FakeQueue>,
    cluster: Arc<FakeCluster>,
    metrics: Arc<Metrics>,
    scalers: Scalers,
    asks: mpsc::UnboundedReceiver<(String, String)>,
}

fn rig(cluster: FakeCluster) -> Rig {
    let queue = Arc::new(FakeQueue::default());
    let cluster = Arc::new(cluster);
    let metrics = Arc::new(Metrics::default());
    let (tx, asks) = mpsc::unbounded_channel();
    let scalers = Scalers::default();
    scalers.install(Env::new(
        queue.clone(),
        cluster.clone(),
        metrics.clone(),
        tx,
    ));
    Rig {
        queue,
        cluster,
        metrics,
        scalers,
        asks,
    }
}

/// Seed defaults (max 5, 10 messages per worker, 300 s cooldown), polling every 15 s.
fn settings(warmed: bool) -> Settings {
    Settings {
        namespace: "media".into(),
        name: "photos".into(),
        reference: ObjectReference::default(),
        region: "us-east-1".into(),
        queue_url: "https://sqs.us-east-1.amazonaws.com/123456789012/clip-input".into(),
        deployment: "photos-worker".into(),
        scaling: Scaling::default(),
        warmed,
    }
}

/// Lets the clock run for `secs` (the paused runtime jumps from timer to timer).
async fn run_for(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

fn asks(r: &mut Rig) -> usize {
    std::iter::from_fn(|| r.asks.try_recv().ok()).count()
}

#[tokio::test(start_paused = true)]
async fn one_read_per_interval_and_one_scale_per_change() {
    let r = rig(FakeCluster::with_replicas(0));
    r.queue.set(25, 0);
    r.scalers.ensure(settings(true), Seed::default());
    run_for(150.5).await;
    // Ticks at 0, 15, ..., 150.
    assert_eq!(r.queue.reads(), 11);
    assert_eq!(
        r.cluster.scales(),
        vec![3],
        "scaled once, at the first tick"
    );
    assert_eq!(r.cluster.events.lock().unwrap().as_slice(), ["ScaledUp"]);
    // More messages: one more write, to the new target only.
    r.queue.set(41, 0);
    run_for(15.0).await;
    assert_eq!(r.cluster.scales(), vec![3, 5]);
    assert_eq!(r.metrics.queue_reads.get(), 12);
}

#[tokio::test(start_paused = true)]
async fn status_is_written_on_change_and_as_a_heartbeat_once_a_minute() {
    let r = rig(FakeCluster::with_replicas(0));
    r.scalers.ensure(settings(true), Seed::default());
    run_for(300.5).await;
    // 21 reads of an empty queue in 5 minutes: the first write, then one a minute.
    let written = r.cluster.statuses();
    assert_eq!(r.queue.reads(), 21);
    assert_eq!(written.len(), 1 + 5, "{written:?}");
    assert!(written.iter().all(|s| s.last_active_time.is_none()));
    // A change is written at the next tick.
    r.queue.set(3, 0);
    run_for(15.0).await;
    let last = r.cluster.statuses().last().cloned().unwrap();
    assert_eq!((last.queue.visible, last.queue.in_flight), (3, 0));
    assert!(last.last_active_time.is_some() && last.last_scale_time.is_some());
    // Unchanged counts while busy: only the heartbeat, although lastActiveTime moves each tick.
    let before = r.cluster.statuses().len();
    run_for(59.0).await;
    assert_eq!(r.cluster.statuses().len(), before);
}

#[tokio::test(start_paused = true)]
async fn scaling_goes_on_while_status_writes_are_refused() {
    let r = rig(FakeCluster::with_replicas(0));
    *r.cluster.refuse_status.lock().unwrap() = true;
    r.queue.set(25, 0);
    r.scalers.ensure(settings(true), Seed::default());
    run_for(0.5).await;
    assert_eq!(r.cluster.replicas_now(), Some(3));
    r.queue.set(50, 0);
    run_for(15.0).await;
    assert_eq!(r.cluster.replicas_now(), Some(5));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r.metrics.registry).unwrap();
    assert!(
        text.contains(r#"clip_operator_apply_failures_total{child="Status"} 2"#),
        "each refused write is counted and retried at the next tick\n{text}"
    );
    // Writes come back: the retry goes through at the next tick.
    *r.cluster.refuse_status.lock().unwrap() = false;
    run_for(15.0).await;
    assert_eq!(r.cluster.statuses().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_scale_up_waits_for_the_cache_and_starts_the_moment_it_is_warm() {
    let r = rig(FakeCluster::with_replicas(0));
    r.queue.set(25, 0);
    r.scalers.ensure(settings(false), Seed::default());
    run_for(60.5).await;
    assert!(r.cluster.scales().is_empty(), "held while the cache warms");
    // The Job completes 2 s after a tick; reconcile hands the loop `warmed`: no wait for the next
    // interval.
    run_for(2.0).await;
    let reads = r.queue.reads();
    r.scalers.ensure(settings(true), Seed::default());
    run_for(0.1).await;
    assert_eq!(r.cluster.scales(), vec![3]);
    assert_eq!(r.queue.reads(), reads + 1);
    // The same settings again are not a change: no extra tick.
    r.scalers.ensure(settings(true), Seed::default());
    run_for(0.1).await;
    assert_eq!(r.queue.reads(), reads + 1);
}

#[tokio::test(start_paused = true)]
async fn an_empty_queue_keeps_the_workers_through_the_cooldown_then_scales_to_zero() {
    let r = rig(FakeCluster::with_replicas(0));
    r.queue.set(25, 0);
    r.scalers.ensure(settings(true), Seed::default());
    run_for(0.5).await;
    r.queue.set(0, 0);
    run_for(285.0).await;
    assert_eq!(r.cluster.replicas_now(), Some(3), "cooldown holds (300 s)");
    run_for(30.0).await;
    assert_eq!(r.cluster.scales(), vec![3, 0]);
    assert_eq!(
        r.cluster.events.lock().unwrap().as_slice(),
        ["ScaledUp", "ScaledToMinimum"]
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_the_cooldown_counts_from_the_recorded_activity() {
    // One worker running, queue empty, last activity 200 s ago (from status): 100 s to go.
    let r = rig(FakeCluster::with_replicas(1));
    let last_active = Env::new(
        r.queue.clone(),
        r.cluster.clone(),
        r.metrics.clone(),
        mpsc::unbounded_channel().0,
    )
    .now()
    .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(200))
    .unwrap();
    r.scalers.ensure(
        settings(true),
        Seed {
            last_active: Some(last_active),
            last_scale: None,
        },
    );
    run_for(90.5).await;
    assert!(r.cluster.scales().is_empty());
    run_for(15.0).await;
    assert_eq!(r.cluster.scales(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn reconcile_is_asked_for_only_when_what_it_reports_changes() {
    let mut r = rig(FakeCluster::with_replicas(0));
    r.scalers.ensure(settings(true), Seed::default());
    run_for(0.5).await;
    assert_eq!(asks(&mut r), 1, "the first read: ScalerReady becomes known");
    run_for(60.0).await;
    assert_eq!(asks(&mut r), 0, "steady reads ask for nothing");
    r.queue.fail("GetQueueAttributes: AccessDenied");
    run_for(60.0).await;
    assert_eq!(asks(&mut r), 1, "one ask when the queue becomes unreadable");
    assert_eq!(
        r.scalers.observation("media", "photos").unwrap().queue,
        Some(QueueRead::Unreadable(
            "GetQueueAttributes: AccessDenied".into()
        ))
    );
    r.queue.set(25, 0);
    *r.cluster.refuse_scale.lock().unwrap() = true;
    run_for(15.0).await;
    // Readable again, and the scale refused: one ask for both.
    assert_eq!(asks(&mut r), 1);
    let o = r.scalers.observation("media", "photos").unwrap();
    assert_eq!(o.queue, Some(QueueRead::Readable));
    assert!(matches!(o.scale_error, Some(ScalerError::Scale(_))));
    *r.cluster.refuse_scale.lock().unwrap() = false;
    run_for(15.0).await;
    assert_eq!(asks(&mut r), 1, "the scale went through");
    assert_eq!(r.cluster.replicas_now(), Some(3));
}

#[tokio::test(start_paused = true)]
async fn the_fallback_runs_its_workers_after_the_threshold_and_ends_with_a_good_read() {
    let r = rig(FakeCluster::with_replicas(1));
    let mut s = settings(true);
    s.scaling.fallback = Some(crate::crd::Fallback {
        failure_threshold: 3,
        replicas: 4,
    });
    r.queue.fail("GetQueueAttributes: ServiceUnavailable");
    r.scalers.ensure(s.clone(), Seed::default());
    // Reads at 0 and 15 fail: below the threshold, the workers stay as they are.
    run_for(20.0).await;
    assert!(r.cluster.scales().is_empty());
    // The third failure in a row: 4 workers, once.
    run_for(30.0).await;
    assert_eq!(r.cluster.scales(), vec![4]);
    assert_eq!(r.cluster.events.lock().unwrap().as_slice(), ["Fallback"]);
    assert_eq!(
        r.scalers.observation("media", "photos").unwrap().queue,
        Some(QueueRead::Unreadable(
            "GetQueueAttributes: ServiceUnavailable (fallback: 4 workers until a read succeeds)"
                .into()
        ))
    );
    // A good read: the queue decides again (5 messages: 1 worker, but only once the
    // stabilisation window has passed the fallback's recommendation).
    r.queue.set(5, 0);
    run_for(15.0).await;
    assert_eq!(r.cluster.scales(), vec![4]);
    assert_eq!(
        r.scalers.observation("media", "photos").unwrap().queue,
        Some(QueueRead::Readable)
    );
    // One failure after a success starts the count again.
    r.queue.fail("GetQueueAttributes: ServiceUnavailable");
    run_for(15.0).await;
    assert_eq!(r.cluster.scales(), vec![4], "one failure is not three");
    // Without a fallback (the default), failures never scale.
    let r = rig(FakeCluster::with_replicas(1));
    r.queue.fail("GetQueueAttributes: ServiceUnavailable");
    r.scalers.ensure(settings(true), Seed::default());
    run_for(600.0).await;
    assert!(r.cluster.scales().is_empty());
}

#[tokio::test(start_paused = true)]
async fn below_the_activation_length_the_queue_starts_no_worker() {
    let r = rig(FakeCluster::with_replicas(0));
    let mut s = settings(true);
    s.scaling.activation_queue_length = 50;
    r.queue.set(50, 0);
    r.scalers.ensure(s, Seed::default());
    run_for(60.5).await;
    assert!(r.cluster.scales().is_empty(), "50 messages do not activate");
    assert!(
        r.cluster
            .statuses()
            .iter()
            .all(|st| st.last_active_time.is_none()),
        "nor count as activity"
    );
    r.queue.set(51, 0);
    run_for(15.0).await;
    assert_eq!(r.cluster.scales(), vec![5]);
}

#[tokio::test(start_paused = true)]
async fn stopping_ends_the_loop_and_no_deployment_means_no_scaling() {
    let r = rig(FakeCluster::default());
    r.queue.set(25, 0);
    r.scalers.ensure(settings(true), Seed::default());
    run_for(30.5).await;
    assert!(r.cluster.scales().is_empty(), "no Deployment yet");
    assert!(r.scalers.is_running("media", "photos"));
    r.scalers.stop("media", "photos");
    let reads = r.queue.reads();
    run_for(120.0).await;
    assert_eq!(r.queue.reads(), reads, "a stopped loop reads nothing");
    assert!(!r.scalers.is_running("media", "photos"));
    // A new controller term (install) stops what the old one ran.
    r.scalers.ensure(settings(true), Seed::default());
    assert!(r.scalers.is_running("media", "photos"));
    r.scalers.stop_all();
    assert!(r.scalers.observation("media", "photos").is_none());
}
