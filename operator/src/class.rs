//! The `ClipProcessorClass` API (`lakechain.dev/v1alpha1`, cluster-scoped): what a platform team
//! decides for every processor of a class, as StorageClass and GatewayClass do for theirs — the
//! nodes (a Karpenter node class and the instances it may start, existing nodes, or CPUs), the
//! budgets, the model cache's storage and the worker images and pod policy. A `ClipProcessor`
//! names its class in `spec.className`, or gets the default class (the
//! `lakechain.dev/is-default-class: "true"` annotation).
//!
//! This module is pure: [`select`] finds a processor's class, [`grant`] shares the class budget
//! among its processors, and [`govern`] applies the class to a validated processor (or says which
//! field the class does not allow).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{CapacityType, ClipProcessor, ComputeDevice, EfsCache, Provisioner};
use crate::reconcile::validate::{CacheMode, ValidatedProcessor};

/// The annotation that makes a class the default (the value must be "true"), as StorageClass's
/// `storageclass.kubernetes.io/is-default-class`.
pub const DEFAULT_CLASS_ANNOTATION: &str = "lakechain.dev/is-default-class";

/// Label on the class's NodePool (and its nodes) with the class name.
pub const LABEL_CLASS: &str = "lakechain.dev/class";

/// What the processors of a class may use, decided by the cluster's administrators.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lakechain.dev",
    version = "v1alpha1",
    kind = "ClipProcessorClass",
    plural = "clipprocessorclasses",
    shortname = "clipclass",
    category = "lakechain",
    derive = "PartialEq",
    cel,
    validation = Rule::new("size(self.metadata.name) <= 50").message("metadata.name must be at most 50 characters: it names the class's NodePool and labels"),
    doc = "A class of CLIP processors, owned by the cluster's administrators: the nodes the workers run on (a Karpenter node class and the instances it may start, existing nodes, or CPUs), the GPUs and CPU workers all processors of the class may use together and per namespace, the model cache's storage, and the worker images and pod policy. A ClipProcessor names it in spec.className; the class annotated lakechain.dev/is-default-class: \"true\" serves processors that name none.",
    printcolumn = r#"{"name":"Device","type":"string","jsonPath":".spec.compute.device"}"#,
    printcolumn = r#"{"name":"NodeClass","type":"string","jsonPath":".spec.compute.karpenter.nodeClassRef.name"}"#,
    printcolumn = r#"{"name":"Max-GPUs","type":"integer","jsonPath":".spec.budget.maxGPUs"}"#,
    printcolumn = r#"{"name":"Per-Namespace","type":"integer","jsonPath":".spec.budget.maxGPUsPerNamespace"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClipProcessorClassSpec {
    /// The workers' nodes.
    pub compute: ClassCompute,
    /// What all processors of the class may use together, and per namespace. Unset: no limit.
    #[serde(default)]
    pub budget: Budget,
    /// The model cache every processor of the class mounts (unless it names its own claim).
    /// Unset: the processor's own choice (a claim in its namespace, or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_cache: Option<ClassModelCache>,
    /// Worker images, defaults and pod policy.
    #[serde(default)]
    pub worker: ClassWorker,
}

/// Where the class's workers run: GPUs from a Karpenter pool (`karpenter`), GPUs on existing
/// nodes (`nodes`), or CPUs (`device: cpu`, optionally on the nodes `nodes` selects).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.device == 'cpu' ? !has(self.karpenter) : [has(self.karpenter), has(self.nodes)].exists_one(x, x)").message("compute: a gpu class sets exactly one of karpenter or nodes; a cpu class sets no karpenter"))]
pub struct ClassCompute {
    /// gpu (default) or cpu.
    #[serde(default)]
    pub device: ComputeDevice,
    /// One Karpenter NodePool for the whole class, owned by the class; its GPU limit is
    /// budget.maxGPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub karpenter: Option<ClassKarpenter>,
    /// Existing nodes: the labels they carry and the tolerations for their taints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<ClassNodes>,
}

/// The class's Karpenter NodePool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassKarpenter {
    /// The node class: an EC2NodeClass (karpenter.k8s.aws, default) or EKS Auto Mode's NodeClass
    /// (eks.amazonaws.com).
    pub node_class_ref: NodeClassRef,
    /// Instance types allowed (node.kubernetes.io/instance-type), e.g. g5.xlarge. Unset: any
    /// the other requirements allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 32)))]
    pub instance_types: Vec<String>,
    /// Instance families allowed (instance-family label of the node class's provider), e.g. g5, g6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 16)))]
    pub instance_families: Vec<String>,
    /// Instance sizes allowed (instance-size label), e.g. xlarge, 2xlarge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 16)))]
    pub instance_sizes: Vec<String>,
    /// Capacity types allowed. Default: on-demand.
    #[serde(default = "default_capacity_types")]
    #[schemars(length(min = 1, max = 2))]
    pub capacity_types: Vec<CapacityType>,
    /// CPU architectures allowed (kubernetes.io/arch). Default: amd64.
    #[serde(default = "default_architectures")]
    #[schemars(length(min = 1, max = 2))]
    pub architectures: Vec<Architecture>,
    /// Further requirements on the nodes (Karpenter's requirement grammar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub requirements: Vec<Requirement>,
    /// Labels on the pool's nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Taints on the pool's nodes (besides nvidia.com/gpu); the workers tolerate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub taints: Vec<ClassTaint>,
    /// Seconds a node stays empty before Karpenter removes it. Default: 300.
    #[serde(default = "default_consolidate_after")]
    #[schemars(range(min = 0, max = 86400))]
    pub consolidate_after_seconds: i32,
}

fn default_capacity_types() -> Vec<CapacityType> {
    vec![CapacityType::OnDemand]
}
fn default_architectures() -> Vec<Architecture> {
    vec![Architecture::Amd64]
}
fn default_consolidate_after() -> i32 {
    300
}

