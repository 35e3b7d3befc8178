//! The controller: validate (pure) -> build (pure) -> apply (server-side apply, orphan cleanup)
//! -> hand the builtin scaler its settings -> status (pure, from observed children) -> patch
//! status. The builtin scaler runs in its own loop per processor (`scaler::runner`); reconcile
//! runs when the spec or a child changes, when the scaler reports a change, and every `RESYNC`.
//! Children are read from watch caches (`observe`); one whose wanted object and live version
//! are those of the last apply is not applied again.

pub mod apply;
pub mod build;
#[cfg(test)]
mod fake;
pub mod observe;
pub mod scope;
pub mod status;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use std::sync::Mutex;

use crate::class::{self, ClipProcessorClass};
use crate::crd::{ClipProcessor, ClipProcessorStatus, ScalingEngine};
use crate::external::karpenter::NodePool;
use crate::external::keda_scaled_object::ScaledObject;
use crate::external::keda_trigger_authentication::TriggerAuthentication;
use crate::metrics::{ConditionLabels, ErrorLabels, Metrics};
use crate::scaler::runner::{self, Env, QueueDepths, Scalers, Seed};
use crate::scaler::target::KubeTarget;
use build::{Children, FIELD_MANAGER, QueryChildren, names, selector};
use status::{ApplyError, Child, Observed};
use validate::{OperatorSettings, ValidatedProcessor};

/// The finalizer that deletes cluster-scoped children (NodePool, PersistentVolume).
pub const FINALIZER: &str = "lakechain.dev/cleanup";

/// Without the watch caches (tests, one-off reconciles): how often the orphan sweep (six
/// label-selected lists) runs while the set of wanted children stays the same; it runs at once
/// whenever that set changes. With them, the sweep reads the caches at every reconcile.
const ORPHAN_RESYNC: Duration = Duration::from_secs(300);

/// How often a processor is reconciled when nothing changed. Every child is watched, so this is
/// a safety net (a missed watch event); a resync with nothing to change makes no request.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Why a reconcile failed. The variant name is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(String),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: OperatorSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub queues: Arc<dyn QueueDepths>,
    /// The builtin scaler's loops.
    pub scalers: Scalers,
    /// Per processor: consecutive failures, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per processor: the wanted children at the last complete orphan sweep, and when it ran
    /// (without the watch caches: tests and one-off reconciles).
    swept: Mutex<HashMap<String, (Vec<String>, Instant)>>,
    /// The watch caches of the children, while `run` runs.
    stores: Mutex<Option<observe::Stores>>,
    /// The watch caches of the processors and the classes, while `run` runs (budgets are shared
    /// among a class's processors).
    api_stores: Mutex<Option<(Store<ClipProcessor>, Store<ClipProcessorClass>)>>,
    /// What was last applied per child (skips applies that would change nothing).
    applied: observe::Applied,
    /// Per processor (uid): reconcile's part of status as last written. A reconcile started
    /// before its own previous write reached the cache sees an older status; comparing with
    /// this keeps it from writing the same status and publishing the same Events again.
    written: Mutex<HashMap<String, OwnStatus>>,
}

/// Reconcile's fields of status (the scaler owns `queue`, `lastActiveTime`, `lastScaleTime`).
type OwnStatus = (
    Option<i64>,
    Vec<Condition>,
    Option<crate::crd::ReplicaStatus>,
    Option<crate::crd::QueryStatus>,
);

fn own(s: &ClipProcessorStatus) -> OwnStatus {
    (
        s.observed_generation,
        s.conditions.clone(),
        s.replicas.clone(),
        s.query.clone(),
    )
}

impl Context {
    pub fn new(
        client: Client,
        settings: OperatorSettings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
        queues: impl QueueDepths + 'static,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: "clip-operator".into(),
            instance,
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let queues: Arc<dyn QueueDepths> = Arc::new(queues);
        let scalers = Scalers::default();
        // Outside `run` (tests, one-off reconciles): Deployments read from the API, and no one
        // listens for the scaler's reconcile requests.
        scalers.install(Env::new(
            queues.clone(),
            Arc::new(KubeTarget::new(client.clone(), None, recorder.clone())),
            metrics.clone(),
            mpsc::unbounded_channel().0,
        ));
        Arc::new(Context {
            recorder,
            client,
            settings,
            metrics,
            queues,
            scalers,
            failures: Default::default(),
            swept: Default::default(),
            stores: Default::default(),
            api_stores: Default::default(),
            applied: Default::default(),
            written: Default::default(),
        })
    }

