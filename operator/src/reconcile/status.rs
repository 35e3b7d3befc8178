//! Status (pure): conditions computed from what was observed of the children, so the status says
//! what is true now rather than what the operator last attempted.
//!
//! Sub-conditions: `CacheReady`, `NodePoolReady`, `ScalerReady`, `WorkersAvailable`; summaries:
//! `Ready` (all four hold and nothing is degraded), `Progressing` (rolling out, warming the cache,
//! workers starting), `Degraded` (invalid spec, failed apply, failed cache warm, failing scaler or
//! node pool). Every condition carries `observedGeneration`; `lastTransitionTime` changes only when
//! its status does.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::validate::ValidatedProcessor;
use crate::crd::{ComputeDevice, Provisioner, ReplicaStatus, ScalingEngine};
use crate::external::karpenter::NodePool;
use crate::external::keda_scaled_object::ScaledObject;

pub use crate::scaler::runner::QueueRead;
use crate::scaler::runner::ScalerError;

/// What was observed of the children this reconcile.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub deployment: Option<Deployment>,
    /// The cache-warm Job of the current model.
    pub cache_job: Option<Job>,
    pub node_pool: Option<NodePool>,
    pub scaled_object: Option<ScaledObject>,
    /// The query endpoint's Deployment, as applied.
    pub query_deployment: Option<Deployment>,
    /// The builtin scaler's last queue read (`None` before the first).
    pub scaler: Option<QueueRead>,
    /// The builtin scaler's last write to `deployments/scale` failed.
    pub scale_error: Option<ScalerError>,
    /// Children that could not be applied (or scaled, or swept), with the reason.
    pub apply_errors: Vec<ApplyError>,
}

/// The kinds of child a reconcile writes; the label of `clip_operator_apply_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    ServiceAccount,
    Deployment,
    PersistentVolume,
    PersistentVolumeClaim,
    CacheWarmJob,
    NodePool,
    TriggerAuthentication,
    ScaledObject,
    /// The query endpoint's Deployment, Service, PodDisruptionBudget and HPA.
    QueryDeployment,
    QueryService,
    QueryPodDisruptionBudget,
    QueryHorizontalPodAutoscaler,
    /// The builtin scaler's write to `deployments/scale`.
    Scale,
    /// Deleting children the spec no longer wants.
    OrphanSweep,
    /// The processor's own status subresource.
    Status,
}

impl Child {
    pub fn label(self) -> &'static str {
        match self {
            Child::ServiceAccount => "ServiceAccount",
            Child::Deployment => "Deployment",
            Child::PersistentVolume => "PersistentVolume",
            Child::PersistentVolumeClaim => "PersistentVolumeClaim",
            Child::CacheWarmJob => "Job",
            Child::NodePool => "NodePool",
            Child::TriggerAuthentication => "TriggerAuthentication",
            Child::ScaledObject => "ScaledObject",
            Child::QueryDeployment => "QueryDeployment",
            Child::QueryService => "Service",
            Child::QueryPodDisruptionBudget => "PodDisruptionBudget",
            Child::QueryHorizontalPodAutoscaler => "HorizontalPodAutoscaler",
            Child::Scale => "Scale",
            Child::OrphanSweep => "OrphanSweep",
            Child::Status => "Status",
        }
    }

    /// How the child is named in status messages (with a hint for the optional CRDs).
    fn describe(self) -> &'static str {
        match self {
            Child::CacheWarmJob => "cache-warm Job",
            Child::NodePool => "NodePool (is Karpenter installed?)",
            Child::TriggerAuthentication => "TriggerAuthentication (is KEDA installed?)",
            Child::ScaledObject => "ScaledObject (is KEDA installed?)",
            Child::QueryDeployment => "query Deployment",
            Child::QueryService => "query Service",
            Child::QueryPodDisruptionBudget => "query PodDisruptionBudget",
            Child::QueryHorizontalPodAutoscaler => "query HorizontalPodAutoscaler",
            Child::Scale => "scaling the workers",
            Child::OrphanSweep => "removing children the spec no longer wants",
            Child::Status => "writing status",
            other => other.label(),
        }
    }
}

