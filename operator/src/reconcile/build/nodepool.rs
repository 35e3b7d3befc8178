//! The Karpenter `NodePool` (`karpenter.sh/v1`, cluster-scoped) that brings GPU nodes up with the
//! queue and removes them once empty.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{LABEL_NAMESPACE, LABEL_PROCESSOR, cluster_meta, names};
use crate::class::{Governed, LABEL_CLASS};
use crate::external::karpenter::{
    NodePool, NodePoolDisruption, NodePoolDisruptionBudgets, NodePoolDisruptionConsolidationPolicy,
    NodePoolSpec, NodePoolTemplate, NodePoolTemplateMetadata, NodePoolTemplateSpec,
    NodePoolTemplateSpecNodeClassRef, NodePoolTemplateSpecRequirements,
    NodePoolTemplateSpecRequirementsOperator, NodePoolTemplateSpecStartupTaints,
    NodePoolTemplateSpecStartupTaintsEffect, NodePoolTemplateSpecTaints,
    NodePoolTemplateSpecTaintsEffect,
};
use crate::reconcile::validate::{CacheMode, ValidatedProcessor};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// vCPUs and memory (GiB) of the GPU instance types people use for CLIP, to size the pool's
/// cpu/memory limits like its GPU limit.
pub fn instance_shape(instance_type: &str) -> Option<(u32, u32)> {
    Some(match instance_type {
        "g4dn.xlarge" => (4, 16),
        "g4dn.2xlarge" => (8, 32),
        "g4dn.4xlarge" => (16, 64),
        "g4dn.8xlarge" => (32, 128),
        "g4dn.12xlarge" => (48, 192),
        "g4dn.16xlarge" => (64, 256),
        "g5.xlarge" => (4, 16),
        "g5.2xlarge" => (8, 32),
        "g5.4xlarge" => (16, 64),
        "g5.8xlarge" => (32, 128),
        "g5.12xlarge" => (48, 192),
        "g5.16xlarge" => (64, 256),
        "g6.xlarge" => (4, 16),
        "g6.2xlarge" => (8, 32),
        "g6.4xlarge" => (16, 64),
        "g6.8xlarge" => (32, 128),
        "g6.12xlarge" => (48, 192),
        "g6.16xlarge" => (64, 256),
        "g6e.xlarge" => (4, 32),
        "g6e.2xlarge" => (8, 64),
        "g6e.4xlarge" => (16, 128),
        "p3.2xlarge" => (8, 61),
        _ => return None,
    })
}

fn requirement(key: &str, values: Vec<String>) -> NodePoolTemplateSpecRequirements {
    NodePoolTemplateSpecRequirements {
        key: key.into(),
        operator: NodePoolTemplateSpecRequirementsOperator::In,
        values: Some(values),
        min_values: None,
    }
}

/// The processor's GPU node pool.
pub fn node_pool(p: &ValidatedProcessor) -> NodePool {
    let c = &p.spec.compute;
    // Suspended: no room for a node, so nothing starts one.
    let max = if p.held() {
        0
    } else {
        i64::from(p.spec.scaling.max_instances)
    };
    let mut limits = BTreeMap::from([(
        "nvidia.com/gpu".to_string(),
        IntOrString::String((max * i64::from(c.gpus_per_instance)).to_string()),
    )]);
    // CPU and memory limits from the largest listed type; left out if a type is unknown (the GPU
    // limit still bounds the pool).
    let shapes: Option<Vec<(u32, u32)>> =
        c.instance_types.iter().map(|t| instance_shape(t)).collect();
    if let Some(shapes) = shapes {
        let cpu = shapes.iter().map(|s| s.0).max().unwrap_or(0);
        let mem = shapes.iter().map(|s| s.1).max().unwrap_or(0);
        limits.insert(
            "cpu".into(),
            IntOrString::String((max * i64::from(cpu)).to_string()),
        );
        limits.insert(
            "memory".into(),
            IntOrString::String(format!("{}Gi", max * i64::from(mem))),
        );
    }
    let mut node_labels = BTreeMap::from([
        // The NVIDIA device plugin chart schedules onto nodes with this label (no NFD needed).
        ("nvidia.com/gpu.present".to_string(), "true".to_string()),
        (LABEL_PROCESSOR.to_string(), p.name.clone()),
        (LABEL_NAMESPACE.to_string(), p.namespace.clone()),
    ]);
    node_labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "clip-operator".into(),
    );
    let requirements = vec![
        requirement("node.kubernetes.io/instance-type", c.instance_types.clone()),
        requirement(
            "karpenter.sh/capacity-type",
            vec![p.capacity_type.as_str().into()],
        ),
        requirement("kubernetes.io/arch", vec!["amd64".into()]),
        requirement("kubernetes.io/os", vec!["linux".into()]),
    ];
    pool(
        cluster_meta(p, names::node_pool(p), "node-pool"),
        Template {
            node_labels,
            node_class_ref: NodePoolTemplateSpecNodeClassRef {
                group: "karpenter.k8s.aws".into(),
                kind: "EC2NodeClass".into(),
                name: c.node_pool.node_class_name.clone(),
            },
            requirements,
            taints: vec![gpu_taint()],
            efs: matches!(p.cache, CacheMode::Efs { .. }),
            // Only empty nodes go (running workers are never repacked), once they stayed empty
            // for the processor's cooldown.
            consolidate_after_seconds: p.spec.scaling.cooldown_seconds,
        },
        Some(limits),
    )
}