    fn stores(&self) -> Option<observe::Stores> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwnStatus>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the scaler's loops and the watch tasks when the controller stops (shutdown, or its
/// future dropped when the lease is lost): only the leader scales. What it remembers of its own
/// writes is forgotten, since another replica may write while this one is not the leader.
struct StopScalers(Arc<Context>, Vec<tokio::task::JoinHandle<()>>);

impl Drop for StopScalers {
    fn drop(&mut self) {
        self.0.scalers.stop_all();
        for t in &self.1 {
            t.abort();
        }
        *self.0.stores.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.0.api_stores.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.applied.clear();
        self.0.written().clear();
    }
}

/// What a reconcile acts on in a processor's own object: its spec (the generation), its deletion
/// and its finalizers. Status writes (the operator's own, every polling interval with the
/// builtin scaler) and other metadata changes do not start a reconcile; owned children, the
/// scaler's requeue and the periodic resync still do.
pub fn reconcile_trigger(cp: &ClipProcessor) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = &cp.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.generation.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    m.finalizers.hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until the stream ends (shutdown).
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    // The processors' cache, fed by its own task (as the children's are, `observe`): the
    // controller takes the changes that pass `reconcile_trigger` from a channel.
    let (reader, writer) = reflector::store::<ClipProcessor>();
    // A change of any child, and the scaler's asks, name the processor to reconcile.
    let (asks, asked) = mpsc::unbounded_channel::<(String, String)>();
    let (changed, changes) = mpsc::unbounded_channel::<ClipProcessor>();
    // A class change reaches every processor it may serve (those naming it, and those naming
    // none, for a default class). Without the class CRD (an older one installed by hand) the
    // watch retries with backoff and there are no classes.
    let class_asks = asks.clone();
    let members = reader.clone();
    let mut tasks = Vec::new();
    let class_reader = observe::feed_with(
        |w| {
            scope::watch_all(
                &client,
                watcher::Config::default().any_semantic(),
                w,
                |_| {},
            )
        },
        move |c: &ClipProcessorClass| {
            let name = c.name_any();
            for cp in members.state() {
                if cp.spec.class_name.as_ref().is_none_or(|n| *n == name) {
                    let _ = class_asks.send((ns_of(&cp), cp.name_any()));
                }
            }
        },
        &mut |t| tasks.push(t),
    );
    let (peers, classes) = (reader.clone(), class_reader.clone());
    let peer_asks = asks.clone();
    let watch = scope::watch(
        &client,
        &ctx.settings.namespaces,
        watcher::Config::default().any_semantic(),
        writer,
        observe::slim,
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(reconcile_trigger, Default::default())
    .for_each(move |r| {
        match r {
            Ok(cp) => {
                // The processors that share its class budget may now get more or less.
                for (ns, name) in budget_peers(&cp, &peers, &classes) {
                    let _ = peer_asks.send((ns, name));
                }
                let _ = changed.send(cp);
            }
            Err(e) => tracing::warn!("watch of ClipProcessors: {e} (retrying with backoff)"),
        }
        futures::future::ready(())
    });
    *ctx.api_stores.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((reader.clone(), class_reader.clone()));
    tasks.push(tokio::spawn(watch));
    let changes = futures::stream::unfold(changes, |mut rx| async move {
        let cp = rx.recv().await?;
        Some((Ok::<_, watcher::Error>(cp), rx))
    });
    let (stores, feeds) = observe::Stores::start(&client, &ctx.settings.namespaces, asks.clone());
    tasks.extend(feeds);
    *ctx.stores.lock().unwrap_or_else(|e| e.into_inner()) = Some(stores.clone());
    // The scaler loops read the current replicas from the Deployment cache (no request per
    // tick).
    ctx.scalers.install(Env::new(
        ctx.queues.clone(),
        Arc::new(KubeTarget::new(
            client.clone(),
            Some(stores.deployments.clone()),
            ctx.recorder.clone(),
        )),
        ctx.metrics.clone(),
        asks,
    ));
    let _stop = StopScalers(ctx.clone(), tasks);
    let asks = futures::stream::unfold(asked, |mut rx| async move {
        let (ns, name) = rx.recv().await?;
        Some((ObjectRef::<ClipProcessor>::new(&name).within(&ns), rx))
    });
    Controller::for_stream(changes, reader)
        .reconcile_on(asks)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

fn key(cp: &ClipProcessor) -> String {
    format!("{}/{}", cp.namespace().unwrap_or_default(), cp.name_any())
}

fn uid(cp: &ClipProcessor) -> String {
    cp.uid().unwrap_or_else(|| key(cp))
}

pub(crate) async fn reconcile(cp: Arc<ClipProcessor>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = cp.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ClipProcessor> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, cp.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(cp) => apply(cp, &ctx).await,
            FinalizerEvent::Cleanup(cp) => cleanup(cp, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(&cp));
    }
    result
}

/// Exponential backoff per processor: 5 s, 10 s, ... up to 5 minutes.
pub(crate) fn error_policy(cp: Arc<ClipProcessor>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabels {
            error: err.label().into(),
        })
        .inc();
    tracing::warn!(processor = %key(&cp), "reconcile failed: {err}");
    let attempts = {
        let mut f = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = f.entry(key(&cp)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    Action::requeue(Duration::from_secs(
        (5u64 << attempts.min(6).saturating_sub(1)).min(300),
    ))
}

async fn apply(cp: Arc<ClipProcessor>, ctx: &Context) -> Result<Action, Error> {
    let mut previous = cp.status.clone().unwrap_or_default();
    if let Some((generation, conditions, replicas, query)) = ctx.written().get(&uid(&cp)).cloned() {
        // This reconcile may have started from a copy older than the last write.
        previous.observed_generation = generation;
        previous.conditions = conditions;
        previous.replicas = replicas;
        previous.query = query;
    }
    let now = Time(Timestamp::now());
    let resolved = match validate::validate(&cp, &ctx.settings) {
        Ok(p) => governed(ctx, &cp, p).await?,
        Err(invalid) => Err(class::Refusal {
            reason: "InvalidSpec",
            message: invalid.0,
        }),
    };
    let p = match resolved {
        Ok(p) => p,
        Err(refusal) => {
            ctx.scalers.stop(&ns_of(&cp), &cp.name_any());
            let conditions = status::invalid_conditions(
                refusal.reason,
                &refusal.message,
                cp.metadata.generation,
                &previous.conditions,
                &now,
            );
            let status = ClipProcessorStatus {
                observed_generation: cp.metadata.generation,
                conditions,
                replicas: previous.replicas.clone(),
                ..Default::default()
            };
            publish_transitions(ctx, &cp, &previous.conditions, &status.conditions).await;
            patch_status(ctx, &cp, &previous, status).await?;
            // Nothing to do until the spec changes.
            return Ok(Action::await_change());
        }
    };
    let owner = cp
        .controller_owner_ref(&())
        .expect("a ClipProcessor from the API has a uid");
    let desired = build::children(&p);
    let mut observed = Observed::default();
    let stores = ctx.stores();
    apply_children(ctx, stores.as_ref(), &p, &desired, &owner, &mut observed).await;
    // Children become orphans only when the wanted set changes (model, engine, cache,
    // provisioner): the sweep runs then, and every ORPHAN_RESYNC, not on every scaler tick.
    // With the watch caches the sweep reads them and costs no request; without, it lists.
    let wanted = wanted(&desired);
    let sweep_due = stores.is_some()
        || match ctx
            .swept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key(&cp))
        {
            Some((last, at)) => *last != wanted || at.elapsed() >= ORPHAN_RESYNC,
            None => true,
        };
    if sweep_due {
        match delete_orphans(ctx, stores.as_ref(), &p, &desired).await {
            Ok(()) => {
                ctx.swept
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key(&cp), (wanted, Instant::now()));
            }
            Err(e) => {
                count_refused(ctx, Child::OrphanSweep);
                observed
                    .apply_errors
                    .push(ApplyError::new(Child::OrphanSweep, e))
            }
        }
    }

