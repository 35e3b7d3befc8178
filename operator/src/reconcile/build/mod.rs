//! Pure builders: a [`ValidatedProcessor`] in, the objects the operator applies out. No client,
//! no I/O: `clip-operator render` prints exactly these.

mod cache;
mod deployment;
pub mod keda;
mod nodepool;
mod query;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, PodSecurityContext, SeccompProfile, SecurityContext, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use cache::{cache_warm_job, persistent_volume, persistent_volume_claim};
pub use deployment::{deployment, resources as worker_resources};
pub use keda::{scaled_object, trigger_authentication};
pub use nodepool::{class_node_pool, instance_shape, node_pool};
pub use query::{QueryChildren, query_children, url as query_url};

use super::validate::{CacheMode, ValidatedProcessor};
use crate::crd::{Provisioner, ScalingEngine};
use crate::external::karpenter::NodePool;
use crate::external::keda_scaled_object::ScaledObject;
use crate::external::keda_trigger_authentication::TriggerAuthentication;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

/// Label with the owning processor's name (on every child).
pub const LABEL_PROCESSOR: &str = "lakechain.dev/processor";
/// Label with the owning processor's namespace (on every child; cluster-scoped ones need it).
pub const LABEL_NAMESPACE: &str = "lakechain.dev/processor-namespace";
/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "clip-operator";

/// Everything one processor should own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Children {
    pub service_account: Option<ServiceAccount>,
    pub deployment: Option<Deployment>,
    pub persistent_volume: Option<PersistentVolume>,
    pub persistent_volume_claim: Option<PersistentVolumeClaim>,
    pub cache_warm_job: Option<Job>,
    pub node_pool: Option<NodePool>,
    pub trigger_authentication: Option<TriggerAuthentication>,
    pub scaled_object: Option<ScaledObject>,
    /// The query endpoint (`spec.query`).
    pub query: QueryChildren,
}

/// Builds every child for `p`.
pub fn children(p: &ValidatedProcessor) -> Children {
    let efs = matches!(p.cache, CacheMode::Efs { .. });
    let claim = efs || matches!(p.cache, CacheMode::Dynamic { .. });
    let keda = p.engine == ScalingEngine::Keda;
    Children {
        service_account: Some(service_account(p)),
        deployment: Some(deployment(p)),
        persistent_volume: efs.then(|| persistent_volume(p)),
        persistent_volume_claim: claim.then(|| persistent_volume_claim(p)),
        cache_warm_job: p.cache.shared().then(|| cache_warm_job(p)),
        node_pool: (p.provisioner == Provisioner::Karpenter).then(|| match &p.class {
            Some(class) => class_node_pool(p, class),
            None => node_pool(p),
        }),
        trigger_authentication: keda.then(|| trigger_authentication(p)),
        scaled_object: keda.then(|| scaled_object(p)),
        query: query_children(p),
    }
}

/// Names of the children (one place, so builders, cleanup and status agree).
pub mod names {
    use super::ValidatedProcessor;

