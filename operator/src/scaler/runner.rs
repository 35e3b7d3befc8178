//! The builtin scaler's own loop: one task per processor, started, updated and stopped by
//! reconcile through a watch channel carrying the validated settings.
//!
//! Each polling interval the loop reads the queue once, runs [`decide`](super::decide) with the
//! history it owns, and
//! * patches `deployments/scale` only when the decision differs from the Deployment's replicas
//!   (and holds a scale-up until the shared model cache is warm);
//! * writes `status.queue`, `status.lastActiveTime` and `status.lastScaleTime` under its own field
//!   manager, only when the counts or the scale time changed, or as a heartbeat once a minute;
//! * asks for a reconcile only when what reconcile reports changes (the queue became readable or
//!   unreadable, a scale write started or stopped failing).
//!
//! Reconcile health does not stop it: a refused status write is counted and retried at the next
//! tick, and scaling goes on. The queue and the cluster are behind two small traits, so the loop
//! is tested with fakes on tokio's paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::sqs::QueueDepth;
use super::{History, ScaleInput, decide};
use crate::crd::{QueueStatus, Scaling};
use crate::metrics::{DecisionLabels, Metrics, ProcessorLabels, QueueLabels};
use crate::reconcile::status::Child;

/// The field manager of the scaler's writes (scale and its status fields).
pub const FIELD_MANAGER: &str = "clip-operator-scaler";

/// The longest the loop goes without writing its status fields (the heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// Why a scaler step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScalerError {
    /// `GetQueueAttributes` failed or timed out.
    #[error("{0}")]
    Queue(String),
    /// The worker Deployment could not be read.
    #[error("cannot read the worker Deployment: {0}")]
    Deployment(String),
    /// The write to `deployments/scale` was refused.
    #[error("{0}")]
    Scale(String),
    /// The status write was refused.
    #[error("{0}")]
    Status(String),
}

/// Reads a queue's depth (the SQS adapter, or a fake in tests).
pub trait QueueDepths: Send + Sync {
    fn depth<'a>(
        &'a self,
        region: &'a str,
        queue_url: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, ScalerError>>;
}

/// The fields of `status` the scaler owns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalerStatus {
    pub queue: QueueStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_active_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

/// The cluster side of the scaler (the Kubernetes API, or a fake in tests).
pub trait ScaleTarget: Send + Sync {
    /// The worker Deployment's replicas; `None` while it does not exist.
    fn replicas<'a>(
        &'a self,
        namespace: &'a str,
        deployment: &'a str,
    ) -> BoxFuture<'a, Result<Option<i32>, ScalerError>>;
    fn scale<'a>(
        &'a self,
        namespace: &'a str,
        deployment: &'a str,
        replicas: i32,
    ) -> BoxFuture<'a, Result<(), ScalerError>>;
    fn write_status<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: &'a ScalerStatus,
    ) -> BoxFuture<'a, Result<(), ScalerError>>;
    /// A `Scale` Event on the processor (best effort).
    fn event<'a>(
        &'a self,
        processor: &'a ObjectReference,
        reason: &'a str,
        note: String,
    ) -> BoxFuture<'a, ()>;
}

/// What reconcile hands the loop. A change is delivered at once; a change of `warmed` to true
/// starts a tick at once (the held workers start without waiting for the interval).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    /// The processor, for Events.
    pub reference: ObjectReference,
    pub region: String,
    pub queue_url: String,
    pub deployment: String,
    pub scaling: Scaling,
    /// The shared model cache holds the weights (always true without a shared cache).
    pub warmed: bool,
}

impl Settings {
    fn interval(&self) -> Duration {
        Duration::from_secs(self.scaling.polling_interval_seconds.max(1) as u64)
    }
}

/// What the loop knew before a restart, read from status when it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Seed {
    pub last_active: Option<Timestamp>,
    pub last_scale: Option<Timestamp>,
}

/// How the queue read went, as far as conditions go (the counts are in `status.queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueRead {
    Readable,
    Unreadable(String),
}