    match p.engine {
        ScalingEngine::Builtin if p.held() => {
            ctx.scalers.stop(&p.namespace, &p.name);
            suspend_workers(ctx, &p, &mut observed).await;
        }
        ScalingEngine::Builtin => {
            // Start the processor's scaler loop, or hand it what changed; the scaler's
            // replicas come from the Deployment and its queue read from the loop.
            ctx.scalers.ensure(
                runner::Settings {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    reference: ObjectReference {
                        // Not the resourceVersion: it moves with every status write.
                        resource_version: None,
                        ..cp.object_ref(&())
                    },
                    region: p.region.clone(),
                    queue_url: p.spec.source.queue_url.clone(),
                    deployment: names::worker(&p),
                    scaling: p.spec.scaling.clone(),
                    warmed: status::cache_warmed(&p, &observed),
                },
                Seed {
                    last_active: previous.last_active_time.as_ref().map(|t| t.0),
                    last_scale: previous.last_scale_time.as_ref().map(|t| t.0),
                },
            );
            if let Some(o) = ctx.scalers.observation(&p.namespace, &p.name) {
                observed.scaler = o.queue;
                observed.scale_error = o.scale_error;
            }
        }
        ScalingEngine::Keda => {
            ctx.scalers.stop(&p.namespace, &p.name);
            if previous.queue.is_some() {
                // Left by the builtin scaler before a switch to KEDA.
                clear_scaler_status(ctx, &p).await?;
            }
            if observed.scaled_object.is_none() {
                observed.scaled_object =
                    Api::<ScaledObject>::namespaced(ctx.client.clone(), &p.namespace)
                        .get_opt(&names::scaled_object(&p))
                        .await
                        .unwrap_or(None);
            }
        }
    }
    let status = ClipProcessorStatus {
        observed_generation: p.generation,
        replicas: Some(status::replicas(&observed)),
        conditions: status::conditions(&p, &observed, &previous.conditions, &now),
        query: status::query(&p, &observed),
        ..Default::default()
    };
    record_conditions(ctx, &p, &status.conditions);
    publish_transitions(ctx, &cp, &previous.conditions, &status.conditions).await;
    if let Err(e) = patch_status(ctx, &cp, &previous, status).await {
        count_refused(ctx, Child::Status);
        return Err(e.into());
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// The processor under its class (if it has one): the class's nodes, cache and policy, and its
/// share of the class budget. Classes and peers come from the watch caches, else from the API.
async fn governed(
    ctx: &Context,
    cp: &ClipProcessor,
    p: ValidatedProcessor,
) -> Result<Result<ValidatedProcessor, class::Refusal>, Error> {
    let cached = ctx
        .api_stores
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let classes: Vec<ClipProcessorClass> = match &cached {
        Some((_, classes)) => classes.state().iter().map(|c| (**c).clone()).collect(),
        None => match Api::<ClipProcessorClass>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            // The class CRD is not installed (an older chart): no classes.
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => return Err(e.into()),
        },
    };
    let class = match class::select(cp, &classes, ctx.settings.require_class) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Ok(p)),
        Err(refusal) => return Ok(Err(refusal)),
    };
    let peers: Vec<ClipProcessor> = match &cached {
        Some((processors, _)) => processors.state().iter().map(|c| (**c).clone()).collect(),
        None => {
            Api::<ClipProcessor>::all(ctx.client.clone())
                .list(&ListParams::default())
                .await?
                .items
        }
    };
    let name = class.name_any();
    let asks: Vec<class::Ask> = peers
        .iter()
        .filter(|peer| class::class_of(peer, &classes).as_deref() == Some(name.as_str()))
        .map(|peer| class::Ask::of(peer, class))
        .collect();
    let grant = class::grant(class, &asks, &class::Ask::of(cp, class));
    Ok(class::govern(p, class, grant))
}