    pub fn worker(p: &ValidatedProcessor) -> String {
        format!("{}-worker", p.name)
    }
    /// The query endpoint's Deployment, Service, PodDisruptionBudget and HPA.
    pub fn query(p: &ValidatedProcessor) -> String {
        format!("{}-query", p.name)
    }
    /// The operator's claim on the EFS cache. It and the volume carry 8 hex digits of the EFS
    /// volume handle: a volume's source and a claim's `volumeName` are immutable, so a new file
    /// system or access point gets a new volume and claim (the old ones are swept once unused)
    /// rather than an apply the API server refuses forever.
    pub fn cache_claim(p: &ValidatedProcessor) -> String {
        format!("{}-model-cache-{}", p.name, handle_hash(p))
    }
    fn handle_hash(p: &ValidatedProcessor) -> String {
        match &p.cache {
            super::CacheMode::Efs {
                file_system_id,
                access_point_id,
            } => fnv8(
                super::cache::volume_handle(file_system_id, access_point_id.as_deref()).as_bytes(),
            ),
            // A claim's storage class is immutable too.
            super::CacheMode::Dynamic { storage_class, .. } => {
                fnv8(format!("sc:{storage_class}").as_bytes())
            }
            _ => fnv8(b""),
        }
    }
    /// The claim the workers mount: ours (EFS) or the user's.
    pub fn mounted_claim(p: &ValidatedProcessor) -> Option<String> {
        match &p.cache {
            super::CacheMode::Efs { .. } | super::CacheMode::Dynamic { .. } => Some(cache_claim(p)),
            super::CacheMode::Claim(c) => Some(c.clone()),
            super::CacheMode::EmptyDir => None,
        }
    }
    /// Cluster-scoped, so unique across namespaces: `clip-<name>-<hash of namespace/name>`; under
    /// a class, the class's (`clip-class-<class>`).
    pub fn node_pool(p: &ValidatedProcessor) -> String {
        if let Some(class) = &p.class {
            return class.node_pool();
        }
        format!("clip-{}-{}", p.name, short_hash(&p.namespace, &p.name))
    }
    pub fn persistent_volume(p: &ValidatedProcessor) -> String {
        format!(
            "clip-{}-{}-model-cache-{}",
            p.name,
            short_hash(&p.namespace, &p.name),
            handle_hash(p)
        )
    }
    /// One Job per model, so a model change warms the new model's cache.
    pub fn cache_warm_job(p: &ValidatedProcessor) -> String {
        format!(
            "{}-cache-warm-{}",
            p.name,
            p.model.slug.to_ascii_lowercase()
        )
    }
    pub fn scaled_object(p: &ValidatedProcessor) -> String {
        p.name.clone()
    }
    pub fn trigger_authentication(p: &ValidatedProcessor) -> String {
        format!("{}-sqs", p.name)
    }

    /// 8 hex digits of FNV-1a over `namespace/name`: stable across versions and platforms.
    pub fn short_hash(namespace: &str, name: &str) -> String {
        fnv8(format!("{namespace}/{name}").as_bytes())
    }

    fn fnv8(bytes: &[u8]) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for &b in bytes {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    }
}

/// Labels every child carries. The processor's own labels (and Argo CD's tracking labels) are
/// never copied: Argo CD would take children for its own resources and prune them.
pub fn labels(p: &ValidatedProcessor, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "clip-processor"),
        ("app.kubernetes.io/component", component),
        ("app.kubernetes.io/part-of", "lakechain"),
        ("app.kubernetes.io/managed-by", "clip-operator"),
        (LABEL_PROCESSOR, &p.name),
        (LABEL_NAMESPACE, &p.namespace),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The pull secrets of the worker and cache-warm pods: the operator's (the chart's
/// worker.imagePullSecrets), then the processor's, each name once.
pub fn image_pull_secrets(
    p: &ValidatedProcessor,
) -> Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>> {
    let mut names: Vec<String> = p.settings.image_pull_secrets.clone();
    for s in &p.spec.worker.image_pull_secrets {
        if !names.contains(&s.name) {
            names.push(s.name.clone());
        }
    }
    (!names.is_empty()).then(|| {
        names
            .into_iter()
            .map(|name| k8s_openapi::api::core::v1::LocalObjectReference { name })
            .collect()
    })
}

/// The label selector that finds a processor's children.
pub fn selector(name: &str, namespace: &str) -> String {
    format!("{LABEL_PROCESSOR}={name},{LABEL_NAMESPACE}={namespace}")
}

/// Metadata of a namespaced child.
pub fn meta(p: &ValidatedProcessor, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(p.namespace.clone()),
        labels: Some(labels(p, component)),
        ..Default::default()
    }
}

/// Metadata of a cluster-scoped child.
pub fn cluster_meta(p: &ValidatedProcessor, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        labels: Some(labels(p, component)),
        ..Default::default()
    }
}