/// The query endpoint's address and ready replicas, with spec.query.
pub fn query(p: &ValidatedProcessor, o: &Observed) -> Option<crate::crd::QueryStatus> {
    p.spec.query.as_ref().filter(|q| q.enabled)?;
    Some(crate::crd::QueryStatus {
        url: super::build::query_url(p),
        ready_replicas: o
            .query_deployment
            .as_ref()
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0),
    })
}

/// A child the API server refused: which, and its error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {}", .child.describe(), describe_kube(.source))]
pub struct ApplyError {
    pub child: Child,
    pub source: std::sync::Arc<kube::Error>,
}

impl ApplyError {
    pub fn new(child: Child, source: kube::Error) -> Self {
        ApplyError {
            child,
            source: std::sync::Arc::new(source),
        }
    }
}

/// A kube error as one sentence.
pub fn describe_kube(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

const SUSPENDED: &str =
    "spec.suspend is true: no workers, the queue is not read, the NodePool allows no nodes";
const SUSPENDED_IN_CLASS: &str = "spec.suspend is true: no workers, the queue is not read";

fn suspended_message(p: &ValidatedProcessor) -> &'static str {
    if p.class.is_some() {
        SUSPENDED_IN_CLASS
    } else {
        SUSPENDED
    }
}

/// Held at zero by the class budget: why.
fn no_budget(p: &ValidatedProcessor) -> Option<String> {
    p.class
        .as_ref()
        .filter(|c| c.max_workers == 0)
        .map(|c| c.shortfall.clone().unwrap_or_default())
}

/// One condition before bookkeeping.
#[derive(Debug, Clone, PartialEq)]
struct Cond {
    type_: &'static str,
    status: bool,
    unknown: bool,
    reason: String,
    message: String,
}

fn yes(type_: &'static str, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status: true,
        unknown: false,
        reason: reason.into(),
        message: message.into(),
    }
}
fn no(type_: &'static str, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status: false,
        unknown: false,
        reason: reason.into(),
        message: message.into(),
    }
}
fn unknown(type_: &'static str, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status: false,
        unknown: true,
        reason: reason.into(),
        message: message.into(),
    }
}

fn condition_status(
    conds: Option<&Vec<Condition>>,
    type_: &str,
) -> Option<(String, String, String)> {
    conds?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Whether the weights are where the workers look for them: always with a per-pod cache; with
/// a shared one, once the cache-warm Job has succeeded.
pub fn cache_warmed(p: &ValidatedProcessor, o: &Observed) -> bool {
    if !p.cache.shared() {
        return true;
    }
    o.cache_job.as_ref().is_some_and(job_complete)
}

/// The Job succeeded (a pod completed, or the job controller marked it Complete).
pub fn job_complete(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.succeeded.unwrap_or(0) > 0
            || s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Complete" && c.status == "True")
    })
}

fn cache_ready(p: &ValidatedProcessor, o: &Observed) -> Cond {
    const T: &str = "CacheReady";
    if !p.cache.shared() {
        return yes(
            T,
            "PerPodCache",
            "no shared cache: each worker downloads the weights into its own emptyDir",
        );
    }
    let Some(job) = &o.cache_job else {
        return unknown(T, "Warming", "the cache-warm Job is being created");
    };
    let status = job.status.clone().unwrap_or_default();
    let conds = status.conditions.unwrap_or_default();
    let has = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
    if cache_warmed(p, o) {
        yes(
            T,
            "Warmed",
            format!("{} weights are in the shared cache", p.model.name),
        )
    } else if has("Failed") {
        let why = conds
            .iter()
            .find(|c| c.type_ == "Failed")
            .and_then(|c| c.message.clone())
            .unwrap_or_default();
        no(T, "WarmFailed", format!("the cache-warm Job failed: {why}"))
    } else {
        no(
            T,
            "Warming",
            format!("downloading {} weights into the shared cache", p.model.name),
        )
    }
}

