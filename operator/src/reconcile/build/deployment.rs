//! The worker Deployment. `replicas` is never part of it: the scaler (ours or KEDA's) owns the
//! count through the scale subresource; the Deployment is created at 0 once (see apply).

use std::collections::BTreeMap;

use clip_contract::env;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    LABEL_NAMESPACE, LABEL_PROCESSOR, container_security, labels, meta, names, pod_security,
};
use crate::crd::{ComputeDevice, Provisioner};
use crate::reconcile::validate::ValidatedProcessor;

/// Seconds the worker gets after SIGTERM to finish a batch (`SHUTDOWN_GRACE_SECONDS`); the pod's
/// termination grace period adds a margin for the releases that follow.
pub const WORKER_GRACE_SECONDS: i64 = 30;
/// A cold start may download gigabytes of weights and load them: the start-up probe allows 15 min,
/// checked every 2 s so a worker counts as Ready soon after its model is loaded.
const STARTUP_PROBE_PERIOD: i32 = 2;
const STARTUP_PROBE_FAILURES: i32 = 450;

/// The worker environment: the seed's variables, then ours, then the user's (which win).
pub fn worker_env(p: &ValidatedProcessor) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut vars = vec![
        var(env::INPUT_QUEUE_URL, p.spec.source.queue_url.clone()),
        var(env::SNS_TARGET_TOPIC, p.spec.output.topic_arn.clone()),
        var(
            env::LAKECHAIN_CACHE_STORAGE,
            p.spec.cache_storage.bucket.clone(),
        ),
        var(env::CACHE_DIR, clip_contract::CACHE_MOUNT_PATH.into()),
        var(env::CLIP_MODEL, p.model.name.into()),
        var(env::EXTRACT_LABELS, p.spec.label_extraction.to_string()),
        var(env::AWS_DEFAULT_REGION, p.region.clone()),
        var(
            env::POWERTOOLS_SERVICE_NAME,
            clip_contract::DEFAULT_SERVICE_NAME.into(),
        ),
        var(env::HTTP_PORT, clip_contract::WORKER_HTTP_PORT.to_string()),
        var(env::LOG_FORMAT, "json".into()),
        var(
            env::SHUTDOWN_GRACE_SECONDS,
            WORKER_GRACE_SECONDS.to_string(),
        ),
    ];
    if let Some(b) = p.spec.worker.batch_size {
        vars.push(var(env::BATCH_SIZE, b.to_string()));
    }
    if p.device == ComputeDevice::Cpu {
        vars.push(var(env::CLIP_DEVICE, "cpu".into()));
    }
    if let Some(endpoint) = &p.settings.aws_endpoint_url {
        vars.push(var(env::AWS_ENDPOINT_URL, endpoint.clone()));
    }
    for user in &p.spec.worker.env {
        vars.retain(|v| v.name != user.name);
        vars.push(user.clone());
    }
    vars
}

/// Resources: the user's, else the device's defaults; on GPUs the GPU count is always taken
/// from compute.gpusPerInstance.
pub fn resources(p: &ValidatedProcessor) -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    let (memory_request, memory_limit) = match p.device {
        ComputeDevice::Gpu => ("8Gi", "14Gi"),
        // fp32 weights (0.6-1.7 GB) plus the decode budget (2 GiB); no CUDA context.
        ComputeDevice::Cpu => ("3Gi", "6Gi"),
    };
    let mut r = p
        .spec
        .worker
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), q("2")),
                ("memory".into(), q(memory_request)),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), q(memory_limit))])),
            ..Default::default()
        });
    if p.device == ComputeDevice::Cpu {
        return r;
    }
    let gpus = q(&p.spec.compute.gpus_per_instance.to_string());
    r.limits
        .get_or_insert_with(BTreeMap::new)
        .insert("nvidia.com/gpu".into(), gpus.clone());
    if let Some(req) = r.requests.as_mut() {
        req.insert("nvidia.com/gpu".into(), gpus);
    }
    r
}

pub(super) fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Default::default()
    }
}

/// The model cache at /cache: the mounted claim, else an emptyDir (the worker downloads).
pub(super) fn cache_volume(p: &ValidatedProcessor) -> Volume {
    match names::mounted_claim(p) {
        Some(claim) => Volume {
            name: "cache".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim,
                read_only: Some(false),
            }),
            ..Default::default()
        },
        None => Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("20Gi".into())),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// The worker Deployment (without `replicas`).
