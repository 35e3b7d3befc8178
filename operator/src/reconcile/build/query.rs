//! The query endpoint (`spec.query`): `clip-worker query` from the worker image, with the
//! processor's model and model cache, behind a ClusterIP Service, with a PodDisruptionBudget and,
//! with min/max replicas, a CPU HPA.

use std::collections::BTreeMap;

use clip_contract::env;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, PodSpec, PodTemplateSpec,
    ResourceRequirements, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::deployment::{cache_volume, probe};
use super::{
    LABEL_NAMESPACE, LABEL_PROCESSOR, container_security, labels, meta, names, pod_security,
};
use crate::crd::{ComputeDevice, Provisioner, QuerySpec};
use crate::reconcile::validate::ValidatedProcessor;

/// The component label of everything the endpoint is made of.
pub const COMPONENT: &str = "query";

/// What `spec.query` asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryChildren {
    pub deployment: Option<Deployment>,
    pub service: Option<Service>,
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    pub horizontal_pod_autoscaler: Option<HorizontalPodAutoscaler>,
}

/// The endpoint's children, or none when `spec.query` is unset or disabled.
pub fn query_children(p: &ValidatedProcessor) -> QueryChildren {
    let Some(q) = p.spec.query.as_ref().filter(|q| q.enabled) else {
        return QueryChildren::default();
    };
    QueryChildren {
        deployment: Some(query_deployment(p, q)),
        service: Some(query_service(p)),
        pod_disruption_budget: Some(query_pdb(p)),
        horizontal_pod_autoscaler: q.autoscale().map(|(min, max)| query_hpa(p, q, min, max)),
    }
}

/// The Service's in-cluster address.
pub fn url(p: &ValidatedProcessor) -> String {
    format!(
        "http://{}.{}.svc:{}",
        names::query(p),
        p.namespace,
        clip_contract::WORKER_HTTP_PORT
    )
}

fn selector(p: &ValidatedProcessor) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_PROCESSOR.to_string(), p.name.clone()),
        (LABEL_NAMESPACE.to_string(), p.namespace.clone()),
        (
            "app.kubernetes.io/component".to_string(),
            COMPONENT.to_string(),
        ),
    ])
}

/// The endpoint's environment: the model and cache as the workers have them.
pub fn query_env(p: &ValidatedProcessor, q: &QuerySpec) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut vars = vec![
        var(env::CLIP_MODEL, p.model.name.into()),
        var(env::CACHE_DIR, clip_contract::CACHE_MOUNT_PATH.into()),
        var(env::AWS_DEFAULT_REGION, p.region.clone()),
        var(env::HTTP_PORT, clip_contract::WORKER_HTTP_PORT.to_string()),
        var(env::LOG_FORMAT, "json".into()),
    ];
    if q.device == ComputeDevice::Cpu {
        vars.push(var(env::CLIP_DEVICE, "cpu".into()));
    }
    if let Some(n) = q.normalize {
        vars.push(var(env::QUERY_NORMALIZE, n.to_string()));
    }
    if let Some(endpoint) = &p.settings.aws_endpoint_url {
        vars.push(var(env::AWS_ENDPOINT_URL, endpoint.clone()));
    }
    // The weights source and the precision the workers were given, so the vectors match.
    for user in &p.spec.worker.env {
        if [
            env::CLIP_WEIGHTS_SOURCE,
            env::CLIP_PRECISION,
            env::JPEG_DRAFT,
        ]
        .contains(&user.name.as_str())
        {
            vars.retain(|v| v.name != user.name);
            vars.push(user.clone());
        }
    }
    vars
}

fn resources(q: &QuerySpec) -> ResourceRequirements {
    let quantity = |s: &str| Quantity(s.to_string());
    let mut r = q.resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), quantity("1")),
            ("memory".into(), quantity("2Gi")),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), quantity("4Gi"))])),
        ..Default::default()
    });
    if q.device == ComputeDevice::Gpu {
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), quantity("1"));
        if let Some(req) = r.requests.as_mut() {
            req.insert("nvidia.com/gpu".into(), quantity("1"));
        }
    }
    r
}