fn node_pool_ready(p: &ValidatedProcessor, o: &Observed) -> Cond {
    const T: &str = "NodePoolReady";
    if p.device == ComputeDevice::Cpu {
        return yes(
            T,
            "ExistingNodes",
            "CPU workers run on existing nodes (compute.device: cpu)",
        );
    }
    if p.provisioner == Provisioner::None {
        return yes(
            T,
            "ExistingNodes",
            "workers run on existing GPU nodes (nodePool.provisioner: none)",
        );
    }
    let Some(np) = &o.node_pool else {
        return unknown(T, "Pending", "the NodePool is being created");
    };
    match condition_status(
        np.status.as_ref().and_then(|s| s.conditions.as_ref()),
        "Ready",
    ) {
        Some((s, _, _)) if s == "True" => yes(T, "Ready", "Karpenter reports the NodePool ready"),
        Some((s, reason, message)) if s == "False" => no(
            T,
            &reason_or(&reason, "NotReady"),
            format!("Karpenter: {message}"),
        ),
        _ => unknown(
            T,
            "Pending",
            "waiting for Karpenter to report the NodePool ready",
        ),
    }
}

fn reason_or(reason: &str, default: &str) -> String {
    if reason.is_empty() {
        default.into()
    } else {
        reason.into()
    }
}

fn scaler_ready(p: &ValidatedProcessor, o: &Observed) -> Cond {
    const T: &str = "ScalerReady";
    match p.engine {
        ScalingEngine::Builtin => match &o.scaler {
            _ if p.spec.suspend => yes(T, "Suspended", suspended_message(p)),
            _ if no_budget(p).is_some() => yes(T, "NoBudget", no_budget(p).unwrap_or_default()),
            Some(QueueRead::Readable) => yes(
                T,
                "QueueReadable",
                format!(
                    "the queue is read every {} s (its depth is in status.queue)",
                    p.spec.scaling.polling_interval_seconds.max(1)
                ),
            ),
            Some(QueueRead::Unreadable(e)) => no(T, "QueueUnreadable", e.clone()),
            None => unknown(T, "Pending", "the queue has not been read yet"),
        },
        ScalingEngine::Keda if p.spec.suspend => yes(T, "Suspended", suspended_message(p)),
        ScalingEngine::Keda if no_budget(p).is_some() => {
            yes(T, "NoBudget", no_budget(p).unwrap_or_default())
        }
        ScalingEngine::Keda => {
            let Some(so) = &o.scaled_object else {
                return unknown(T, "Pending", "the ScaledObject is being created");
            };
            let conds: Option<Vec<Condition>> = so
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .map(|cs| {
                    cs.iter()
                        .map(|c| Condition {
                            type_: c.r#type.clone(),
                            status: c.status.clone(),
                            reason: c.reason.clone().unwrap_or_default(),
                            message: c.message.clone().unwrap_or_default(),
                            last_transition_time: Time(Default::default()),
                            observed_generation: None,
                        })
                        .collect()
                });
            match condition_status(conds.as_ref(), "Ready") {
                Some((s, _, m)) if s == "True" => yes(T, "KedaReady", format!("KEDA: {m}")),
                Some((s, r, m)) if s == "False" => {
                    no(T, &reason_or(&r, "KedaNotReady"), format!("KEDA: {m}"))
                }
                _ => unknown(
                    T,
                    "Pending",
                    "waiting for KEDA to report the ScaledObject ready",
                ),
            }
        }
    }
}

/// Replicas the scaler asked for and replicas ready.
pub fn replicas(o: &Observed) -> ReplicaStatus {
    let d = o.deployment.as_ref();
    let desired = d.and_then(|d| d.spec.as_ref()?.replicas).unwrap_or(0);
    let ready = d
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0);
    ReplicaStatus {
        desired,
        ready,
        summary: format!("{ready}/{desired}"),
    }
}

fn workers_available(o: &Observed) -> Cond {
    const T: &str = "WorkersAvailable";
    let Some(_) = &o.deployment else {
        return unknown(T, "Pending", "the worker Deployment is being created");
    };
    let r = replicas(o);
    if r.desired == 0 {
        yes(
            T,
            "ScaledToZero",
            "no messages to process: no workers and no GPU nodes",
        )
    } else if r.ready >= r.desired {
        yes(
            T,
            "Available",
            format!("{} of {} workers ready", r.ready, r.desired),
        )
    } else {
        no(
            T,
            "Starting",
            format!(
                "{} of {} workers ready (a cold start adds a GPU node, the image and the model)",
                r.ready, r.desired
            ),
        )
    }
}

fn rolling_out(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return true;
    };
    let generation = d.metadata.generation.unwrap_or(0);
    let want = spec.replicas.unwrap_or(0);
    status.observed_generation.unwrap_or(0) < generation
        || status.updated_replicas.unwrap_or(0) < want
}