/// The other processors of `cp`'s class, when the class has a budget.
fn budget_peers(
    cp: &ClipProcessor,
    processors: &Store<ClipProcessor>,
    classes: &Store<ClipProcessorClass>,
) -> Vec<(String, String)> {
    let classes: Vec<ClipProcessorClass> = classes.state().iter().map(|c| (**c).clone()).collect();
    let Some(mine) = class::class_of(cp, &classes) else {
        return Vec::new();
    };
    let budgeted = classes
        .iter()
        .find(|c| c.name_any() == mine)
        .is_some_and(|c| c.spec.budget != class::Budget::default());
    if !budgeted {
        return Vec::new();
    }
    processors
        .state()
        .iter()
        .filter(|peer| peer.uid() != cp.uid())
        .filter(|peer| class::class_of(peer, &classes).as_deref() == Some(mine.as_str()))
        .map(|peer| (ns_of(peer), peer.name_any()))
        .collect()
}

/// Suspended with the builtin engine: the workers go to zero (the scaler's loop is stopped).
async fn suspend_workers(ctx: &Context, p: &ValidatedProcessor, o: &mut Observed) {
    let Some(d) = o.deployment.as_mut() else {
        return;
    };
    let current = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if current == 0 {
        return;
    }
    match apply::scale(&ctx.client, &p.namespace, &names::worker(p), 0).await {
        Ok(()) => {
            if let Some(spec) = d.spec.as_mut() {
                spec.replicas = Some(0);
            }
            tracing::info!(processor = %format!("{}/{}", p.namespace, p.name), "suspended: workers {current} -> 0");
        }
        Err(e) => {
            count_refused(ctx, Child::Scale);
            o.scale_error = Some(runner::ScalerError::Scale(status::describe_kube(&e)));
        }
    }
}