/// A Karpenter node class.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.group == 'karpenter.k8s.aws' && self.kind == 'EC2NodeClass') || (self.group == 'eks.amazonaws.com' && self.kind == 'NodeClass')").message("compute.karpenter.nodeClassRef must be an EC2NodeClass (karpenter.k8s.aws) or an EKS Auto Mode NodeClass (eks.amazonaws.com)"))]
pub struct NodeClassRef {
    /// karpenter.k8s.aws (default) or eks.amazonaws.com.
    #[serde(default = "default_node_class_group")]
    #[schemars(length(max = 64))]
    pub group: String,
    /// EC2NodeClass (default) or NodeClass.
    #[serde(default = "default_node_class_kind")]
    #[schemars(length(max = 64))]
    pub kind: String,
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_node_class_group() -> String {
    "karpenter.k8s.aws".into()
}
fn default_node_class_kind() -> String {
    "EC2NodeClass".into()
}

impl NodeClassRef {
    /// The prefix of the provider's instance labels (instance-family, instance-size).
    pub fn label_prefix(&self) -> &'static str {
        if self.group == "eks.amazonaws.com" {
            "eks.amazonaws.com"
        } else {
            "karpenter.k8s.aws"
        }
    }
}

/// A CPU architecture.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Amd64,
    Arm64,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Amd64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }
}

/// A node requirement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requirement {
    /// The node label.
    #[schemars(length(min = 1, max = 316))]
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist, Gt or Lt.
    pub operator: RequirementOperator,
    /// The values (none for Exists and DoesNotExist; one integer for Gt and Lt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub values: Vec<String>,
}

/// A requirement's operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RequirementOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

/// A taint of the class's nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassTaint {
    #[schemars(length(min = 1, max = 316))]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    pub effect: TaintEffect,
}

/// A taint's effect.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// Existing nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassNodes {
    /// Labels the workers' nodes carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for those nodes' taints (GPU workers always tolerate nvidia.com/gpu).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
}

/// Budgets. A processor asks for scaling.maxInstances × compute.gpusPerInstance GPUs (or
/// maxInstances CPU workers); budgets are granted in the processors' creation order, and one
/// that does not fit runs with the workers that do (possibly none), Degraded with the reason
/// ClassBudgetExceeded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// GPUs all processors of the class may use together (also the NodePool's nvidia.com/gpu
    /// limit).
    #[serde(default, rename = "maxGPUs", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_gpus: Option<i32>,
    /// GPUs the processors of one namespace may use together.
    #[serde(
        default,
        rename = "maxGPUsPerNamespace",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0, max = 100000))]
    pub max_gpus_per_namespace: Option<i32>,
    /// CPU workers all processors of a cpu class may run together.
    #[serde(
        default,
        rename = "maxCPUWorkers",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0, max = 100000))]
    pub max_cpu_workers: Option<i32>,
    /// CPU workers the processors of one namespace may run together.
    #[serde(
        default,
        rename = "maxCPUWorkersPerNamespace",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0, max = 100000))]
    pub max_cpu_workers_per_namespace: Option<i32>,
}

/// The class's model cache: an EFS file system (a static volume per processor, all on the one
/// file system, so each model is downloaded once for the class) or a StorageClass that
/// provisions a ReadWriteMany claim per processor (EFS CSI's efs-ap access points).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.efs), has(self.storageClassName)].exists_one(x, x)").message("modelCache: set exactly one of efs or storageClassName"))]
pub struct ClassModelCache {
    /// An EFS file system (and access point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efs: Option<EfsCache>,
    /// A StorageClass that provisions ReadWriteMany volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Size of each dynamically provisioned claim. Default: 10Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
}

/// Worker images, defaults and pod policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxResources) || self.maxResources.all(n, isQuantity(string(self.maxResources[n])))").message("worker.maxResources: every value must be a quantity (e.g. 8, 500m, 32Gi)"))]
#[x_kube(validation = Rule::new("!has(self.resources) || !has(self.maxResources) || self.maxResources.all(n, (!has(self.resources.requests) || !(n in self.resources.requests) || quantity(string(self.resources.requests[n])).compareTo(quantity(string(self.maxResources[n]))) <= 0) && (!has(self.resources.limits) || !(n in self.resources.limits) || quantity(string(self.resources.limits[n])).compareTo(quantity(string(self.maxResources[n]))) <= 0))").message("worker.resources: the class's default requests and limits must not exceed worker.maxResources"))]
pub struct ClassWorker {
    /// Image prefixes a processor's worker image must start with (e.g.
    /// 123456789012.dkr.ecr.us-east-1.amazonaws.com/clip-worker: or registry.example.com/ml/).
    /// Unset: any image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub allowed_images: Vec<String>,
    /// Worker image of the processors that name none (default: the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Container resources of the processors that set none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = bounded_resource_maps)]
    pub resources: Option<ResourceRequirements>,
    /// The most one worker container may request or be limited to, per resource (cpu, memory,
    /// ephemeral-storage, nvidia.com/gpu, ...), as a LimitRange's max: a processor asking for
    /// more is refused, and an unset cpu, memory or ephemeral-storage limit becomes this
    /// maximum, so no worker of the class is unbounded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = bounded_quantities)]
    pub max_resources: BTreeMap<String, Quantity>,
    /// PriorityClass of every worker and cache-warm pod; a processor may not pick another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Tolerations added to every worker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Topology spread added to every worker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

/// Why a processor's class cannot serve it. `reason` is the Degraded condition's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn policy(message: String) -> Self {
        Refusal {
            reason: "ClassPolicy",
            message,
        }
    }
}

/// The most resources a worker map names, and the longest quantity: bounds that let the API
/// server's CEL cost estimate accept the rules comparing the class's defaults with its maximum.
const MAX_RESOURCE_NAMES: u64 = 16;
const MAX_QUANTITY_LENGTH: u64 = 64;