fn deployment_failure(d: &Deployment) -> Option<String> {
    let conds = d.status.as_ref()?.conditions.as_ref()?;
    conds
        .iter()
        .find_map(|c| match (c.type_.as_str(), c.status.as_str()) {
            ("ReplicaFailure", "True") => Some(format!(
                "workers cannot be created: {}",
                c.message.clone().unwrap_or_default()
            )),
            ("Progressing", "False") if c.reason.as_deref() == Some("ProgressDeadlineExceeded") => {
                Some(format!(
                    "the worker rollout stalled: {}",
                    c.message.clone().unwrap_or_default()
                ))
            }
            _ => None,
        })
}

/// The conditions of a valid processor.
pub fn conditions(
    p: &ValidatedProcessor,
    o: &Observed,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let subs = [
        cache_ready(p, o),
        node_pool_ready(p, o),
        scaler_ready(p, o),
        workers_available(o),
    ];
    let mut problems: Vec<String> = o.apply_errors.iter().map(|e| e.to_string()).collect();
    if let Some(e) = &o.scale_error {
        problems.push(format!("{}: {e}", Child::Scale.describe()));
    }
    for c in &subs {
        if !c.status && !c.unknown && matches!(c.reason.as_str(), "WarmFailed" | "QueueUnreadable")
        {
            problems.push(c.message.clone());
        }
        if c.type_ == "NodePoolReady" && !c.status && !c.unknown {
            problems.push(c.message.clone());
        }
    }
    if let Some(f) = o.deployment.as_ref().and_then(deployment_failure) {
        problems.push(f);
    }
    let shortfall = p.class.as_ref().and_then(|c| c.shortfall.clone());
    if let Some(s) = &shortfall {
        problems.push(s.clone());
    }
    let degraded = if problems.is_empty() {
        no("Degraded", "AsExpected", "no problems")
    } else {
        let reason = if !o.apply_errors.is_empty() || o.scale_error.is_some() {
            "ApplyFailed"
        } else if shortfall.is_some() && problems.len() == 1 {
            "ClassBudgetExceeded"
        } else {
            "ChildFailed"
        };
        yes("Degraded", reason, problems.join("; "))
    };
    let mut progress = Vec::new();
    if let Some(c) = subs
        .iter()
        .find(|c| c.type_ == "CacheReady" && !c.status && c.reason == "Warming")
    {
        progress.push(c.message.clone());
    }
    if o.deployment.as_ref().is_some_and(rolling_out) {
        progress.push("rolling out the workers".into());
    }
    if let Some(c) = subs
        .iter()
        .find(|c| c.type_ == "WorkersAvailable" && c.reason == "Starting")
    {
        progress.push(c.message.clone());
    }
    let progressing = if progress.is_empty() {
        no("Progressing", "Stable", "nothing in progress")
    } else {
        yes("Progressing", "Reconciling", progress.join("; "))
    };
    let suspended = if p.spec.suspend {
        yes("Suspended", "Suspended", suspended_message(p))
    } else {
        no("Suspended", "Active", "the scaler follows the queue")
    };
    let ready = match subs.iter().find(|c| !c.status) {
        _ if degraded.status => no("Ready", "Degraded", degraded.message.clone()),
        _ if suspended.status => no("Ready", "Suspended", suspended_message(p)),
        Some(c) => Cond {
            type_: "Ready",
            status: false,
            unknown: c.unknown,
            reason: c.reason.clone(),
            message: format!("{}: {}", c.type_, c.message),
        },
        None => yes("Ready", "Ready", "the processor is ready"),
    };
    let all: Vec<Cond> = [ready, progressing, degraded]
        .into_iter()
        .chain(subs)
        .chain([suspended])
        .collect();
    finish(all, p.generation, previous, now)
}

/// The conditions of a processor whose spec is invalid: Degraded with the reason, nothing else
/// claimed.
pub fn invalid_conditions(
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let all = vec![
        no("Ready", reason, message.to_string()),
        no("Progressing", reason, "waiting for a valid spec"),
        yes("Degraded", reason, message.to_string()),
    ];
    finish(all, generation, previous, now)
}