fn ns_of(cp: &ClipProcessor) -> String {
    cp.namespace().unwrap_or_default()
}

/// Removes the builtin scaler's status fields (an apply of none under its field manager).
async fn clear_scaler_status(ctx: &Context, p: &ValidatedProcessor) -> Result<(), kube::Error> {
    crate::scaler::target::apply_status(&ctx.client, &p.namespace, &p.name, json!({})).await
}

/// Applies every child, recording what came back (their status) and what failed. The children
/// are destructured once, without `..`: a new kind of child does not compile until it is
/// applied here (and swept in `delete_orphans`, listed in `wanted`). With the watch caches, a
/// child whose wanted object and live version are those of the last apply is not applied
/// again; its cached copy is what came back.
async fn apply_children(
    ctx: &Context,
    s: Option<&observe::Stores>,
    p: &ValidatedProcessor,
    c: &Children,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    o: &mut Observed,
) {
    let Children {
        service_account,
        deployment,
        persistent_volume,
        persistent_volume_claim,
        cache_warm_job,
        node_pool,
        trigger_authentication,
        scaled_object,
        query,
    } = c.clone();
    let client = &ctx.client;
    let ns = p.namespace.as_str();
    let mut w = Writer {
        ctx,
        processor: format!("{ns}/{}", p.name),
        owner,
        errors: Vec::new(),
    };
    if let Some(sa) = service_account {
        w.apply(
            Child::ServiceAccount,
            sa,
            s.map(|s| &s.service_accounts),
            |sa| apply::apply_owned::<ServiceAccount>(client, ns, sa, owner),
        )
        .await;
    }
    if let Some(pv) = persistent_volume {
        w.apply(
            Child::PersistentVolume,
            pv,
            s.map(|s| &s.persistent_volumes),
            |pv| apply::apply_cluster::<PersistentVolume>(client, pv),
        )
        .await;
    }
    if let Some(pvc) = persistent_volume_claim {
        w.apply(
            Child::PersistentVolumeClaim,
            pvc,
            s.map(|s| &s.persistent_volume_claims),
            |pvc| apply::apply_owned::<PersistentVolumeClaim>(client, ns, pvc, owner),
        )
        .await;
    }
    let job = match cache_warm_job {
        Some(job) => {
            w.apply(Child::CacheWarmJob, job, s.map(|s| &s.jobs), |job| {
                apply::apply_job::<Job>(client, ns, job, owner)
            })
            .await
        }
        None => None,
    };
    let deployment = match deployment {
        Some(d) => {
            // Known to exist: no GET before the apply.
            let exists = s
                .and_then(|s| observe::cached(&s.deployments, Some(ns), &d.name_any()))
                .is_some();
            w.apply(Child::Deployment, d, s.map(|s| &s.deployments), |d| {
                apply::apply_deployment(client, ns, d, owner, exists)
            })
            .await
        }
        None => None,
    };
    let node_pool = match node_pool {
        Some(np) => {
            w.apply(Child::NodePool, np, s.map(|s| &s.node_pools), |np| {
                apply::apply_cluster::<NodePool>(client, np)
            })
            .await
        }
        None => None,
    };
    if let Some(ta) = trigger_authentication {
        w.apply(
            Child::TriggerAuthentication,
            ta,
            s.map(|s| &s.trigger_authentications),
            |ta| apply::apply_owned::<TriggerAuthentication>(client, ns, ta, owner),
        )
        .await;
    }
    let scaled_object = match scaled_object {
        Some(mut so) => {
            // KEDA holds the workers at zero until the Job just applied reports the cache
            // full. Suspended: held at zero the same way.
            let warmed = !p.cache.shared() || job.as_ref().is_some_and(status::job_complete);
            build::keda::hold_until_warm(&mut so, warmed && !p.held());
            w.apply(
                Child::ScaledObject,
                so,
                s.map(|s| &s.scaled_objects),
                |so| apply::apply_owned::<ScaledObject>(client, ns, so, owner),
            )
            .await
        }
        None => None,
    };
    let QueryChildren {
        deployment: query_deployment,
        service: query_service,
        pod_disruption_budget: query_pdb,
        horizontal_pod_autoscaler: query_hpa,
    } = query;
    if let Some(svc) = query_service {
        w.apply(Child::QueryService, svc, s.map(|s| &s.services), |svc| {
            apply::apply_owned::<Service>(client, ns, svc, owner)
        })
        .await;
    }
    if let Some(hpa) = query_hpa {
        w.apply(
            Child::QueryHorizontalPodAutoscaler,
            hpa,
            s.map(|s| &s.horizontal_pod_autoscalers),
            |hpa| apply::apply_owned::<HorizontalPodAutoscaler>(client, ns, hpa, owner),
        )
        .await;
    }
    o.query_deployment = match query_deployment {
        Some(d) => {
            w.apply(Child::QueryDeployment, d, s.map(|s| &s.deployments), |d| {
                apply::apply_owned::<Deployment>(client, ns, d, owner)
            })
            .await
        }
        None => None,
    };
    if let Some(pdb) = query_pdb {
        w.apply(
            Child::QueryPodDisruptionBudget,
            pdb,
            s.map(|s| &s.pod_disruption_budgets),
            |pdb| apply::apply_owned::<PodDisruptionBudget>(client, ns, pdb, owner),
        )
        .await;
    }
    for e in &w.errors {
        count_refused(ctx, e.child);
    }
    o.apply_errors.extend(w.errors);
    o.cache_job = job;
    o.deployment = deployment;
    o.node_pool = node_pool;
    o.scaled_object = scaled_object;
}