pub fn deployment(p: &ValidatedProcessor) -> Deployment {
    let name = names::worker(p);
    let selector = BTreeMap::from([
        (LABEL_PROCESSOR.to_string(), p.name.clone()),
        (LABEL_NAMESPACE.to_string(), p.namespace.clone()),
        (
            "app.kubernetes.io/component".to_string(),
            "worker".to_string(),
        ),
    ]);
    let cache_volume = cache_volume(p);
    let mut tolerations = Vec::new();
    if p.device == ComputeDevice::Gpu {
        tolerations.push(Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    let node_selector = match p.provisioner {
        Provisioner::Karpenter => {
            BTreeMap::from([("karpenter.sh/nodepool".to_string(), names::node_pool(p))])
        }
        Provisioner::None => {
            tolerations.extend(p.spec.compute.tolerations.iter().cloned());
            p.spec.compute.node_selector.clone()
        }
    };
    let w = &p.spec.worker;
    tolerations.extend(w.tolerations.iter().cloned());
    let container = Container {
        name: "worker".into(),
        image: Some(p.image.clone()),
        image_pull_policy: p.settings.image_pull_policy.clone(),
        args: Some(vec!["serve".into()]),
        env: Some(worker_env(p)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(clip_contract::WORKER_HTTP_PORT),
            ..Default::default()
        }]),
        resources: Some(resources(p)),
        startup_probe: Some(probe(
            clip_contract::READYZ_PATH,
            STARTUP_PROBE_PERIOD,
            STARTUP_PROBE_FAILURES,
        )),
        readiness_probe: Some(probe(clip_contract::READYZ_PATH, 10, 3)),
        liveness_probe: Some(probe(clip_contract::HEALTHZ_PATH, 20, 3)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "cache".into(),
                mount_path: clip_contract::CACHE_MOUNT_PATH.into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        security_context: Some(container_security()),
        ..Default::default()
    };
    // The user's labels and annotations first; the operator's (a CEL rule keeps them apart)
    // always win.
    let mut pod_labels = w.pod_labels.clone();
    pod_labels.extend(labels(p, "worker"));
    pod_labels.extend(selector.clone());
    let mut annotations = w.pod_annotations.clone();
    // Karpenter never consolidates a node away from under a busy worker.
    annotations.insert("karpenter.sh/do-not-disrupt".into(), "true".into());
    Deployment {
        metadata: meta(p, name.clone(), "worker"),
        spec: Some(DeploymentSpec {
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // Replace a worker before starting its successor: no spare GPU node is needed for a
            // rollout; the queue absorbs the gap.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name),
                    containers: vec![container],
                    volumes: Some(vec![
                        cache_volume,
                        Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                    ]),
                    node_selector: (!node_selector.is_empty()).then_some(node_selector),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    affinity: w.affinity.clone(),
                    topology_spread_constraints: (!w.topology_spread_constraints.is_empty())
                        .then(|| w.topology_spread_constraints.clone()),
                    priority_class_name: w.priority_class_name.clone(),
                    image_pull_secrets: super::image_pull_secrets(p),
                    termination_grace_period_seconds: Some(WORKER_GRACE_SECONDS + 15),
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

    fn env_map(p: &ValidatedProcessor) -> BTreeMap<String, String> {
        worker_env(p)
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn the_worker_gets_every_seed_variable_from_the_contract() {
        let p = processor(json!({"model": "ViT-L/14", "labelExtraction": false}));
        let env = env_map(&p);
        for v in env::SEED {
            assert!(env.contains_key(v), "{v} missing");
        }
        for v in env.keys() {
            assert!(
                env::ALL.contains(&v.as_str()),
                "{v} is not a variable the worker reads"
            );
        }
        assert_eq!(env[env::CLIP_MODEL], "ViT-L/14");
        assert_eq!(env[env::EXTRACT_LABELS], "false");
        assert_eq!(env[env::AWS_DEFAULT_REGION], "eu-west-1");
        assert_eq!(env[env::CACHE_DIR], "/cache");
        assert_eq!(env[env::LAKECHAIN_CACHE_STORAGE], "lakechain-cache");
    }

    #[test]
    fn user_env_overrides_ours() {
        let p = processor(
            json!({"worker": {"batchSize": 64, "env": [{"name": "BATCH_SIZE", "value": "8"}, {"name": "X", "value": "y"}]}}),
        );
        let env = worker_env(&p);
        assert_eq!(env.iter().filter(|e| e.name == "BATCH_SIZE").count(), 1);
        assert_eq!(env_map(&p)["BATCH_SIZE"], "8");
    }

    #[test]
    fn the_pod_is_a_restricted_gpu_pod_on_its_pool() {
        let p = processor(json!({"compute": {"gpusPerInstance": 2}}));
        let d = deployment(&p);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, None, "the scaler owns replicas");
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("2".into())
        );
        assert_eq!(
            pod.node_selector.unwrap()["karpenter.sh/nodepool"],
            names::node_pool(&p)
        );
        assert!(
            pod.tolerations
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
        );
        let sc = pod.security_context.unwrap();
        assert_eq!(
            (
                sc.run_as_user,
                sc.run_as_group,
                sc.fs_group,
                sc.run_as_non_root
            ),
            (Some(1000), Some(1000), Some(1000), Some(true))
        );
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let csc = c.security_context.as_ref().unwrap();
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(
            csc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/cache")
        );
        let startup = c.startup_probe.as_ref().unwrap();
        assert!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap() >= 600,
            "tolerates a cold model load"
        );
        assert!(pod.termination_grace_period_seconds.unwrap() > WORKER_GRACE_SECONDS);
        let annotations = spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    }

    #[test]
    fn existing_nodes_are_selected_by_the_users_selector() {
        let p = processor(json!({"compute": {
            "nodePool": {"provisioner": "none"},
            "nodeSelector": {"node.kubernetes.io/instance-type": "g5.xlarge"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
        }}));
        let pod = deployment(&p).spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.node_selector.unwrap()["node.kubernetes.io/instance-type"],
            "g5.xlarge"
        );
        assert_eq!(pod.tolerations.unwrap().len(), 2);
    }

    #[test]
    fn cpu_workers_request_no_gpu_and_run_on_the_cpu() {
        let p =
            processor(json!({"compute": {"device": "cpu", "nodeSelector": {"pool": "general"}}}));
        let pod = deployment(&p).spec.unwrap().template.spec.unwrap();
        let r = pod.containers[0].resources.clone().unwrap();
        let named = |m: Option<BTreeMap<String, Quantity>>| m.unwrap_or_default();
        let (requests, limits) = (named(r.requests), named(r.limits));
        assert!(
            !requests.contains_key("nvidia.com/gpu") && !limits.contains_key("nvidia.com/gpu"),
            "{requests:?} {limits:?}"
        );
        assert_eq!(requests["cpu"], Quantity("2".into()));
        assert_eq!(limits["memory"], Quantity("6Gi".into()));
        assert_eq!(env_map(&p)[env::CLIP_DEVICE], "cpu");
        assert_eq!(pod.node_selector.unwrap()["pool"], "general");
        assert!(pod.tolerations.is_none(), "no GPU taint to tolerate");
        // A GPU processor says nothing about the device: the worker picks CUDA when it has one.
        assert!(!env_map(&processor(json!({}))).contains_key(env::CLIP_DEVICE));
    }

    #[test]
    fn the_cache_volume_follows_model_cache() {
        let pod = |spec| {
            deployment(&processor(spec))
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
        };
        let v = &pod(json!({"modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}}}))
            .volumes
            .unwrap()[0];
        assert!(
            v.persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name
                .starts_with("photos-model-cache-")
        );
        let v = &pod(json!({"modelCache": {"claimName": "weights"}}))
            .volumes
            .unwrap()[0];
        assert_eq!(
            v.persistent_volume_claim.as_ref().unwrap().claim_name,
            "weights"
        );
        assert!(pod(json!({})).volumes.unwrap()[0].empty_dir.is_some());
    }

    #[test]
    fn pod_overrides_reach_the_worker_pods_and_the_operators_labels_win() {
        let p = processor(pod_overrides());
        let t = deployment(&p).spec.unwrap().template;
        let (meta, pod) = (t.metadata.unwrap(), t.spec.unwrap());
        let labels = meta.labels.unwrap();
        assert_eq!(
            (labels["team"].as_str(), labels["cost-center"].as_str()),
            ("search", "ml")
        );
        assert_eq!(labels[LABEL_PROCESSOR], "photos");
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
        let tolerations: Vec<_> = pod
            .tolerations
            .unwrap()
            .into_iter()
            .filter_map(|t| t.key)
            .collect();
        assert_eq!(tolerations, ["nvidia.com/gpu", "dedicated"]);
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(pod.topology_spread_constraints.unwrap()[0].max_skew, 1);
        assert_eq!(pod.priority_class_name.as_deref(), Some("batch-high"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        // The operator's pull secrets (the chart's worker.imagePullSecrets) come first, once.
        let mut p = processor(json!({"worker": {"imagePullSecrets": [{"name": "registry"}]}}));
        p.settings.image_pull_secrets = vec!["cluster-wide".into(), "registry".into()];
        let pod = deployment(&p).spec.unwrap().template.spec.unwrap();
        let names: Vec<_> = pod
            .image_pull_secrets
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["cluster-wide", "registry"]);
        // None of it by default.
        let pod = deployment(&processor(json!({})))
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert!(pod.affinity.is_none() && pod.image_pull_secrets.is_none());
        assert!(pod.priority_class_name.is_none() && pod.topology_spread_constraints.is_none());
    }
}
