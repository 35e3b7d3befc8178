//! Watch caches of every kind of child, each fed by its own task, and the record of what was last
//! applied, so a reconcile that has nothing to change makes no request.
//!
//! - Each cache is a label-selected watch (`lakechain.dev/processor`) whose objects are stored
//!   without `managedFields` (most of an object's size, and never read here). A change to a
//!   child (or its deletion) asks for a reconcile of its processor, found by its labels.
//! - The caches are fed by their own tasks, not by the controller: kube-runtime's controller
//!   polls its watches only as fast as it schedules reconciles, and a cache it fed lagged by tens
//!   of seconds under load.
//! - [`Applied`] remembers, per child, a hash of the object last applied and the version the API
//!   server gave back (its `generation` where the kind has one, else its `resourceVersion`).
//!   A child whose wanted object hashes the same and whose cached copy still has that version is
//!   not applied again: nothing can have changed it. A spec edit by someone else moves the
//!   generation and is reverted at the next reconcile (the edit itself starts one); an edit of
//!   labels or annotations alone is reverted when the wanted object next changes.
//! - The orphan sweep reads the caches, not six label-selected lists per processor.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use super::build::{LABEL_NAMESPACE, LABEL_PROCESSOR};
use crate::external::karpenter::NodePool;
use crate::external::keda_scaled_object::ScaledObject;
use crate::external::keda_trigger_authentication::TriggerAuthentication;

/// The annotation `kubectl apply` (client-side) leaves on an object: a second copy of the spec.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the operator never reads from a cached object.
pub fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// One watch cache per kind of child.
#[derive(Clone)]
pub struct Stores {
    pub service_accounts: Store<ServiceAccount>,
    pub deployments: Store<Deployment>,
    pub persistent_volumes: Store<PersistentVolume>,
    pub persistent_volume_claims: Store<PersistentVolumeClaim>,
    pub jobs: Store<Job>,
    pub node_pools: Store<NodePool>,
    pub trigger_authentications: Store<TriggerAuthentication>,
    pub scaled_objects: Store<ScaledObject>,
    pub services: Store<Service>,
    pub pod_disruption_budgets: Store<PodDisruptionBudget>,
    pub horizontal_pod_autoscalers: Store<HorizontalPodAutoscaler>,
}

impl Stores {
    /// Starts the watches. Each change of a child sends its processor (namespace, name) to
    /// `triggers`. Where a kind's CRD is not installed (Karpenter, KEDA) its watch fails and
    /// retries with backoff, and its cache stays empty.
    pub fn start(
        client: &Client,
        scope: &super::scope::Namespaces,
        triggers: UnboundedSender<(String, String)>,
    ) -> (Stores, Vec<JoinHandle<()>>) {
        use super::scope::{watch, watch_all};
        let mut tasks = Vec::new();
        let mut one = |task| tasks.push(task);
        let config = || watcher::Config::default().labels(LABEL_PROCESSOR);
        let stores = Stores {
            service_accounts: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            deployments: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            persistent_volumes: feed(
                |w| watch_all(client, config(), w, slim),
                &triggers,
                &mut one,
            ),
            persistent_volume_claims: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            jobs: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            node_pools: feed(
                |w| watch_all(client, config(), w, slim),
                &triggers,
                &mut one,
            ),
            trigger_authentications: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            scaled_objects: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            services: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            pod_disruption_budgets: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
            horizontal_pod_autoscalers: feed(
                |w| watch(client, scope, config(), w, slim),
                &triggers,
                &mut one,
            ),
        };
        (stores, tasks)
    }
}

/// The processor a child belongs to, from its labels (cluster-scoped children have no owner
/// reference).
fn processor_of<K: Resource>(obj: &K) -> Option<(String, String)> {
    let labels = obj.labels();
    Some((
        labels.get(LABEL_NAMESPACE)?.clone(),
        labels.get(LABEL_PROCESSOR)?.clone(),
    ))
}