/// The GPU nodes' taint: only pods that tolerate it (GPU workers) land there.
fn gpu_taint() -> NodePoolTemplateSpecTaints {
    NodePoolTemplateSpecTaints {
        key: "nvidia.com/gpu".into(),
        value: Some("true".into()),
        effect: NodePoolTemplateSpecTaintsEffect::NoSchedule,
        time_added: None,
    }
}

/// What differs between a processor's pool and a class's.
struct Template {
    node_labels: BTreeMap<String, String>,
    node_class_ref: NodePoolTemplateSpecNodeClassRef,
    requirements: Vec<NodePoolTemplateSpecRequirements>,
    taints: Vec<NodePoolTemplateSpecTaints>,
    /// The workers mount EFS: they wait for the EFS CSI node agent (it removes a startup taint).
    efs: bool,
    consolidate_after_seconds: i32,
}

/// A GPU NodePool: nodes expire after 30 days, empty nodes go after the given time (running
/// workers are never repacked).
fn pool(
    metadata: ObjectMeta,
    t: Template,
    limits: Option<BTreeMap<String, IntOrString>>,
) -> NodePool {
    let startup_taints = t.efs.then(|| {
        vec![NodePoolTemplateSpecStartupTaints {
            key: "efs.csi.aws.com/agent-not-ready".into(),
            effect: NodePoolTemplateSpecStartupTaintsEffect::NoExecute,
            time_added: None,
            value: None,
        }]
    });
    NodePool {
        metadata,
        spec: NodePoolSpec {
            template: NodePoolTemplate {
                metadata: Some(NodePoolTemplateMetadata {
                    labels: Some(t.node_labels),
                    annotations: None,
                }),
                spec: NodePoolTemplateSpec {
                    node_class_ref: t.node_class_ref,
                    requirements: t.requirements,
                    taints: Some(t.taints),
                    startup_taints,
                    expire_after: Some("720h".into()),
                    termination_grace_period: Some("1h".into()),
                },
            },
            disruption: Some(NodePoolDisruption {
                consolidation_policy: Some(NodePoolDisruptionConsolidationPolicy::WhenEmpty),
                consolidate_after: format!("{}s", t.consolidate_after_seconds),
                budgets: Some(vec![NodePoolDisruptionBudgets {
                    nodes: "100%".into(),
                    ..Default::default()
                }]),
            }),
            limits,
            replicas: None,
            weight: None,
        },
        status: None,
    }
}