/// Applies children one at a time, skipping those an apply would not change.
struct Writer<'a> {
    ctx: &'a Context,
    processor: String,
    owner: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    errors: Vec<ApplyError>,
}

impl Writer<'_> {
    async fn apply<K, F, Fut>(
        &mut self,
        child: Child,
        obj: K,
        store: Option<&reflector::Store<K>>,
        apply: F,
    ) -> Option<K>
    where
        K: Resource<DynamicType = ()> + Clone + serde::Serialize,
        F: FnOnce(K) -> Fut,
        Fut: std::future::Future<Output = Result<K, kube::Error>>,
    {
        let key = observe::Applied::key(&obj);
        let print = observe::fingerprint(&(&obj, self.owner));
        let applied = &self.ctx.applied;
        if let Some(store) = store {
            let ns = obj.meta().namespace.clone();
            if let Some(live) = observe::cached(store, ns.as_deref(), &obj.name_any())
                && applied.unchanged(&self.processor, &key, print, &live)
            {
                return Some(live);
            }
        }
        match apply(obj).await {
            Ok(v) => {
                if store.is_some() {
                    applied.record(&self.processor, key, print, &v);
                }
                Some(v)
            }
            Err(e) => {
                applied.forget(&self.processor, &key);
                self.errors.push(ApplyError::new(child, e));
                None
            }
        }
    }
}

/// One refused write of this kind of child, in `clip_operator_apply_failures_total`.
fn count_refused(ctx: &Context, child: Child) {
    ctx.metrics.count_refused(child.label());
}