/// The pod security of every pod the operator creates (workers and cache warm): the worker's uid
/// (the seed's EFS access point owner), non-root, RuntimeDefault seccomp.
pub fn pod_security() -> PodSecurityContext {
    let uid = clip_contract::WORKER_UID;
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The restricted container security of every container the operator creates.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The workers' ServiceAccount, with the IRSA annotation when a role is given.
pub fn service_account(p: &ValidatedProcessor) -> ServiceAccount {
    let mut metadata = meta(p, names::worker(p), "worker");
    if let Some(role) = &p.spec.service_account.role_arn {
        metadata.annotations = Some(BTreeMap::from([(
            "eks.amazonaws.com/role-arn".to_string(),
            role.clone(),
        )]));
    }
    ServiceAccount {
        metadata,
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reconcile::validate::{OperatorSettings, validate};

    /// A spec fragment with every worker pod override set (build's pod tests share it).
    pub fn pod_overrides() -> serde_json::Value {
        serde_json::json!({
            "modelCache": {"none": null, "claimName": "weights"},
            "worker": {
                "podLabels": {"team": "search", "cost-center": "ml"},
                "podAnnotations": {"sidecar.istio.io/inject": "false"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
                "priorityClassName": "batch-high",
                "imagePullSecrets": [{"name": "registry"}]
            }
        })
    }

    /// A validated processor from a spec fragment (see validate's tests for the base).
    pub fn processor(spec: serde_json::Value) -> ValidatedProcessor {
        let mut base = serde_json::json!({
            "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessor",
            "metadata": {"name": "photos", "namespace": "media", "generation": 2},
            "spec": {
                "source": {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/clip-input"},
                "output": {"topicArn": "arn:aws:sns:eu-west-1:123456789012:clip-output"},
                "cacheStorage": {"bucket": "lakechain-cache"}
            }
        });
        if let (Some(b), Some(s)) = (base["spec"].as_object_mut(), spec.as_object()) {
            for (k, v) in s {
                b.insert(k.clone(), v.clone());
            }
        }
        validate(
            &serde_json::from_value(base).unwrap(),
            &OperatorSettings::default(),
        )
        .unwrap()
    }

    #[test]
    fn children_follow_the_spec() {
        let default = children(&processor(serde_json::json!({})));
        assert!(
            default.node_pool.is_some()
                && default.deployment.is_some()
                && default.service_account.is_some()
        );
        assert!(
            default.persistent_volume.is_none()
                && default.cache_warm_job.is_none()
                && default.scaled_object.is_none()
        );
        let full = children(&processor(serde_json::json!({
            "modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}},
            "scaling": {"engine": "keda"},
            "compute": {"nodePool": {"provisioner": "none"}}
        })));
        assert!(
            full.persistent_volume.is_some()
                && full.persistent_volume_claim.is_some()
                && full.cache_warm_job.is_some()
        );
        assert!(full.scaled_object.is_some() && full.trigger_authentication.is_some());
        assert!(full.node_pool.is_none());
        let claim = children(&processor(
            serde_json::json!({"modelCache": {"claimName": "weights"}}),
        ));
        assert!(claim.cache_warm_job.is_some() && claim.persistent_volume.is_none());
        let cpu = children(&processor(
            serde_json::json!({"compute": {"device": "cpu"}}),
        ));
        assert!(
            cpu.node_pool.is_none() && cpu.deployment.is_some(),
            "CPU workers need no GPU node pool"
        );
    }

    #[test]
    fn cluster_scoped_names_are_unique_per_namespace() {
        let a = names::short_hash("media", "photos");
        assert_eq!(a, names::short_hash("media", "photos"));
        assert_ne!(a, names::short_hash("other", "photos"));
        assert_eq!(a.len(), 8);
        let p = processor(serde_json::json!({}));
        assert_eq!(names::node_pool(&p), format!("clip-photos-{a}"));
        assert_eq!(names::cache_warm_job(&p), "photos-cache-warm-vit-b-32");
        // The longest allowed name keeps every child name within 63 characters.
        let long = "x".repeat(crate::reconcile::validate::MAX_NAME);
        assert!(format!("{long}-cache-warm-vit-b-32").len() <= 63);
        assert!(format!("clip-{long}-{a}").len() <= 63);
    }

    #[test]
    fn labels_never_carry_argo_cd_tracking() {
        let l = labels(&processor(serde_json::json!({})), "worker");
        assert_eq!(l[LABEL_PROCESSOR], "photos");
        assert_eq!(l[LABEL_NAMESPACE], "media");
        assert!(!l.contains_key("app.kubernetes.io/instance"));
        assert!(l.keys().all(|k| !k.starts_with("argocd.argoproj.io")));
    }

    #[test]
    fn the_service_account_carries_the_irsa_role() {
        let sa = service_account(&processor(
            serde_json::json!({"serviceAccount": {"roleArn": "arn:aws:iam::123456789012:role/clip-worker"}}),
        ));
        assert_eq!(
            sa.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::123456789012:role/clip-worker"
        );
        assert!(
            service_account(&processor(serde_json::json!({})))
                .metadata
                .annotations
                .is_none()
        );
    }
}