/// What reconcile reports from the loop (conditions); a change asks for a reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// `None` until the first read.
    pub queue: Option<QueueRead>,
    /// The last scale write (or Deployment read) failed.
    pub scale_error: Option<ScalerError>,
}

/// What a running loop needs from outside.
#[derive(Clone)]
pub struct Env {
    pub queues: Arc<dyn QueueDepths>,
    pub target: Arc<dyn ScaleTarget>,
    pub metrics: Arc<Metrics>,
    /// Asks for a reconcile of `(namespace, name)`.
    pub reconcile: mpsc::UnboundedSender<(String, String)>,
    /// Wall time at `base_instant`: the loop's clock is tokio's (paused in tests).
    base_time: Timestamp,
    base_instant: Instant,
}

impl Env {
    pub fn new(
        queues: Arc<dyn QueueDepths>,
        target: Arc<dyn ScaleTarget>,
        metrics: Arc<Metrics>,
        reconcile: mpsc::UnboundedSender<(String, String)>,
    ) -> Self {
        Env {
            queues,
            target,
            metrics,
            reconcile,
            base_time: Timestamp::now(),
            base_instant: Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = SignedDuration::try_from(self.base_instant.elapsed()).unwrap_or_default();
        self.base_time
            .checked_add(elapsed)
            .unwrap_or(self.base_time)
    }
}

struct Handle {
    settings: watch::Sender<Settings>,
    observation: Arc<Mutex<Observation>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running loops, by `namespace/name`.
#[derive(Default)]
pub struct Scalers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    env: Option<Env>,
    running: HashMap<String, Handle>,
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Scalers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The environment of loops started from now on (the controller installs its own when it
    /// starts, with its Deployment cache and its reconcile trigger). Running loops are stopped.
    pub fn install(&self, env: Env) {
        let mut inner = self.lock();
        inner.running.clear();
        inner.env = Some(env);
    }

    /// Stops every loop (the controller stopped: shutdown or a lost lease).
    pub fn stop_all(&self) {
        self.lock().running.clear();
    }

    /// Starts the processor's loop, or hands it new settings (a no-op when they are the same).
    pub fn ensure(&self, settings: Settings, seed: Seed) {
        let k = key(&settings.namespace, &settings.name);
        let mut inner = self.lock();
        if let Some(h) = inner.running.get(&k)
            && !h.task.is_finished()
        {
            h.settings.send_if_modified(|s| {
                let changed = *s != settings;
                if changed {
                    *s = settings;
                }
                changed
            });
            return;
        }
        let Some(env) = inner.env.clone() else {
            tracing::error!(processor = %k, "no scaler environment installed");
            return;
        };
        let (tx, rx) = watch::channel(settings);
        let observation = Arc::new(Mutex::new(Observation::default()));
        let task = tokio::spawn(run(rx, seed, env, observation.clone()));
        inner.running.insert(
            k,
            Handle {
                settings: tx,
                observation,
                task,
            },
        );
    }

    /// Stops the processor's loop (keda engine, invalid spec, deletion).
    pub fn stop(&self, namespace: &str, name: &str) {
        self.lock().running.remove(&key(namespace, name));
    }

    pub fn is_running(&self, namespace: &str, name: &str) -> bool {
        self.lock()
            .running
            .get(&key(namespace, name))
            .is_some_and(|h| !h.task.is_finished())
    }

    /// What the loop last saw (`None` when it is not running).
    pub fn observation(&self, namespace: &str, name: &str) -> Option<Observation> {
        let inner = self.lock();
        let h = inner.running.get(&key(namespace, name))?;
        Some(
            h.observation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The loop's own state between ticks.
struct State {
    history: History,
    last_active: Option<Timestamp>,
    last_scale: Option<Timestamp>,
    /// The last status written, and when.
    written: Option<(ScalerStatus, Instant)>,
    /// A scale-up is being held for the cache (logged once).
    holding: bool,
    /// Failed queue reads in a row (for `scaling.fallback`).
    failures: i32,
}

async fn run(
    mut rx: watch::Receiver<Settings>,
    seed: Seed,
    env: Env,
    observation: Arc<Mutex<Observation>>,
) {
    let mut s = rx.borrow_and_update().clone();
    let mut st = State {
        history: History::default(),
        last_active: seed.last_active,
        last_scale: seed.last_scale,
        written: None,
        holding: false,
        failures: 0,
    };
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let new = rx.borrow_and_update().clone();
                if new.warmed && !s.warmed {
                    next = Instant::now();
                } else if new.interval() < s.interval() {
                    next = next.min(Instant::now() + new.interval());
                }
                s = new;
                continue;
            }
        }
        next = Instant::now() + s.interval();
        tick(&s, &mut st, &env, &observation).await;
    }
}

fn observe(
    env: &Env,
    s: &Settings,
    observation: &Mutex<Observation>,
    f: impl FnOnce(&mut Observation),
) {
    let changed = {
        let mut o = observation.lock().unwrap_or_else(|e| e.into_inner());
        let before = o.clone();
        f(&mut o);
        *o != before
    };
    if changed {
        let _ = env.reconcile.send((s.namespace.clone(), s.name.clone()));
    }
}

fn count_refused(env: &Env, child: Child) {
    env.metrics.count_refused(child.label());
}

/// One polling interval: read, decide, scale, write status.
async fn tick(s: &Settings, st: &mut State, env: &Env, observation: &Mutex<Observation>) {
    let processor = key(&s.namespace, &s.name);
    env.metrics.queue_reads.inc();
    let depth = match env.queues.depth(&s.region, &s.queue_url).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(processor = %processor, "cannot read the queue: {e}");
            st.failures = st.failures.saturating_add(1);
            let mut why = e.to_string();
            let mut fell_back = None;
            if let Some(f) = &s.scaling.fallback
                && st.failures >= f.failure_threshold
            {
                let replicas = f
                    .replicas
                    .clamp(s.scaling.min_instances, s.scaling.max_instances);
                why = format!("{why} (fallback: {replicas} workers until a read succeeds)");
                fell_back = Some(fall_back(s, st, env, replicas).await);
            }
            observe(env, s, observation, |o| {
                o.queue = Some(QueueRead::Unreadable(why));
                if let Some(scale_error) = fell_back {
                    o.scale_error = scale_error;
                }
            });
            return;
        }
    };
    st.failures = 0;
    let now = env.now();
    for (state, v) in [("visible", depth.visible), ("in_flight", depth.in_flight)] {
        let l = QueueLabels {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            state: state.into(),
        };
        env.metrics.queue_messages.get_or_create(&l).set(v as i64);
    }
    if super::active(&s.scaling, depth.visible, depth.in_flight) {
        st.last_active = Some(now);
    }
    let scale_error = scale(s, st, env, depth, now).await;
    observe(env, s, observation, |o| {
        o.queue = Some(QueueRead::Readable);
        o.scale_error = scale_error;
    });
    write_status(s, st, env, depth, now).await;
}