/// Deletes children the current spec does not want (after a model change, an engine switch, a
/// cache or provisioner change). They are found in the watch caches, or listed by label.
async fn delete_orphans(
    ctx: &Context,
    stores: Option<&observe::Stores>,
    p: &ValidatedProcessor,
    c: &Children,
) -> Result<(), kube::Error> {
    let Children {
        // Owned by the processor for its whole life: never an orphan.
        service_account: _,
        deployment,
        persistent_volume,
        persistent_volume_claim,
        cache_warm_job,
        node_pool,
        trigger_authentication,
        scaled_object,
        query,
    } = c;
    let sel = selector(&p.name, &p.namespace);
    let client = ctx.client.clone();
    let ns = p.namespace.as_str();
    let mut deleted = Vec::new();
    async fn sweep<K>(
        api: Api<K>,
        cache: Option<&reflector::Store<K>>,
        p: &ValidatedProcessor,
        sel: &str,
        keep: Vec<String>,
        only: Option<&str>,
        deleted: &mut Vec<String>,
    ) -> Result<(), kube::Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut found = match cache {
            Some(store) => observe::labelled(store, &p.namespace, &p.name),
            None => apply::list_labelled(&api, sel).await?,
        };
        // Kinds others make for the processor too (KEDA's HPA carries the ScaledObject's
        // labels): only the one name this operator gives them is ever swept.
        if let Some(name) = only {
            found.retain(|f| f == name);
        }
        deleted.extend(apply::delete_orphans(&api, found, &keep).await?);
        Ok(())
    }
    let s = stores;
    sweep(
        Api::<Job>::namespaced(client.clone(), ns),
        s.map(|s| &s.jobs),
        p,
        &sel,
        keep(cache_warm_job),
        None,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        s.map(|s| &s.persistent_volume_claims),
        p,
        &sel,
        keep(persistent_volume_claim),
        None,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<PersistentVolume>::all(client.clone()),
        s.map(|s| &s.persistent_volumes),
        p,
        &sel,
        keep(persistent_volume),
        None,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<NodePool>::all(client.clone()),
        s.map(|s| &s.node_pools),
        p,
        &sel,
        keep(node_pool),
        None,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<ScaledObject>::namespaced(client.clone(), ns),
        s.map(|s| &s.scaled_objects),
        p,
        &sel,
        keep(scaled_object),
        None,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<TriggerAuthentication>::namespaced(client.clone(), ns),
        s.map(|s| &s.trigger_authentications),
        p,
        &sel,
        keep(trigger_authentication),
        None,
        &mut deleted,
    )
    .await?;
    // The workers' Deployment lives as long as the processor; the query endpoint's only while
    // spec.query asks for it.
    let query_name = names::query(p);
    let only = Some(query_name.as_str());
    let mut deployments = keep(deployment);
    deployments.extend(keep(&query.deployment));
    sweep(
        Api::<Deployment>::namespaced(client.clone(), ns),
        s.map(|s| &s.deployments),
        p,
        &sel,
        deployments,
        only,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<Service>::namespaced(client.clone(), ns),
        s.map(|s| &s.services),
        p,
        &sel,
        keep(&query.service),
        only,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        s.map(|s| &s.pod_disruption_budgets),
        p,
        &sel,
        keep(&query.pod_disruption_budget),
        only,
        &mut deleted,
    )
    .await?;
    sweep(
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns),
        s.map(|s| &s.horizontal_pod_autoscalers),
        p,
        &sel,
        keep(&query.horizontal_pod_autoscaler),
        only,
        &mut deleted,
    )
    .await?;
    if !deleted.is_empty() {
        tracing::info!(processor = %format!("{ns}/{}", p.name), deleted = ?deleted, "removed children the spec no longer wants");
    }
    Ok(())
}

/// Every wanted child as `Kind/name`, in a fixed order.
fn wanted(c: &Children) -> Vec<String> {
    fn one<K: Resource<DynamicType = ()>>(out: &mut Vec<String>, child: &Option<K>) {
        if let Some(k) = child {
            out.push(format!("{}/{}", K::kind(&()), k.name_any()));
        }
    }
    let Children {
        service_account,
        deployment,
        persistent_volume,
        persistent_volume_claim,
        cache_warm_job,
        node_pool,
        trigger_authentication,
        scaled_object,
        query:
            QueryChildren {
                deployment: query_deployment,
                service,
                pod_disruption_budget,
                horizontal_pod_autoscaler,
            },
    } = c;
    let mut out = Vec::new();
    one(&mut out, service_account);
    one(&mut out, deployment);
    one(&mut out, persistent_volume);
    one(&mut out, persistent_volume_claim);
    one(&mut out, cache_warm_job);
    one(&mut out, node_pool);
    one(&mut out, trigger_authentication);
    one(&mut out, scaled_object);
    one(&mut out, query_deployment);
    one(&mut out, service);
    one(&mut out, pod_disruption_budget);
    one(&mut out, horizontal_pod_autoscaler);
    out
}