/// Bounds a `resource name -> quantity` map schema (see [`MAX_RESOURCE_NAMES`]).
fn bound_quantity_map(map: &mut serde_json::Map<String, serde_json::Value>) {
    map.insert("maxProperties".into(), MAX_RESOURCE_NAMES.into());
    if let Some(values) = map
        .get_mut("additionalProperties")
        .and_then(|v| v.as_object_mut())
    {
        values.insert("maxLength".into(), MAX_QUANTITY_LENGTH.into());
    }
}

/// `worker.maxResources`' schema, bounded.
fn bounded_quantities(schema: &mut schemars::Schema) {
    if let Some(map) = schema.as_object_mut() {
        bound_quantity_map(map);
    }
}

/// ResourceRequirements' schema with its requests and limits bounded.
fn bounded_resource_maps(schema: &mut schemars::Schema) {
    for map in ["requests", "limits"] {
        if let Some(m) = schema
            .get_mut("properties")
            .and_then(|p| p.get_mut(map))
            .and_then(|m| m.as_object_mut())
        {
            bound_quantity_map(m);
        }
    }
}

/// Resources whose unset limit becomes the class maximum. Extended resources (GPUs) are only
/// checked: a CPU worker must not be given a GPU limit.
const BOUNDED_WHEN_UNSET: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// The worker container's resources `r` (what it would run with) held to the class's `max`, as
/// a LimitRange's max is: every request and limit at most the maximum, and an unset cpu, memory
/// or ephemeral-storage limit set to it. Each violation is named, with the value and the limit.
fn bound_resources(
    mut r: ResourceRequirements,
    max: &BTreeMap<String, Quantity>,
    class: &str,
) -> Result<ResourceRequirements, Vec<String>> {
    use kube_quantity::ParsedQuantity;
    let parse = |field: &str, q: &Quantity| {
        ParsedQuantity::try_from(q).map_err(|e| format!("{field} {:?} is not a quantity: {e}", q.0))
    };
    let mut over = Vec::new();
    for (resource, most) in max {
        let most_parsed = match parse(&format!("class worker.maxResources.{resource}"), most) {
            Ok(q) => q,
            Err(e) => {
                over.push(e);
                continue;
            }
        };
        for (kind, values) in [("requests", &r.requests), ("limits", &r.limits)] {
            let Some(value) = values.as_ref().and_then(|m| m.get(resource)) else {
                continue;
            };
            let field = format!("worker.resources.{kind}.{resource}");
            match parse(&field, value) {
                Ok(v) if v > most_parsed => over.push(format!(
                    "{field} is {}, more than ClipProcessorClass {class:?} allows (worker.maxResources.{resource}: {})",
                    value.0, most.0
                )),
                Ok(_) => {}
                Err(e) => over.push(e),
            }
        }
        if BOUNDED_WHEN_UNSET.contains(&resource.as_str()) {
            r.limits
                .get_or_insert_with(BTreeMap::new)
                .entry(resource.clone())
                .or_insert_with(|| most.clone());
        }
    }
    if over.is_empty() { Ok(r) } else { Err(over) }
}

/// Whether `class` carries the default-class annotation.
pub fn is_default(class: &ClipProcessorClass) -> bool {
    class
        .annotations()
        .get(DEFAULT_CLASS_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// The class a processor belongs to: the one it names, else the default class (the oldest if
/// several are marked, as the API server does for StorageClasses), else none — which
/// `require_class` refuses.
pub fn select<'a>(
    cp: &ClipProcessor,
    classes: &'a [ClipProcessorClass],
    require_class: bool,
) -> Result<Option<&'a ClipProcessorClass>, Refusal> {
    match &cp.spec.class_name {
        Some(name) => classes
            .iter()
            .find(|c| c.name_any() == *name)
            .map(Some)
            .ok_or_else(|| Refusal {
                reason: "ClassNotFound",
                message: format!(
                    "spec.className names ClipProcessorClass {name:?}, which does not exist"
                ),
            }),
        None => {
            let default = classes
                .iter()
                .filter(|c| is_default(c))
                .min_by_key(|c| (c.creation_timestamp().map(|t| t.0), c.name_any()));
            match default {
                Some(c) => Ok(Some(c)),
                None if require_class => Err(Refusal {
                    reason: "ClassRequired",
                    message: format!(
                        "spec.className is unset and no ClipProcessorClass is the default ({DEFAULT_CLASS_ANNOTATION}: \"true\"): this operator serves processors of a class only"
                    ),
                }),
                None => Ok(None),
            }
        }
    }
}

/// The name of the class `cp` belongs to, if any (for grouping processors by class).
pub fn class_of(cp: &ClipProcessor, classes: &[ClipProcessorClass]) -> Option<String> {
    select(cp, classes, false)
        .ok()
        .flatten()
        .map(ResourceExt::name_any)
}

/// What a processor asks of its class budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub namespace: String,
    pub name: String,
    /// (creationTimestamp, namespace, name): the order budgets are granted in.
    pub order: (Option<i64>, String, String),
    /// GPUs (gpu class) or 1 (cpu class) per worker.
    pub per_worker: i64,
    pub max_instances: i32,
    pub suspended: bool,
}

