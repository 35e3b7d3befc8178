//! The shared model cache: a static EFS PersistentVolume bound to this processor's claim, and
//! the one-shot Job that fills it (`clip-worker fetch-weights`), one per model.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Container, EnvVar, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PersistentVolumeSpec, PodSpec, PodTemplateSpec, ResourceRequirements, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{cluster_meta, container_security, labels, meta, names, pod_security};
use crate::reconcile::validate::{CacheMode, ValidatedProcessor};

/// EFS is elastic; Kubernetes still requires a size on both sides.
const PLACEHOLDER_SIZE: &str = "100Gi";

/// `fs-...` or `fs-...::fsap-...` (the EFS CSI driver's volume handle grammar).
pub fn volume_handle(file_system_id: &str, access_point_id: Option<&str>) -> String {
    match access_point_id {
        Some(ap) => format!("{file_system_id}::{ap}"),
        None => file_system_id.to_string(),
    }
}

/// The static EFS volume, pre-bound to this processor's claim. Retained on release: deleting the
/// processor never deletes cached weights (or anything else on the file system).
pub fn persistent_volume(p: &ValidatedProcessor) -> PersistentVolume {
    let (fs, ap) = match &p.cache {
        CacheMode::Efs {
            file_system_id,
            access_point_id,
        } => (file_system_id.as_str(), access_point_id.as_deref()),
        _ => ("", None),
    };
    PersistentVolume {
        metadata: cluster_meta(p, names::persistent_volume(p), "model-cache"),
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".into(),
                Quantity(PLACEHOLDER_SIZE.into()),
            )])),
            volume_mode: Some("Filesystem".into()),
            access_modes: Some(vec!["ReadWriteMany".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            claim_ref: Some(ObjectReference {
                namespace: Some(p.namespace.clone()),
                name: Some(names::cache_claim(p)),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: "efs.csi.aws.com".into(),
                volume_handle: volume_handle(fs, ap),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The claim the workers and the cache-warm Job mount: bound to the static EFS volume, or
/// provisioned by the class's StorageClass.
pub fn persistent_volume_claim(p: &ValidatedProcessor) -> PersistentVolumeClaim {
    let (storage_class, size, volume_name) = match &p.cache {
        CacheMode::Dynamic {
            storage_class,
            size,
        } => (storage_class.as_str(), size.as_str(), None),
        _ => ("", PLACEHOLDER_SIZE, Some(names::persistent_volume(p))),
    };
    PersistentVolumeClaim {
        metadata: meta(p, names::cache_claim(p), "model-cache"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteMany".into()]),
            storage_class_name: Some(storage_class.to_string()),
            volume_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size.into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Downloads this processor's model into the shared cache once, before (and while) workers
/// start; the workers' own download-once lock makes a race with them harmless.
/// The cache-warm container: a quarter CPU and 512 MiB requested, at most 1 CPU and 2 GiB.
fn warm_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q("250m")),
            ("memory".into(), q("512Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), q("1")),
            ("memory".into(), q("2Gi")),
        ])),
        ..Default::default()
    }
}

pub fn cache_warm_job(p: &ValidatedProcessor) -> Job {
    let claim = names::mounted_claim(p).unwrap_or_default();
    let mut env = vec![
        EnvVar {
            name: clip_contract::env::CLIP_MODEL.into(),
            value: Some(p.model.name.into()),
            ..Default::default()
        },
        EnvVar {
            name: clip_contract::env::CACHE_DIR.into(),
            value: Some(clip_contract::CACHE_MOUNT_PATH.into()),
            ..Default::default()
        },
        EnvVar {
            name: clip_contract::env::AWS_DEFAULT_REGION.into(),
            value: Some(p.region.clone()),
            ..Default::default()
        },
    ];
    // A custom weights source (and its credentials) set on the workers applies here too.
    env.extend(
        p.spec
            .worker
            .env
            .iter()
            .filter(|e| e.name == clip_contract::env::CLIP_WEIGHTS_SOURCE)
            .cloned(),
    );
    let w = &p.spec.worker;
    let mut pod_labels = w.pod_labels.clone();
    pod_labels.extend(labels(p, "cache-warm"));
    pod_labels.insert(
        "lakechain.dev/model".into(),
        p.model.slug.to_ascii_lowercase(),
    );
    Job {
        metadata: meta(p, names::cache_warm_job(p), "cache-warm"),
        spec: Some(JobSpec {
            backoff_limit: Some(4),
            // A download that hangs is retried by a new pod instead of holding the cache forever.
            active_deadline_seconds: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!w.pod_annotations.is_empty()).then(|| w.pod_annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("OnFailure".into()),
                    priority_class_name: w.priority_class_name.clone(),
                    image_pull_secrets: super::image_pull_secrets(p),
                    service_account_name: Some(names::worker(p)),
                    containers: vec![Container {
                        name: "fetch-weights".into(),
                        image: Some(p.image.clone()),
                        image_pull_policy: p.settings.image_pull_policy.clone(),
                        args: Some(vec!["fetch-weights".into()]),
                        env: Some(env),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "cache".into(),
                            mount_path: clip_contract::CACHE_MOUNT_PATH.into(),
                            ..Default::default()
                        }]),
                        // Requests and limits, so a namespace whose ResourceQuota requires
                        // them admits the Job; a download streams to disk and needs little.
                        resources: Some(warm_resources()),
                        security_context: Some(container_security()),
                        ..Default::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "cache".into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: claim,
                            read_only: None,
                        }),
                        ..Default::default()
                    }]),
                    security_context: Some(pod_security()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{pod_overrides, processor};
    use super::*;
    use serde_json::json;

    #[test]
    fn the_efs_volume_is_static_rwx_retained_and_pre_bound() {
        let p = processor(
            json!({"modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0", "accessPointId": "fsap-0123456789abcdef0"}}}),
        );
        let pv = persistent_volume(&p);
        let spec = pv.spec.unwrap();
        let csi = spec.csi.unwrap();
        assert_eq!(csi.driver, "efs.csi.aws.com");
        assert_eq!(
            csi.volume_handle,
            "fs-0123456789abcdef0::fsap-0123456789abcdef0"
        );
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteMany"]);
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(spec.claim_ref.unwrap().name, Some(names::cache_claim(&p)));
        let pvc = persistent_volume_claim(&p).spec.unwrap();
        assert_eq!(pvc.volume_name, Some(names::persistent_volume(&p)));
        assert_eq!(pvc.storage_class_name.as_deref(), Some(""));
        assert_eq!(volume_handle("fs-1", None), "fs-1");
    }

    #[test]
    fn a_new_file_system_or_access_point_gets_a_new_volume_and_claim() {
        let efs = |fs: &str, ap: Option<&str>| {
            processor(json!({"modelCache": {"efs": {"fileSystemId": fs, "accessPointId": ap}}}))
        };
        let a = efs("fs-0123456789abcdef0", Some("fsap-0123456789abcdef0"));
        let names = |p: &ValidatedProcessor| (names::persistent_volume(p), names::cache_claim(p));
        // Stable for the same handle (no churn on upgrade-free reconciles)...
        assert_eq!(
            names(&a),
            names(&efs("fs-0123456789abcdef0", Some("fsap-0123456789abcdef0")))
        );
        // ... different for a new access point, a new file system, or none.
        for other in [
            efs("fs-0123456789abcdef0", Some("fsap-0fedcba987654321")),
            efs("fs-0fedcba9876543210", Some("fsap-0123456789abcdef0")),
            efs("fs-0123456789abcdef0", None),
        ] {
            let (pv, pvc) = names(&other);
            assert_ne!(pv, names(&a).0);
            assert_ne!(pvc, names(&a).1);
            assert!(pvc.starts_with("photos-model-cache-"), "{pvc}");
        }
    }

    #[test]
    fn the_warm_job_fetches_this_model_into_the_shared_claim() {
        let p = processor(json!({"model": "ViT-B/16", "modelCache": {"claimName": "weights"}}));
        let job = cache_warm_job(&p);
        assert_eq!(
            job.metadata.name.as_deref(),
            Some("photos-cache-warm-vit-b-16")
        );
        let pod = job.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["fetch-weights".to_string()][..]));
        let env: BTreeMap<_, _> = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        assert_eq!(env["CLIP_MODEL"], "ViT-B/16");
        assert_eq!(env["CACHE_DIR"], "/cache");
        assert_eq!(
            pod.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "weights"
        );
        assert_eq!(pod.security_context.unwrap().run_as_user, Some(1000));
    }

    #[test]
    fn the_cache_warm_job_gets_pull_secrets_labels_priority_and_resources() {
        let p = processor(pod_overrides());
        let t = cache_warm_job(&p).spec.unwrap().template;
        let (meta, pod) = (t.metadata.unwrap(), t.spec.unwrap());
        assert_eq!(meta.labels.unwrap()["team"], "search");
        assert_eq!(
            meta.annotations.unwrap()["sidecar.istio.io/inject"],
            "false"
        );
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        assert_eq!(pod.priority_class_name.as_deref(), Some("batch-high"));
        // GPU-node placement is for the workers: the Job runs anywhere.
        assert!(pod.tolerations.is_none() && pod.affinity.is_none());
        // A ResourceQuota on requests and limits admits it.
        let r = pod.containers[0].resources.clone().unwrap();
        for key in ["cpu", "memory"] {
            assert!(
                r.requests.as_ref().unwrap().contains_key(key),
                "request {key}"
            );
            assert!(r.limits.as_ref().unwrap().contains_key(key), "limit {key}");
        }
    }
}