fn query_deployment(p: &ValidatedProcessor, q: &QuerySpec) -> Deployment {
    let name = names::query(p);
    let cache_volume = cache_volume(p);
    let (mut node_selector, mut tolerations) = (BTreeMap::new(), Vec::<Toleration>::new());
    if q.device == ComputeDevice::Gpu {
        tolerations.push(Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
        // On the workers' GPU nodes.
        match p.provisioner {
            Provisioner::Karpenter => {
                node_selector.insert("karpenter.sh/nodepool".to_string(), names::node_pool(p));
            }
            Provisioner::None if p.device == ComputeDevice::Gpu => {
                node_selector.extend(p.spec.compute.node_selector.clone());
                tolerations.extend(p.spec.compute.tolerations.iter().cloned());
            }
            Provisioner::None => {}
        }
    }
    let container = Container {
        name: COMPONENT.into(),
        image: Some(p.image.clone()),
        image_pull_policy: p.settings.image_pull_policy.clone(),
        args: Some(vec!["query".into()]),
        env: Some(query_env(p, q)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(clip_contract::WORKER_HTTP_PORT),
            ..Default::default()
        }]),
        resources: Some(resources(q)),
        startup_probe: Some(probe(clip_contract::READYZ_PATH, 2, 450)),
        readiness_probe: Some(probe(clip_contract::READYZ_PATH, 5, 2)),
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
    let mut pod_labels = labels(p, COMPONENT);
    pod_labels.extend(selector(p));
    Deployment {
        metadata: meta(p, name, COMPONENT),
        spec: Some(DeploymentSpec {
            // With an HPA, it owns the count.
            replicas: match q.autoscale() {
                Some(_) => None,
                None => Some(q.replicas.unwrap_or(1)),
            },
            selector: LabelSelector {
                match_labels: Some(selector(p)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    // The workers' ServiceAccount: an s3:// weights source needs its role.
                    service_account_name: Some(names::worker(p)),
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
                    image_pull_secrets: super::image_pull_secrets(p),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(pod_security()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn query_service(p: &ValidatedProcessor) -> Service {
    Service {
        metadata: meta(p, names::query(p), COMPONENT),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector(p)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(clip_contract::WORKER_HTTP_PORT),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn query_pdb(p: &ValidatedProcessor) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(p, names::query(p), COMPONENT),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(p)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn query_hpa(p: &ValidatedProcessor, q: &QuerySpec, min: i32, max: i32) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: meta(p, names::query(p), COMPONENT),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: names::query(p),
            },
            min_replicas: Some(min),
            max_replicas: max,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(q.target_cpu_utilization_percentage),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::processor;
    use super::*;
    use serde_json::json;

    #[test]
    fn nothing_without_spec_query_or_when_disabled() {
        assert_eq!(
            query_children(&processor(json!({}))),
            QueryChildren::default()
        );
        assert_eq!(
            query_children(&processor(json!({"query": {"enabled": false}}))),
            QueryChildren::default()
        );
    }

    #[test]
    fn a_cpu_endpoint_with_the_processors_model_and_cache() {
        let p = processor(json!({
            "model": "ViT-L/14",
            "modelCache": {"claimName": "weights"},
            "query": {"replicas": 2, "normalize": true},
            "worker": {"env": [{"name": "CLIP_PRECISION", "value": "fp32"}, {"name": "BATCH_SIZE", "value": "8"}]}
        }));
        let c = query_children(&p);
        let d = c.deployment.unwrap();
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        let ct = &pod.containers[0];
        assert_eq!(ct.args.as_deref(), Some(&["query".to_string()][..]));
        let env: BTreeMap<_, _> = ct
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        assert_eq!(env[env::CLIP_MODEL], "ViT-L/14");
        assert_eq!(env[env::CLIP_DEVICE], "cpu");
        assert_eq!(env[env::QUERY_NORMALIZE], "true");
        assert_eq!(env[env::CLIP_PRECISION], "fp32", "the workers' precision");
        assert!(
            !env.contains_key(env::BATCH_SIZE),
            "not the workers' batch size"
        );
        for v in env.keys() {
            assert!(
                env::QUERY.contains(&v.as_str()),
                "{v} is not read by clip-worker query"
            );
        }
        let claim = pod.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(claim.claim_name, "weights", "the workers' model cache");
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());
        assert!(
            !ct.resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()
                .contains_key("nvidia.com/gpu")
        );
        let svc = c.service.unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("photos-query"));
        assert_eq!(svc.spec.as_ref().unwrap().selector, Some(selector(&p)));
        assert_eq!(url(&p), "http://photos-query.media.svc:8080");
        assert_eq!(
            c.pod_disruption_budget
                .unwrap()
                .spec
                .unwrap()
                .max_unavailable,
            Some(IntOrString::Int(1))
        );
        assert!(c.horizontal_pod_autoscaler.is_none());
    }

    #[test]
    fn min_and_max_replicas_make_an_hpa_that_owns_the_count() {
        let p = processor(
            json!({"query": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 50}}),
        );
        let c = query_children(&p);
        assert_eq!(c.deployment.unwrap().spec.unwrap().replicas, None);
        let hpa = c.horizontal_pod_autoscaler.unwrap().spec.unwrap();
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 6));
        assert_eq!(hpa.scale_target_ref.name, "photos-query");
        let target = &hpa.metrics.unwrap()[0];
        assert_eq!(
            target.resource.as_ref().unwrap().target.average_utilization,
            Some(50)
        );
    }

    #[test]
    fn a_gpu_endpoint_goes_to_the_workers_gpu_pool() {
        let p = processor(json!({"query": {"device": "gpu"}}));
        let pod = query_children(&p)
            .deployment
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(
            pod.node_selector.unwrap()["karpenter.sh/nodepool"],
            names::node_pool(&p)
        );
        let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        let env = pod.containers[0].env.clone().unwrap();
        assert!(env.iter().all(|e| e.name != env::CLIP_DEVICE), "auto: CUDA");
    }
}