/// A kind's cache, fed by the watch `watch` makes from its writer; each change of a child asks
/// for a reconcile of its processor.
fn feed<K>(
    watch: impl FnOnce(
        reflector::store::Writer<K>,
    )
        -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    triggers: &UnboundedSender<(String, String)>,
    spawn: &mut impl FnMut(JoinHandle<()>),
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let triggers = triggers.clone();
    feed_with(
        watch,
        move |obj: &K| {
            if let Some(p) = processor_of(obj) {
                let _ = triggers.send(p);
            }
        },
        spawn,
    )
}

/// A kind's cache, fed by the watch `watch` makes from its writer, calling `changed` with each
/// object that changes (also those listed at a (re)start).
pub(crate) fn feed_with<K>(
    watch: impl FnOnce(
        reflector::store::Writer<K>,
    )
        -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    changed: impl Fn(&K) + Send + 'static,
    spawn: &mut impl FnMut(JoinHandle<()>),
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    // No `default_backoff()`: kube's watcher yields `Event::Init` (an `Ok`) before every list,
    // which resets that backoff, so a watch of a kind whose CRD is not installed listed about
    // once a second. Here only an event that follows a successful list or watch resets it.
    let stream = watch(writer);
    spawn(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut retry = Retry::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitDone) => retry.reset(),
                Ok(
                    watcher::Event::Apply(obj)
                    | watcher::Event::InitApply(obj)
                    | watcher::Event::Delete(obj),
                ) => {
                    retry.reset();
                    changed(&obj);
                }
                Err(e) => {
                    let delay = retry.next();
                    // A kind whose CRD is not installed fails here until it is; said once.
                    if delay == Retry::FIRST {
                        tracing::debug!("watch of {kind}: {e} (retrying with backoff)");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }));
    reader
}

/// The pause after a failed list or watch: doubling from 0.8 s to 30 s, back to the start after
/// a success.
#[derive(Default)]
struct Retry(Option<Duration>);

impl Retry {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);

    fn next(&mut self) -> Duration {
        let d = self.0.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.0 = Some(d);
        d
    }

    fn reset(&mut self) {
        self.0 = None;
    }
}

/// The cached copy of a child, by kind and name (`None`: not in the cache, or being deleted).
pub fn cached<K>(store: &Store<K>, namespace: Option<&str>, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let mut r = ObjectRef::<K>::new(name);
    if let Some(ns) = namespace {
        r = r.within(ns);
    }
    let obj = store.get(&r)?;
    obj.meta()
        .deletion_timestamp
        .is_none()
        .then(|| (*obj).clone())
}

/// The cached children of one processor (by its labels), for the orphan sweep.
pub fn labelled<K>(store: &Store<K>, namespace: &str, name: &str) -> Vec<String>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .iter()
        .filter(|o| {
            o.meta().deletion_timestamp.is_none()
                && processor_of(o.as_ref()).is_some_and(|(ns, n)| ns == namespace && n == name)
        })
        .map(|o| o.name_any())
        .collect()
}

/// The version that moves when a child changes in a way an apply would undo: the generation
/// (spec changes) where the kind has one, else the resourceVersion (any change).
pub fn version<K: Resource>(obj: &K) -> Option<String> {
    let m = obj.meta();
    match m.generation {
        Some(g) => Some(format!("g{g}")),
        None => m.resource_version.as_ref().map(|rv| format!("r{rv}")),
    }
}

/// A hash of the object as it is applied.
pub fn fingerprint<K: Serialize>(obj: &K) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match serde_json::to_vec(obj) {
        Ok(bytes) => bytes.hash(&mut h),
        // Not encodable: never equal to an earlier apply (it fails to apply anyway).
        Err(e) => e.to_string().hash(&mut h),
    }
    h.finish()
}

/// What was last applied, per processor and child (`Kind/namespace/name`): its fingerprint and
/// the version the API server returned.
#[derive(Default)]
pub struct Applied(Mutex<Records>);