/// The name of a wanted child, as the list of names `apply::delete_orphans` keeps.
fn keep<K: Resource>(child: &Option<K>) -> Vec<String> {
    child.iter().map(|c| c.name_any()).collect()
}

fn record_conditions(ctx: &Context, p: &ValidatedProcessor, conditions: &[Condition]) {
    for c in conditions {
        let l = ConditionLabels {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            condition: c.type_.clone(),
        };
        ctx.metrics
            .condition
            .get_or_create(&l)
            .set(i64::from(c.status == "True"));
    }
}

/// An Event for each summary condition that changed, so `kubectl describe` tells the story.
async fn publish_transitions(
    ctx: &Context,
    cp: &ClipProcessor,
    before: &[Condition],
    after: &[Condition],
) {
    for c in after
        .iter()
        .filter(|c| matches!(c.type_.as_str(), "Ready" | "Degraded"))
    {
        let old = before.iter().find(|o| o.type_ == c.type_);
        if old.is_some_and(|o| o.status == c.status && o.reason == c.reason) {
            continue;
        }
        let warning = (c.type_ == "Degraded" && c.status == "True")
            || (c.type_ == "Ready" && c.status == "False" && c.reason != "Pending");
        let reason = if c.type_ == "Ready" && c.status == "True" {
            "Ready".to_string()
        } else {
            c.reason.clone()
        };
        let ty = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        event(
            ctx,
            cp,
            ty,
            &reason,
            "Reconcile",
            format!("{}={}: {}", c.type_, c.status, c.message),
        )
        .await;
    }
}

async fn event(
    ctx: &Context,
    cp: &ClipProcessor,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cp.object_ref(&())).await {
        tracing::debug!("cannot publish an event: {e}");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Writes reconcile's part of status (server-side apply on the status subresource) when it
/// changed; `queue`, `lastActiveTime` and `lastScaleTime` belong to the scaler's field manager.
async fn patch_status(
    ctx: &Context,
    cp: &ClipProcessor,
    previous: &ClipProcessorStatus,
    status: ClipProcessorStatus,
) -> Result<(), kube::Error> {
    if own(&status) == own(previous) {
        return Ok(());
    }
    let api: Api<ClipProcessor> =
        Api::namespaced(ctx.client.clone(), &cp.namespace().unwrap_or_default());
    let body = json!({"apiVersion": ClipProcessor::api_version(&()), "kind": ClipProcessor::kind(&()), "status": status});
    api.patch_status(
        &cp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.written().insert(uid(cp), own(&status));
    Ok(())
}

/// Deletion: the cluster-scoped children (NodePool, PersistentVolume) cannot be owned by a
/// namespaced object, so they are deleted here; namespaced children go by owner reference.
async fn cleanup(cp: Arc<ClipProcessor>, ctx: &Context) -> Result<Action, Error> {
    let ns = cp.namespace().unwrap_or_default();
    let name = cp.name_any();
    let sel = selector(&name, &ns);
    let lp = ListParams::default().labels(&sel);
    let np: Api<NodePool> = Api::all(ctx.client.clone());
    match np.delete_collection(&DeleteParams::background(), &lp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {} // Karpenter not installed: nothing to delete
        Err(e) => return Err(e.into()),
    }
    let pv: Api<PersistentVolume> = Api::all(ctx.client.clone());
    pv.delete_collection(&DeleteParams::background(), &lp)
        .await?;
    ctx.scalers.stop(&ns, &name);
    ctx.swept
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key(&cp));
    ctx.applied.forget_processor(&key(&cp));
    ctx.written().remove(&uid(&cp));
    ctx.metrics.forget(&ns, &name);
    event(
        ctx,
        &cp,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        "deleted the NodePool and PersistentVolume".into(),
    )
    .await;
    tracing::info!(processor = %key(&cp), "cleaned up cluster-scoped children");
    Ok(Action::await_change())
}