/// Decides and, when the decision differs from the Deployment, patches its scale.
async fn scale(
    s: &Settings,
    st: &mut State,
    env: &Env,
    depth: QueueDepth,
    now: Timestamp,
) -> Option<ScalerError> {
    let processor = key(&s.namespace, &s.name);
    let current = match env.target.replicas(&s.namespace, &s.deployment).await {
        Ok(Some(c)) => c,
        // Reconcile creates it; nothing to scale yet.
        Ok(None) => return None,
        Err(e) => return Some(e),
    };
    let input = ScaleInput::from_spec(
        &s.scaling,
        depth.visible,
        depth.in_flight,
        current,
        now,
        st.last_active,
    );
    let decision = decide(&input, &mut st.history);
    env.metrics
        .desired_replicas
        .get_or_create(&ProcessorLabels {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        })
        .set(i64::from(decision.desired));
    if decision.desired == current {
        st.holding = false;
        return None;
    }
    // Workers start once the shared cache holds the weights: a GPU node started earlier would
    // only wait for the download, and every worker would queue on the download lock.
    if decision.desired > current && !s.warmed {
        if !st.holding {
            tracing::info!(processor = %processor, "holding {current} workers until the cache-warm Job has filled the model cache ({} messages waiting)", depth.visible);
        }
        st.holding = true;
        return None;
    }
    st.holding = false;
    if let Err(e) = env
        .target
        .scale(&s.namespace, &s.deployment, decision.desired)
        .await
    {
        count_refused(env, Child::Scale);
        tracing::warn!(processor = %processor, "cannot scale the workers to {}: {e}", decision.desired);
        return Some(e);
    }
    let note = format!(
        "workers {current} -> {} ({} messages waiting, {} in flight)",
        decision.desired, depth.visible, depth.in_flight
    );
    tracing::info!(processor = %processor, "{}: {note}", decision.reason.as_str());
    scaled(s, st, env, now, decision.reason.as_str(), note).await;
    None
}