fn finish(
    all: Vec<Cond>,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    all.into_iter()
        .map(|c| {
            let status = if c.unknown {
                "Unknown"
            } else if c.status {
                "True"
            } else {
                "False"
            }
            .to_string();
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.into(),
                status,
                reason: c.reason,
                message: c.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// A condition's status by type.
pub fn status_of<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a str> {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::build::tests::processor;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use serde_json::json;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    fn deployment(desired: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(desired),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                ready_replicas: Some(ready),
                updated_replicas: Some(desired),
                ..Default::default()
            }),
        }
    }

    fn ready_nodepool() -> NodePool {
        serde_json::from_value(json!({
            "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "x"},
            "spec": {"template": {"spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}, "requirements": []}}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_idle_processor_scaled_to_zero_is_ready() {
        let p = processor(json!({}));
        let o = Observed {
            deployment: Some(deployment(0, 0)),
            node_pool: Some(ready_nodepool()),
            scaler: Some(QueueRead::Readable),
            ..Default::default()
        };
        let c = conditions(&p, &o, &[], &now());
        assert_eq!(status_of(&c, "Ready"), Some("True"));
        assert_eq!(status_of(&c, "Degraded"), Some("False"));
        assert_eq!(status_of(&c, "Progressing"), Some("False"));
        let w = c.iter().find(|c| c.type_ == "WorkersAvailable").unwrap();
        assert_eq!(w.reason, "ScaledToZero");
        assert!(c.iter().all(|c| c.observed_generation == Some(2)));
        assert_eq!(replicas(&o).summary, "0/0");
    }

    #[test]
    fn a_cold_start_is_progressing_not_ready() {
        let p = processor(json!({"modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}}}));
        let o = Observed {
            deployment: Some(deployment(3, 1)),
            cache_job: Some(Job {
                status: Some(JobStatus {
                    active: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            node_pool: Some(ready_nodepool()),
            scaler: Some(QueueRead::Readable),
            ..Default::default()
        };
        let c = conditions(&p, &o, &[], &now());
        assert_eq!(status_of(&c, "Ready"), Some("False"));
        assert_eq!(status_of(&c, "Progressing"), Some("True"));
        assert_eq!(status_of(&c, "CacheReady"), Some("False"));
        let prog = c.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert!(
            prog.message.contains("downloading ViT-B/32 weights")
                && prog.message.contains("1 of 3 workers ready"),
            "{}",
            prog.message
        );
    }

    #[test]
    fn failures_make_it_degraded_with_the_reason() {
        let p = processor(json!({"modelCache": {"claimName": "weights"}}));
        let failed_job = Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: "Failed".into(),
                    status: "True".into(),
                    message: Some("Job has reached the specified backoff limit".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = Observed {
            deployment: Some(deployment(0, 0)),
            cache_job: Some(failed_job),
            node_pool: Some(ready_nodepool()),
            scaler: Some(QueueRead::Unreadable(
                "GetQueueAttributes: AccessDenied".into(),
            )),
            ..Default::default()
        };
        let c = conditions(&p, &o, &[], &now());
        let d = c.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(d.status, "True");
        assert!(
            d.message.contains("backoff limit") && d.message.contains("AccessDenied"),
            "{}",
            d.message
        );
        assert_eq!(status_of(&c, "Ready"), Some("False"));
        let c = invalid_conditions(
            "InvalidSpec",
            "scaling.minInstances must not be greater than scaling.maxInstances",
            Some(4),
            &[],
            &now(),
        );
        assert_eq!(status_of(&c, "Degraded"), Some("True"));
        assert!(
            c.iter()
                .all(|c| c.observed_generation == Some(4) && c.reason == "InvalidSpec")
        );
    }

    #[test]
    fn transition_times_move_only_with_status() {
        let p = processor(json!({}));
        let o = Observed {
            deployment: Some(deployment(0, 0)),
            node_pool: Some(ready_nodepool()),
            ..Default::default()
        };
        let first = conditions(&p, &o, &[], &now());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_100).unwrap());
        let again = conditions(&p, &o, &first, &later);
        assert_eq!(first, again, "nothing changed, nothing moves");
        let o2 = Observed {
            scaler: Some(QueueRead::Readable),
            ..o
        };
        let third = conditions(&p, &o2, &again, &later);
        let scaler = third.iter().find(|c| c.type_ == "ScalerReady").unwrap();
        assert_eq!(
            (scaler.status.as_str(), &scaler.last_transition_time),
            ("True", &later)
        );
    }
}