/// The class's GPU node pool, shared by every processor of the class (cluster-scoped, owned by
/// the class, so it goes when the class goes). Its GPU limit is the class's budget.maxGPUs.
pub fn class_node_pool(p: &ValidatedProcessor, class: &Governed) -> NodePool {
    let k = class
        .spec
        .compute
        .karpenter
        .clone()
        .expect("a processor on a class pool has a karpenter class");
    let prefix = k.node_class_ref.label_prefix();
    let mut requirements = Vec::new();
    let mut add = |key: String, values: &[String]| {
        if !values.is_empty() {
            requirements.push(requirement(&key, values.to_vec()));
        }
    };
    add("node.kubernetes.io/instance-type".into(), &k.instance_types);
    add(format!("{prefix}/instance-family"), &k.instance_families);
    add(format!("{prefix}/instance-size"), &k.instance_sizes);
    add(
        "karpenter.sh/capacity-type".into(),
        &k.capacity_types
            .iter()
            .map(|c| c.as_str().to_string())
            .collect::<Vec<_>>(),
    );
    add(
        "kubernetes.io/arch".into(),
        &k.architectures
            .iter()
            .map(|a| a.as_str().to_string())
            .collect::<Vec<_>>(),
    );
    add("kubernetes.io/os".into(), &["linux".to_string()]);
    for r in &k.requirements {
        use crate::class::RequirementOperator as O;
        requirements.push(NodePoolTemplateSpecRequirements {
            key: r.key.clone(),
            operator: match r.operator {
                O::In => NodePoolTemplateSpecRequirementsOperator::In,
                O::NotIn => NodePoolTemplateSpecRequirementsOperator::NotIn,
                O::Exists => NodePoolTemplateSpecRequirementsOperator::Exists,
                O::DoesNotExist => NodePoolTemplateSpecRequirementsOperator::DoesNotExist,
                O::Gt => NodePoolTemplateSpecRequirementsOperator::Gt,
                O::Lt => NodePoolTemplateSpecRequirementsOperator::Lt,
            },
            values: (!r.values.is_empty()).then(|| r.values.clone()),
            min_values: None,
        });
    }
    let mut taints = vec![gpu_taint()];
    for t in &k.taints {
        use crate::class::TaintEffect as E;
        taints.push(NodePoolTemplateSpecTaints {
            key: t.key.clone(),
            value: t.value.clone(),
            effect: match t.effect {
                E::NoSchedule => NodePoolTemplateSpecTaintsEffect::NoSchedule,
                E::PreferNoSchedule => NodePoolTemplateSpecTaintsEffect::PreferNoSchedule,
                E::NoExecute => NodePoolTemplateSpecTaintsEffect::NoExecute,
            },
            time_added: None,
        });
    }
    let mut node_labels = k.labels.clone();
    node_labels.insert("nvidia.com/gpu.present".into(), "true".into());
    node_labels.insert(LABEL_CLASS.into(), class.name.clone());
    node_labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "clip-operator".into(),
    );
    let limits = class.spec.budget.max_gpus.map(|g| {
        BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            IntOrString::String(g.to_string()),
        )])
    });
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "clip-processor".to_string(),
        ),
        ("app.kubernetes.io/component".into(), "node-pool".into()),
        ("app.kubernetes.io/part-of".into(), "lakechain".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "clip-operator".into(),
        ),
        (LABEL_CLASS.into(), class.name.clone()),
    ]);
    let owner_references = class.uid.clone().map(|uid| {
        vec![OwnerReference {
            api_version: "lakechain.dev/v1alpha1".into(),
            kind: "ClipProcessorClass".into(),
            name: class.name.clone(),
            uid,
            controller: Some(true),
            block_owner_deletion: None,
        }]
    });
    pool(
        ObjectMeta {
            name: Some(names::node_pool(p)),
            labels: Some(labels),
            owner_references,
            ..Default::default()
        },
        Template {
            node_labels,
            node_class_ref: NodePoolTemplateSpecNodeClassRef {
                group: k.node_class_ref.group.clone(),
                kind: k.node_class_ref.kind.clone(),
                name: k.node_class_ref.name.clone(),
            },
            requirements,
            taints,
            efs: class
                .spec
                .model_cache
                .as_ref()
                .is_some_and(|c| c.efs.is_some()),
            consolidate_after_seconds: k.consolidate_after_seconds,
        },
        limits,
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::processor;
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_follow_max_instances() {
        let np = node_pool(&processor(json!({
            "scaling": {"maxInstances": 7},
            "compute": {"instanceTypes": ["g4dn.xlarge", "g5.2xlarge"], "gpusPerInstance": 1}
        })));
        let limits = np.spec.limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"], IntOrString::String("7".into()));
        assert_eq!(limits["cpu"], IntOrString::String("56".into()));
        assert_eq!(limits["memory"], IntOrString::String("224Gi".into()));
        let unknown = node_pool(&processor(
            json!({"compute": {"instanceTypes": ["x9z.huge"]}}),
        ));
        assert!(!unknown.spec.limits.unwrap().contains_key("cpu"));
    }

    #[test]
    fn a_gpu_pool_that_empties() {
        let p = processor(
            json!({"compute": {"capacityType": "spot", "nodePool": {"nodeClassName": "gpu"}}, "modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}}}),
        );
        let np = node_pool(&p);
        let t = &np.spec.template.spec;
        assert_eq!(t.node_class_ref.name, "gpu");
        let req = |k: &str| {
            t.requirements
                .iter()
                .find(|r| r.key == k)
                .unwrap()
                .values
                .clone()
                .unwrap()
        };
        assert_eq!(req("karpenter.sh/capacity-type"), ["spot"]);
        assert_eq!(req("kubernetes.io/arch"), ["amd64"]);
        assert_eq!(req("kubernetes.io/os"), ["linux"]);
        assert_eq!(req("node.kubernetes.io/instance-type"), ["g4dn.xlarge"]);
        assert_eq!(t.taints.as_ref().unwrap()[0].key, "nvidia.com/gpu");
        assert_eq!(
            t.startup_taints.as_ref().unwrap()[0].key,
            "efs.csi.aws.com/agent-not-ready"
        );
        let labels = np.spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["nvidia.com/gpu.present"], "true");
        let d = np.spec.disruption.unwrap();
        assert_eq!(
            d.consolidation_policy,
            Some(NodePoolDisruptionConsolidationPolicy::WhenEmpty)
        );
        assert_eq!(d.consolidate_after, "300s");
    }
}