/// After a scale write: the scale time, the decision counter and the Event.
async fn scaled(
    s: &Settings,
    st: &mut State,
    env: &Env,
    now: Timestamp,
    reason: &str,
    note: String,
) {
    st.last_scale = Some(now);
    env.metrics
        .decisions
        .get_or_create(&DecisionLabels {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            reason: reason.into(),
        })
        .inc();
    env.target.event(&s.reference, reason, note).await;
}

/// `scaling.fallback`: the queue has been unreadable `failureThreshold` times in a row, so the
/// workers go to the fallback count (a scale-up still waits for the model cache).
async fn fall_back(s: &Settings, st: &mut State, env: &Env, replicas: i32) -> Option<ScalerError> {
    // As KEDA's synthetic metric does for the HPA: the fallback is a recommendation, so once the
    // queue is readable again the workers come down only through the stabilisation window.
    let window = SignedDuration::from_secs(i64::from(super::stabilization_seconds(&s.scaling)));
    st.history.record(env.now(), replicas, window);
    let current = match env.target.replicas(&s.namespace, &s.deployment).await {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(e) => return Some(e),
    };
    if current == replicas || (replicas > current && !s.warmed) {
        return None;
    }
    if let Err(e) = env
        .target
        .scale(&s.namespace, &s.deployment, replicas)
        .await
    {
        count_refused(env, Child::Scale);
        return Some(e);
    }
    let note = format!(
        "workers {current} -> {replicas}: the queue could not be read {} times in a row",
        st.failures
    );
    tracing::warn!(processor = %key(&s.namespace, &s.name), "Fallback: {note}");
    scaled(s, st, env, env.now(), "Fallback", note).await;
    None
}

/// Writes the scaler's status fields when the counts or the scale time changed, or once a
/// `HEARTBEAT` (the time of the last activity rides along; alone it is not a reason to write).
async fn write_status(s: &Settings, st: &mut State, env: &Env, depth: QueueDepth, now: Timestamp) {
    let status = ScalerStatus {
        queue: QueueStatus {
            visible: depth.visible as i64,
            in_flight: depth.in_flight as i64,
            read_at: Time(now),
        },
        last_active_time: st.last_active.map(Time),
        last_scale_time: st.last_scale.map(Time),
    };
    let due = match &st.written {
        None => true,
        Some((w, at)) => {
            w.queue.visible != status.queue.visible
                || w.queue.in_flight != status.queue.in_flight
                || w.last_scale_time != status.last_scale_time
                || at.elapsed() >= HEARTBEAT
        }
    };
    if !due {
        return;
    }
    match env
        .target
        .write_status(&s.namespace, &s.name, &status)
        .await
    {
        Ok(()) => st.written = Some((status, Instant::now())),
        Err(e) => {
            // Retried at the next tick; scaling does not wait for it.
            count_refused(env, Child::Status);
            tracing::warn!(processor = %key(&s.namespace, &s.name), "cannot write status (scaling goes on): {e}");
        }
    }
}

#[cfg(test)]
mod tests;