/// Processor -> child -> (fingerprint, version).
type Records = HashMap<String, HashMap<String, (u64, String)>>;

impl Applied {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!(
            "{}/{}/{}",
            K::kind(&()),
            obj.meta().namespace.as_deref().unwrap_or(""),
            obj.name_any()
        )
    }

    /// Whether `live` is what the last apply of an object with this fingerprint left.
    pub fn unchanged<K: Resource>(
        &self,
        processor: &str,
        child: &str,
        print: u64,
        live: &K,
    ) -> bool {
        let Some(v) = version(live) else {
            return false;
        };
        self.lock()
            .get(processor)
            .and_then(|c| c.get(child))
            .is_some_and(|(p, seen)| *p == print && *seen == v)
    }

    pub fn record<K: Resource>(&self, processor: &str, child: String, print: u64, applied: &K) {
        match version(applied) {
            Some(v) => {
                self.lock()
                    .entry(processor.to_string())
                    .or_default()
                    .insert(child, (print, v));
            }
            None => self.forget(processor, &child),
        }
    }

    pub fn forget(&self, processor: &str, child: &str) {
        if let Some(c) = self.lock().get_mut(processor) {
            c.remove(child);
        }
    }

    /// Forgets every child of a processor (deleted).
    pub fn forget_processor(&self, processor: &str) {
        self.lock().remove(processor);
    }

    /// Forgets everything (the controller stopped: another replica may write meanwhile).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn sa(generation: Option<i64>, rv: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("w".into()),
                namespace: Some("ns".into()),
                generation,
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_child_is_unchanged_only_with_the_same_object_and_the_same_version() {
        let a = Applied::default();
        let obj = sa(None, "10");
        let key = Applied::key(&obj);
        assert_eq!(key, "ServiceAccount/ns/w");
        let print = fingerprint(&obj);
        let p = "ns/p";
        assert!(!a.unchanged(p, &key, print, &obj), "nothing applied yet");
        a.record(p, key.clone(), print, &obj);
        assert!(a.unchanged(p, &key, print, &obj));
        assert!(!a.unchanged("ns/q", &key, print, &obj), "another processor");
        assert!(
            !a.unchanged(p, &key, print + 1, &obj),
            "the wanted object changed"
        );
        assert!(
            !a.unchanged(p, &key, print, &sa(None, "11")),
            "changed by someone else (no generation: any change)"
        );
        let d = sa(Some(3), "20");
        a.record(p, key.clone(), print, &d);
        assert!(
            a.unchanged(p, &key, print, &sa(Some(3), "25")),
            "a status change leaves the generation"
        );
        assert!(
            !a.unchanged(p, &key, print, &sa(Some(4), "26")),
            "a spec edit"
        );
        a.forget(p, &key);
        assert!(!a.unchanged(p, &key, print, &d));
        a.record(p, key.clone(), print, &d);
        a.forget_processor(p);
        assert!(!a.unchanged(p, &key, print, &d));
    }

    #[test]
    fn a_failing_watch_backs_off_to_thirty_seconds_and_starts_over_after_a_success() {
        let mut r = Retry::default();
        let delays: Vec<u64> = (0..8).map(|_| r.next().as_millis() as u64).collect();
        assert_eq!(delays, [800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        r.reset();
        assert_eq!(r.next(), Retry::FIRST);
    }

    #[test]
    fn slim_drops_managed_fields_and_the_last_applied_copy() {
        let mut obj = sa(None, "1");
        obj.metadata.managed_fields = Some(vec![Default::default()]);
        obj.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_string(), "{...}".to_string()),
                ("keep".to_string(), "me".to_string()),
            ]
            .into(),
        );
        slim(&mut obj);
        assert!(obj.metadata.managed_fields.is_none());
        let a = obj.metadata.annotations.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a["keep"], "me");
    }
}