impl Ask {
    pub fn of(cp: &ClipProcessor, class: &ClipProcessorClass) -> Self {
        let ns = cp.namespace().unwrap_or_else(|| "default".into());
        Ask {
            order: (
                cp.creation_timestamp().map(|t| t.0.as_millisecond()),
                ns.clone(),
                cp.name_any(),
            ),
            namespace: ns,
            name: cp.name_any(),
            per_worker: match class.spec.compute.device {
                ComputeDevice::Gpu => i64::from(cp.spec.compute.gpus_per_instance),
                ComputeDevice::Cpu => 1,
            },
            max_instances: cp.spec.scaling.max_instances,
            // Being deleted: its budget is free for the others now.
            suspended: cp.spec.suspend || cp.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// The budget granted to one processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The most workers it may run (≤ its scaling.maxInstances).
    pub max_workers: i32,
    /// Why it gets fewer than it asks for, naming the limit; None when it gets all.
    pub shortfall: Option<String>,
}

/// Shares the class budget among `asks` (every processor of the class, `me` among them) in
/// creation order, and returns `me`'s share. Suspended processors, and those being deleted,
/// hold nothing.
pub fn grant(class: &ClipProcessorClass, asks: &[Ask], me: &Ask) -> Grant {
    let b = &class.spec.budget;
    let (total, per_ns, unit) = match class.spec.compute.device {
        ComputeDevice::Gpu => (b.max_gpus, b.max_gpus_per_namespace, "GPUs"),
        ComputeDevice::Cpu => (
            b.max_cpu_workers,
            b.max_cpu_workers_per_namespace,
            "CPU workers",
        ),
    };
    let (total_field, ns_field) = match class.spec.compute.device {
        ComputeDevice::Gpu => ("budget.maxGPUs", "budget.maxGPUsPerNamespace"),
        ComputeDevice::Cpu => ("budget.maxCPUWorkers", "budget.maxCPUWorkersPerNamespace"),
    };
    let mut ordered: Vec<&Ask> = asks
        .iter()
        .filter(|a| (a.namespace.as_str(), a.name.as_str()) != (&me.namespace, &me.name))
        .chain(std::iter::once(me))
        .collect();
    ordered.sort_by(|a, b| a.order.cmp(&b.order));
    let mut used_total: i64 = 0;
    let mut used_ns: BTreeMap<&str, i64> = BTreeMap::new();
    for a in ordered {
        let wanted = if a.suspended {
            0
        } else {
            i64::from(a.max_instances)
        };
        let per = a.per_worker.max(1);
        let ns_used = used_ns.get(a.namespace.as_str()).copied().unwrap_or(0);
        let mut workers = wanted;
        let mut limited_by = None;
        if let Some(t) = total {
            let fit = (i64::from(t) - used_total).max(0) / per;
            if fit < workers {
                workers = fit;
                limited_by = Some((total_field, t, used_total, "the class's processors"));
            }
        }
        if let Some(n) = per_ns {
            let fit = (i64::from(n) - ns_used).max(0) / per;
            if fit < workers {
                workers = fit;
                limited_by = Some((ns_field, n, ns_used, "this namespace's processors"));
            }
        }
        used_total += workers * per;
        *used_ns.entry(a.namespace.as_str()).or_default() += workers * per;
        if std::ptr::eq(a, me) {
            let shortfall = limited_by.map(|(field, limit, used, whose)| {
                let name = class.name_any();
                let granted = if workers == 0 {
                    "so no workers run until some are freed".to_string()
                } else {
                    format!("so at most {workers} workers run")
                };
                format!(
                    "ClipProcessorClass {name:?} {field} is {limit} {unit}: {whose} created earlier hold {used}, and this one asks for {} ({} workers × {per}); {granted}",
                    wanted * per,
                    wanted
                )
            });
            return Grant {
                max_workers: i32::try_from(workers).unwrap_or(i32::MAX),
                shortfall,
            };
        }
    }
    unreachable!("`me` is in the list")
}

/// The class a processor runs under, as its builders need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Governed {
    pub name: String,
    pub uid: Option<String>,
    pub spec: ClipProcessorClassSpec,
    /// Why the processor runs fewer workers than it asks for.
    pub shortfall: Option<String>,
    /// Workers granted (0: held at zero, like suspend).
    pub max_workers: i32,
}

impl Governed {
    /// The class's NodePool name (cluster-scoped, one per class).
    pub fn node_pool(&self) -> String {
        format!("clip-class-{}", self.name)
    }
}

/// Applies `class` to a validated processor: the class's nodes, cache, image and pod policy
/// replace the processor's, its budget bounds the processor's workers. A field the processor
/// may not set under a class is refused by name. The old fields' former defaults (what the API
/// server wrote into every processor before classes existed) are not refused: they are ignored.
pub fn govern(
    mut p: ValidatedProcessor,
    class: &ClipProcessorClass,
    grant: Grant,
) -> Result<ValidatedProcessor, Refusal> {
    let name = class.name_any();
    let cs = &class.spec;
    let c = &p.spec.compute;
    let mut refused = Vec::new();
    let owns = |field: &str| {
        format!("{field} is chosen by ClipProcessorClass {name:?}: remove it from the processor")
    };
    if c.device == ComputeDevice::Cpu && cs.compute.device == ComputeDevice::Gpu {
        refused.push(format!(
            "compute.device: cpu does not fit ClipProcessorClass {name:?}, a gpu class: name a cpu class"
        ));
    }
    if c.instance_types != ["g4dn.xlarge"] {
        refused.push(owns("compute.instanceTypes"));
    }
    if c.capacity_type != CapacityType::OnDemand {
        refused.push(owns("compute.capacityType"));
    }
    if c.node_pool != crate::crd::NodePoolSpec::default() {
        refused.push(owns("compute.nodePool"));
    }
    if !c.node_selector.is_empty() || !c.tolerations.is_empty() {
        refused.push(owns("compute.nodeSelector and compute.tolerations"));
    }
    if p.spec.model_cache.efs.is_some() {
        refused.push(format!(
            "modelCache.efs: the file systems are ClipProcessorClass {name:?}'s to choose; remove it (or name a claim of this namespace in modelCache.claimName)"
        ));
    }
    let image = match (&p.spec.worker.image, &cs.worker.image) {
        (Some(own), _) => own.clone(),
        (None, Some(class_image)) => class_image.clone(),
        (None, None) => p.image.clone(),
    };
    if !cs.worker.allowed_images.is_empty()
        && !cs
            .worker
            .allowed_images
            .iter()
            .any(|prefix| image.starts_with(prefix.as_str()))
    {
        refused.push(format!(
            "worker image {image:?} is not allowed by ClipProcessorClass {name:?} (worker.allowedImages: {})",
            cs.worker.allowed_images.join(", ")
        ));
    }
    if let (Some(own), Some(class_pc)) = (
        &p.spec.worker.priority_class_name,
        &cs.worker.priority_class_name,
    ) && own != class_pc
    {
        refused.push(format!(
            "worker.priorityClassName {own:?} is not ClipProcessorClass {name:?}'s ({class_pc:?}): remove it"
        ));
    }
    if !refused.is_empty() {
        return Err(Refusal::policy(refused.join("; ")));
    }

    // The class's choices.
    p.image = image;
    p.device = cs.compute.device;
    let spec = &mut p.spec;
    spec.compute.device = cs.compute.device;
    let mut tolerations = Vec::new();
    match (&cs.compute.karpenter, &cs.compute.nodes) {
        (Some(k), _) if cs.compute.device == ComputeDevice::Gpu => {
            p.provisioner = Provisioner::Karpenter;
            for t in &k.taints {
                tolerations.push(Toleration {
                    key: Some(t.key.clone()),
                    operator: Some(if t.value.is_some() { "Equal" } else { "Exists" }.into()),
                    value: t.value.clone(),
                    effect: Some(t.effect.as_str().into()),
                    ..Default::default()
                });
            }
        }
        (_, nodes) => {
            p.provisioner = Provisioner::None;
            let nodes = nodes.clone().unwrap_or_default();
            spec.compute.node_selector = nodes.node_selector;
            spec.compute.tolerations = nodes.tolerations;
        }
    }
    tolerations.extend(cs.worker.tolerations.iter().cloned());
    spec.worker.tolerations.extend(tolerations);
    spec.worker
        .topology_spread_constraints
        .extend(cs.worker.topology_spread_constraints.iter().cloned());
    let defaulted = spec.worker.resources.is_none() && cs.worker.resources.is_none();
    if spec.worker.resources.is_none() {
        spec.worker.resources = cs.worker.resources.clone();
    }
    if cs.worker.priority_class_name.is_some() {
        spec.worker.priority_class_name = cs.worker.priority_class_name.clone();
    }
    if !cs.worker.max_resources.is_empty() {
        let bounded = bound_resources(
            crate::reconcile::build::worker_resources(&p),
            &cs.worker.max_resources,
            &name,
        )
        .map_err(|over| {
            let whose = if defaulted {
                " (the operator's defaults, as neither the processor nor the class sets worker.resources)"
            } else {
                ""
            };
            Refusal::policy(format!("{}{whose}", over.join("; ")))
        })?;
        p.spec.worker.resources = Some(bounded);
    }
    let spec = &mut p.spec;
    if let (Some(cache), CacheMode::EmptyDir) = (&cs.model_cache, &p.cache) {
        p.cache = match (&cache.efs, &cache.storage_class_name) {
            (Some(efs), _) => CacheMode::Efs {
                file_system_id: efs.file_system_id.clone(),
                access_point_id: efs.access_point_id.clone(),
            },
            (None, Some(sc)) => CacheMode::Dynamic {
                storage_class: sc.clone(),
                size: cache
                    .size
                    .clone()
                    .map(|q| q.0)
                    .unwrap_or_else(|| "10Gi".into()),
            },
            (None, None) => CacheMode::EmptyDir,
        };
    }
    // The budget: at most the granted workers (min too, so min <= max holds).
    let s = &mut spec.scaling;
    let granted = grant.max_workers.min(s.max_instances);
    if granted > 0 {
        s.max_instances = granted;
        s.min_instances = s.min_instances.min(granted);
        if let Some(f) = s.fallback.as_mut() {
            f.replicas = f.replicas.min(granted);
        }
    }
    p.class = Some(Governed {
        name,
        uid: class.uid(),
        spec: cs.clone(),
        shortfall: grant.shortfall,
        max_workers: granted,
    });
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::build;
    use crate::reconcile::validate::{OperatorSettings, validate};
    use serde_json::{Value, json};

    fn class(name: &str, spec: Value) -> ClipProcessorClass {
        let mut c: ClipProcessorClass = serde_json::from_value(json!({
            "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessorClass",
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "spec": spec
        }))
        .unwrap();
        c.metadata.creation_timestamp = None;
        c
    }

    fn gpu_class(name: &str) -> ClipProcessorClass {
        class(
            name,
            json!({
                "compute": {"karpenter": {
                    "nodeClassRef": {"name": "gpu"},
                    "instanceFamilies": ["g5", "g6"],
                    "capacityTypes": ["spot", "on-demand"],
                    "taints": [{"key": "team", "value": "ml", "effect": "NoSchedule"}],
                    "labels": {"cost-center": "ml"}
                }},
                "budget": {"maxGPUs": 8, "maxGPUsPerNamespace": 4},
                "modelCache": {"efs": {"fileSystemId": "fs-0123456789abcdef0"}},
                "worker": {
                    "allowedImages": ["registry.example.com/ml/"],
                    "image": "registry.example.com/ml/clip-worker:1",
                    "priorityClassName": "ml-batch"
                }
            }),
        )
    }

    fn processor(ns: &str, name: &str, created: i64, spec: Value) -> ClipProcessor {
        let mut base = json!({
            "apiVersion": "lakechain.dev/v1alpha1", "kind": "ClipProcessor",
            "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}-{name}"),
                         "creationTimestamp": format!("2026-01-01T00:00:{created:02}Z")},
            "spec": {
                "source": {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/clip-input"},
                "output": {"topicArn": "arn:aws:sns:eu-west-1:123456789012:clip-output"},
                "cacheStorage": {"bucket": "lakechain-cache"}
            }
        });
        for (k, v) in spec.as_object().unwrap() {
            base["spec"][k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    /// Validates and governs `cp` among `all` (its peers), as reconcile does.
    fn governed(
        cp: &ClipProcessor,
        all: &[ClipProcessor],
        classes: &[ClipProcessorClass],
    ) -> Result<ValidatedProcessor, Refusal> {
        let p = validate(cp, &OperatorSettings::default()).unwrap();
        let Some(c) = select(cp, classes, false)? else {
            return Ok(p);
        };
        let asks: Vec<Ask> = all
            .iter()
            .filter(|x| class_of(x, classes).as_deref() == Some(c.name_any().as_str()))
            .map(|x| Ask::of(x, c))
            .collect();
        govern(p, c, grant(c, &asks, &Ask::of(cp, c)))
    }

    #[test]
    fn the_named_class_else_the_default_else_none() {
        let mut default = gpu_class("shared");
        default
            .annotations_mut()
            .insert(DEFAULT_CLASS_ANNOTATION.into(), "true".into());
        let classes = [gpu_class("ml"), default];
        let named = processor("a", "p", 1, json!({"className": "ml"}));
        assert_eq!(class_of(&named, &classes).as_deref(), Some("ml"));
        let unnamed = processor("a", "p", 1, json!({}));
        assert_eq!(class_of(&unnamed, &classes).as_deref(), Some("shared"));
        let missing = processor("a", "p", 1, json!({"className": "gone"}));
        let e = select(&missing, &classes, false).unwrap_err();
        assert_eq!(e.reason, "ClassNotFound");
        assert!(
            e.message.contains("\"gone\", which does not exist"),
            "{e:?}"
        );
        let no_default = [gpu_class("ml")];
        assert!(select(&unnamed, &no_default, false).unwrap().is_none());
        let e = select(&unnamed, &no_default, true).unwrap_err();
        assert_eq!(e.reason, "ClassRequired");
    }

    #[test]
    fn a_budget_is_shared_in_creation_order_and_names_its_limit() {
        let classes = [gpu_class("ml")];
        // 3 + 3 GPUs in namespace a, then 4 in b: a's second gets only 1 (per-namespace 4),
        // b's gets 4 (8 - 4 used).
        let a1 = processor(
            "a",
            "first",
            1,
            json!({"className": "ml", "scaling": {"maxInstances": 3}}),
        );
        let a2 = processor(
            "a",
            "second",
            2,
            json!({"className": "ml", "scaling": {"maxInstances": 3, "minInstances": 2}}),
        );
        let b1 = processor(
            "b",
            "third",
            3,
            json!({"className": "ml", "scaling": {"maxInstances": 2}, "compute": {"gpusPerInstance": 2}}),
        );
        let c1 = processor(
            "c",
            "fourth",
            4,
            json!({"className": "ml", "scaling": {"maxInstances": 2}}),
        );
        let all = [a1.clone(), a2.clone(), b1.clone(), c1.clone()];
        let first = governed(&a1, &all, &classes).unwrap();
        assert_eq!(first.spec.scaling.max_instances, 3);
        assert!(first.class.as_ref().unwrap().shortfall.is_none());
        let second = governed(&a2, &all, &classes).unwrap();
        assert_eq!(
            (
                second.spec.scaling.max_instances,
                second.spec.scaling.min_instances
            ),
            (1, 1),
            "min follows the granted max"
        );
        let why = second.class.unwrap().shortfall.unwrap();
        assert!(
            why.contains("budget.maxGPUsPerNamespace is 4 GPUs: this namespace's processors created earlier hold 3, and this one asks for 3"),
            "{why}"
        );
        let third = governed(&b1, &all, &classes).unwrap();
        assert_eq!(third.spec.scaling.max_instances, 2, "2 workers × 2 GPUs");
        let fourth = governed(&c1, &all, &classes).unwrap();
        assert!(fourth.held(), "8 GPUs are taken: no workers");
        let why = fourth.class.unwrap().shortfall.unwrap();
        assert!(
            why.contains("budget.maxGPUs is 8 GPUs") && why.contains("no workers run"),
            "{why}"
        );
        // Suspend the first: its GPUs go to the others.
        let a1s = processor(
            "a",
            "first",
            1,
            json!({"className": "ml", "suspend": true, "scaling": {"maxInstances": 3}}),
        );
        let all = [a1s, a2.clone(), b1, c1.clone()];
        assert_eq!(
            governed(&a2, &all, &classes)
                .unwrap()
                .spec
                .scaling
                .max_instances,
            3
        );
        assert_eq!(
            governed(&c1, &all, &classes)
                .unwrap()
                .spec
                .scaling
                .max_instances,
            1
        );
    }

    #[test]
    fn a_tenant_cannot_pick_what_the_class_owns() {
        let classes = [gpu_class("ml")];
        let refused = |spec: Value| {
            let mut spec = spec;
            spec["className"] = json!("ml");
            let cp = processor("a", "p", 1, spec);
            governed(&cp, std::slice::from_ref(&cp), &classes).unwrap_err()
        };
        let e = refused(json!({"compute": {"instanceTypes": ["p5.48xlarge"]}}));
        assert_eq!(e.reason, "ClassPolicy");
        assert!(
            e.message
                .contains("compute.instanceTypes is chosen by ClipProcessorClass \"ml\""),
            "{e:?}"
        );
        let e = refused(json!({"compute": {"nodePool": {"nodeClassName": "admin"}}}));
        assert!(e.message.contains("compute.nodePool"), "{e:?}");
        let e = refused(
            json!({"modelCache": {"none": null, "efs": {"fileSystemId": "fs-0000000000000000f"}}}),
        );
        assert!(e.message.contains("modelCache.efs"), "{e:?}");
        let e = refused(json!({"worker": {"image": "docker.io/evil/miner:1"}}));
        assert!(
            e.message.contains("worker image \"docker.io/evil/miner:1\" is not allowed by ClipProcessorClass \"ml\" (worker.allowedImages: registry.example.com/ml/)"),
            "{e:?}"
        );
        let e = refused(json!({"worker": {"priorityClassName": "system-node-critical"}}));
        assert!(e.message.contains("worker.priorityClassName"), "{e:?}");
        let e = refused(json!({"compute": {"device": "cpu"}}));
        assert!(e.message.contains("a gpu class"), "{e:?}");
        // The former defaults, persisted in every older processor, are not refused.
        let old = processor(
            "a",
            "p",
            1,
            json!({"className": "ml", "compute": {"instanceTypes": ["g4dn.xlarge"], "capacityType": "on-demand", "nodePool": {"provisioner": "karpenter", "nodeClassName": "default"}}, "modelCache": {"none": true}}),
        );
        assert!(governed(&old, std::slice::from_ref(&old), &classes).is_ok());
    }

    #[test]
    fn a_worker_gets_no_more_than_the_class_maximum() {
        let mut c = gpu_class("ml");
        c.spec.worker.max_resources = BTreeMap::from([
            ("cpu".into(), Quantity("4".into())),
            ("memory".into(), Quantity("16Gi".into())),
            ("nvidia.com/gpu".into(), Quantity("2".into())),
        ]);
        let classes = [c];
        let run = |spec: Value| {
            let mut spec = spec;
            spec["className"] = json!("ml");
            let cp = processor("a", "p", 1, spec);
            governed(&cp, std::slice::from_ref(&cp), &classes)
        };
        let container = |p: &ValidatedProcessor| {
            build::deployment(p)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .resources
                .clone()
                .unwrap()
        };
        // Within the maximum (in other units): kept, and the unset cpu limit becomes the max.
        let p = run(json!({"worker": {"resources": {
            "requests": {"cpu": "1500m", "memory": "12Gi"},
            "limits": {"memory": "16384Mi"}
        }}}))
        .unwrap();
        let r = container(&p);
        let limits = r.limits.unwrap();
        assert_eq!(limits["memory"].0, "16384Mi");
        assert_eq!(limits["cpu"].0, "4");
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
        assert_eq!(r.requests.unwrap()["cpu"].0, "1500m");
        // Beyond it: refused, naming each field, its value and the class maximum.
        let e = run(json!({"worker": {"resources": {
            "requests": {"cpu": "6", "memory": "8Gi"},
            "limits": {"memory": "17Gi"}
        }}}))
        .unwrap_err();
        assert_eq!(e.reason, "ClassPolicy");
        assert!(
            e.message.contains("worker.resources.requests.cpu is 6, more than ClipProcessorClass \"ml\" allows (worker.maxResources.cpu: 4)"),
            "{e:?}"
        );
        assert!(
            e.message
                .contains("worker.resources.limits.memory is 17Gi, more than"),
            "{e:?}"
        );
        assert!(!e.message.contains("operator's defaults"), "{e:?}");
        // GPUs per worker come from compute.gpusPerInstance, held to the same maximum.
        let e = run(json!({"compute": {"gpusPerInstance": 4}})).unwrap_err();
        assert!(
            e.message
                .contains("worker.resources.limits.nvidia.com/gpu is 4"),
            "{e:?}"
        );
        // The operator's own defaults (14Gi limit) are held to it too, and the message says so.
        let mut tight = gpu_class("ml");
        tight.spec.worker.max_resources =
            BTreeMap::from([("memory".into(), Quantity("8Gi".into()))]);
        let cp = processor("a", "p", 1, json!({"className": "ml"}));
        let e = governed(&cp, std::slice::from_ref(&cp), &[tight.clone()]).unwrap_err();
        assert!(e.message.contains("limits.memory is 14Gi"), "{e:?}");
        assert!(e.message.contains("the operator's defaults"), "{e:?}");
        // A class default within the maximum serves the processors that set nothing.
        tight.spec.worker.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("memory".into(), Quantity("6Gi".into()))])),
            ..Default::default()
        });
        let p = governed(&cp, std::slice::from_ref(&cp), &[tight.clone()]).unwrap();
        assert_eq!(container(&p).limits.unwrap()["memory"].0, "8Gi");
        // An unparsable quantity is named, never a panic.
        let e = run(json!({"worker": {"resources": {"limits": {"cpu": "lots"}}}})).unwrap_err();
        assert!(
            e.message
                .contains("worker.resources.limits.cpu \"lots\" is not a quantity"),
            "{e:?}"
        );
        // A CPU class's maximum on GPUs gives a CPU worker no GPU limit.
        let mut cpu = class("cpu", json!({"compute": {"device": "cpu"}}));
        cpu.spec.worker.max_resources =
            BTreeMap::from([("nvidia.com/gpu".into(), Quantity("1".into()))]);
        let cp = processor("a", "p", 1, json!({"className": "cpu"}));
        let p = governed(&cp, std::slice::from_ref(&cp), &[cpu]).unwrap();
        assert!(
            !container(&p)
                .limits
                .unwrap_or_default()
                .contains_key("nvidia.com/gpu")
        );
    }

    #[test]
    fn two_processors_of_a_class_share_its_node_pool() {
        let classes = [gpu_class("ml")];
        let a = processor("a", "one", 1, json!({"className": "ml"}));
        let b = processor("b", "two", 2, json!({"className": "ml"}));
        let all = [a.clone(), b.clone()];
        let (pa, pb) = (
            governed(&a, &all, &classes).unwrap(),
            governed(&b, &all, &classes).unwrap(),
        );
        let (ca, cb) = (build::children(&pa), build::children(&pb));
        let np = ca.node_pool.clone().unwrap();
        assert_eq!(ca.node_pool, cb.node_pool, "one pool for the class");
        assert_eq!(np.metadata.name.as_deref(), Some("clip-class-ml"));
        let owner = &np.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ClipProcessorClass", "uid-ml")
        );
        assert!(
            !np.metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(build::LABEL_PROCESSOR),
            "no processor's sweep or cleanup may take it"
        );
        let limits = np.spec.limits.unwrap();
        assert_eq!(
            limits["nvidia.com/gpu"],
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("8".into())
        );
        let t = &np.spec.template.spec;
        assert_eq!(t.node_class_ref.name, "gpu");
        let req = |k: &str| {
            t.requirements
                .iter()
                .find(|r| r.key == k)
                .and_then(|r| r.values.clone())
        };
        assert_eq!(
            req("karpenter.k8s.aws/instance-family").unwrap(),
            ["g5", "g6"]
        );
        assert_eq!(
            req("karpenter.sh/capacity-type").unwrap(),
            ["spot", "on-demand"]
        );
        assert!(req("node.kubernetes.io/instance-type").is_none());
        let taints: Vec<_> = t.taints.iter().flatten().map(|t| t.key.as_str()).collect();
        assert_eq!(taints, ["nvidia.com/gpu", "team"]);
        // The workers select the class pool and tolerate its taints; the class's image and
        // priority apply; the cache is the class's file system.
        let pod = ca.deployment.unwrap().spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.node_selector.unwrap()["karpenter.sh/nodepool"],
            "clip-class-ml"
        );
        let tolerations: Vec<_> = pod
            .tolerations
            .unwrap()
            .into_iter()
            .filter_map(|t| t.key)
            .collect();
        assert_eq!(tolerations, ["nvidia.com/gpu", "team"]);
        assert_eq!(pod.priority_class_name.as_deref(), Some("ml-batch"));
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example.com/ml/clip-worker:1")
        );
        let pv = ca.persistent_volume.unwrap();
        assert_eq!(
            pv.spec.unwrap().csi.unwrap().volume_handle,
            "fs-0123456789abcdef0"
        );
        assert_eq!(
            np.spec
                .template
                .spec
                .startup_taints
                .as_ref()
                .map(|t| t[0].key.as_str()),
            Some("efs.csi.aws.com/agent-not-ready")
        );
    }

    #[test]
    fn eks_auto_mode_existing_nodes_and_dynamic_claims() {
        let auto = class(
            "auto",
            json!({"compute": {"karpenter": {"nodeClassRef": {"group": "eks.amazonaws.com", "kind": "NodeClass", "name": "default"},
                                             "instanceSizes": ["xlarge"], "architectures": ["arm64"]}},
                   "modelCache": {"storageClassName": "efs-ap", "size": "5Gi"}}),
        );
        let nodes = class(
            "nodes",
            json!({"compute": {"nodes": {"nodeSelector": {"gpu": "a10"}, "tolerations": [{"key": "gpu-only", "operator": "Exists"}]}}}),
        );
        let classes = [auto, nodes];
        let a = processor("a", "one", 1, json!({"className": "auto"}));
        let pa = governed(&a, std::slice::from_ref(&a), &classes).unwrap();
        let ca = build::children(&pa);
        let np = ca.node_pool.unwrap();
        let t = &np.spec.template.spec;
        assert_eq!(
            (
                t.node_class_ref.group.as_str(),
                t.node_class_ref.kind.as_str()
            ),
            ("eks.amazonaws.com", "NodeClass")
        );
        assert!(
            t.requirements
                .iter()
                .any(|r| r.key == "eks.amazonaws.com/instance-size")
        );
        assert!(
            np.spec.limits.is_none(),
            "no budget: no limit on the class pool"
        );
        assert!(ca.persistent_volume.is_none(), "provisioned, not static");
        let pvc = ca.persistent_volume_claim.unwrap().spec.unwrap();
        assert_eq!(pvc.storage_class_name.as_deref(), Some("efs-ap"));
        assert!(pvc.volume_name.is_none());
        assert_eq!(pvc.resources.unwrap().requests.unwrap()["storage"].0, "5Gi");
        assert!(ca.cache_warm_job.is_some(), "a shared cache is warmed once");

        let b = processor("a", "two", 2, json!({"className": "nodes"}));
        let pb = governed(&b, std::slice::from_ref(&b), &classes).unwrap();
        let cb = build::children(&pb);
        assert!(cb.node_pool.is_none(), "existing nodes: no pool");
        let pod = cb.deployment.unwrap().spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["gpu"], "a10");
        assert!(
            pod.tolerations
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some("gpu-only"))
        );
    }

    #[test]
    fn the_class_crd_carries_its_rules() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_string(&ClipProcessorClass::crd()).unwrap();
        for needle in [
            "\"scope\":\"Cluster\"",
            "a gpu class sets exactly one of karpenter or nodes",
            "EKS Auto Mode NodeClass",
            "\"maxGPUs\"",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
        // A class's CEL rules hold for the classes the tests use.
        assert!(gpu_class("ml").validate_cel().is_ok());
        let both = class(
            "x",
            json!({"compute": {"karpenter": {"nodeClassRef": {"name": "a"}}, "nodes": {}}}),
        );
        assert!(both.validate_cel().is_err());
    }
}

#[cfg(test)]
mod generated_crd {
    use super::*;
    use kube::CustomResourceExt;

    /// `crds/` is committed; regenerate it with `make crd` when the API changes.
    #[test]
    fn the_committed_class_crd_is_current() {
        let committed = include_str!("../../crds/clipprocessorclasses.lakechain.dev.yaml");
        let generated = serde_yaml_ng::to_string(&ClipProcessorClass::crd()).unwrap();
        assert!(
            committed == generated,
            "crds/clipprocessorclasses.lakechain.dev.yaml is stale: run `make crd`"
        );
    }
}
