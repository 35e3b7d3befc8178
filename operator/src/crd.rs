//! The `ClipProcessor` API (`lakechain.dev/v1alpha1`). Every field's doc comment is its
//! `kubectl explain` text; defaults live in the schema; invalid combinations are rejected by CEL
//! rules in the CRD, and the operator evaluates the very same rules (`validate_cel`) before it acts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CLIP image processor: consumes Lakechain events from an SQS queue, writes image embeddings
/// to an S3 cache bucket and publishes enriched events to SNS, on GPU nodes that scale with the
/// queue and down to zero.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lakechain.dev",
    version = "v1alpha1",
    kind = "ClipProcessor",
    plural = "clipprocessors",
    shortname = "clip",
    category = "lakechain",
    namespaced,
    status = "ClipProcessorStatus",
    derive = "PartialEq",
    doc = "A CLIP image processor: reads Lakechain events from an SQS queue, writes each image's CLIP embedding to an S3 cache bucket and publishes the enriched event to an SNS topic, on workers that follow the queue down to zero. The operator creates and owns the workers' Deployment, ServiceAccount, model cache, node pool and scaler; status reports what they do.",
    cel,
    validation = Rule::new("size(self.metadata.name) <= 43").message("metadata.name must be at most 43 characters: child object names add suffixes to it"),
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Class","type":"string","priority":1,"jsonPath":".spec.className"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"string","description":"ready/desired workers","jsonPath":".status.replicas.summary"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","description":"visible messages","jsonPath":".status.queue.visible"}"#,
    printcolumn = r#"{"name":"In-Flight","type":"integer","priority":1,"jsonPath":".status.queue.inFlight"}"#,
    printcolumn = r#"{"name":"Engine","type":"string","priority":1,"jsonPath":".spec.scaling.engine"}"#,
    printcolumn = r#"{"name":"Query","type":"string","priority":1,"description":"the query endpoint's address","jsonPath":".status.query.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.scaling) || !has(self.scaling.identityOwner) || self.scaling.identityOwner != 'workload' || (has(self.serviceAccount) && has(self.serviceAccount.roleArn))").message("scaling.identityOwner: workload needs serviceAccount.roleArn: KEDA reads the role from the workers' ServiceAccount").field_path(".scaling.identityOwner"))]
pub struct ClipProcessorSpec {
    /// The ClipProcessorClass whose nodes, budget, model cache and worker policy the processor
    /// uses. Unset: the default class (annotated lakechain.dev/is-default-class: "true"), else
    /// none (the processor's own compute and modelCache, on clusters without classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("className must be a ClipProcessorClass name: lowercase letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 50))]
    pub class_name: Option<String>,
    /// CLIP model: ViT-B/32 (default, 512 dimensions), ViT-B/16 (512) or ViT-L/14 (768).
    #[serde(default)]
    pub model: ClipModel,
    /// AWS region of the queue, topic and bucket. Default: the region in source.queueUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must be an AWS region such as us-east-1"))]
    #[schemars(length(max = 32))]
    pub region: Option<String>,
    /// Add zero-shot keywords (top 5 labels) to each event's metadata.keywords.
    #[serde(default = "default_true")]
    pub label_extraction: bool,
    /// Where events come from.
    pub source: Source,
    /// Where enriched events go.
    pub output: Output,
    /// Where vector files are written.
    pub cache_storage: CacheStorage,
    /// How the number of workers follows the queue.
    #[serde(default)]
    pub scaling: Scaling,
    /// The workers' nodes: GPUs (default, a Karpenter pool or existing GPU nodes) or CPUs.
    #[serde(default)]
    pub compute: Compute,
    /// Shared model-weight cache, mounted at /cache in every worker.
    #[serde(default)]
    pub model_cache: ModelCache,
    /// The workers' Kubernetes ServiceAccount.
    #[serde(default)]
    pub service_account: ServiceAccountSpec,
    /// Worker container and pod settings.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Stop the processor without deleting it: no workers, the queue is not read (its messages
    /// wait), the NodePool's limits drop to zero; the children, the model cache and the vectors
    /// stay. Reported by the `Suspended` condition (and as Suspended in Argo CD).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// A query endpoint next to the workers: `clip-worker query` with the processor's model and
    /// model cache, so search queries become vectors of the same model and weights (OpenAI's
    /// POST /v1/embeddings, text and image inputs). A Deployment, a Service and a
    /// PodDisruptionBudget, plus an HPA with minReplicas/maxReplicas; the address is in
    /// status.query.url. It keeps serving while the processor is suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QuerySpec>,
}

fn default_true() -> bool {
    true
}

/// The query endpoint (see docs/query.md).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.replicas) || (!has(self.minReplicas) && !has(self.maxReplicas))").message("query.replicas and query.minReplicas/maxReplicas are exclusive: a fixed count, or the HPA's bounds"))]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || has(self.maxReplicas)").message("query.minReplicas needs query.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("query.minReplicas must not be greater than query.maxReplicas"))]
pub struct QuerySpec {
    /// Deploy the endpoint (default true once query is set; false removes it).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A fixed number of replicas (default 1 without maxReplicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// With maxReplicas: an HPA scales the endpoint on CPU between the two (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: Option<i32>,
    /// The HPA's upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: Option<i32>,
    /// The HPA's target average CPU utilisation, percent of the request.
    #[serde(
        default = "default_query_cpu_target",
        rename = "targetCPUUtilizationPercentage"
    )]
    #[schemars(range(min = 10, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// cpu (default: a query is a short forward pass) or gpu (one GPU per replica, on the
    /// workers' GPU nodes; not counted in a class's GPU budget).
    #[serde(default = "default_query_device")]
    pub device: ComputeDevice,
    /// Container resources. Default: 1 CPU / 2 GiB requested, 4 GiB limit (plus one
    /// nvidia.com/gpu with device gpu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Return L2-normalised vectors unless a request says otherwise (QUERY_NORMALIZE). Default:
    /// the raw features, as the workers store them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
}

fn default_query_cpu_target() -> i32 {
    70
}

fn default_query_device() -> ComputeDevice {
    ComputeDevice::Cpu
}

impl QuerySpec {
    /// The HPA's bounds, when the endpoint autoscales.
    pub fn autoscale(&self) -> Option<(i32, i32)> {
        self.max_replicas
            .map(|max| (self.min_replicas.unwrap_or(1).min(max), max))
    }
}

/// Supported CLIP models.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ClipModel {
    #[default]
    #[serde(rename = "ViT-B/32")]
    VitB32,
    #[serde(rename = "ViT-B/16")]
    VitB16,
    #[serde(rename = "ViT-L/14")]
    VitL14,
}

impl ClipModel {
    /// The model's entry in the shared contract (slug, dimensions, repository).
    pub fn spec(self) -> clip_contract::ModelSpec {
        let name = match self {
            ClipModel::VitB32 => "ViT-B/32",
            ClipModel::VitB16 => "ViT-B/16",
            ClipModel::VitL14 => "ViT-L/14",
        };
        clip_contract::ModelSpec::lookup(name).expect("every ClipModel is in the contract's table")
    }
}

/// The input queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// URL of the SQS queue the Lakechain middleware feeds (raw SNS delivery), e.g.
    /// https://sqs.us-east-1.amazonaws.com/123456789012/clip-input.
    #[x_kube(validation = Rule::new(r"self.matches('^https://sqs\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?/[0-9]{12}/[A-Za-z0-9_-]{1,80}(\\.fifo)?$')").message("source.queueUrl must be an SQS queue URL: https://sqs.<region>.amazonaws.com/<account>/<queue>"))]
    #[schemars(length(max = 256))]
    pub queue_url: String,
}

/// The output topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// ARN of the SNS topic enriched events are published to.
    #[x_kube(validation = Rule::new(r"self.matches('^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\\.fifo)?$')").message("output.topicArn must be an SNS topic ARN: arn:aws:sns:<region>:<account>:<topic>"))]
    #[schemars(length(max = 320))]
    pub topic_arn: String,
}

/// The cache bucket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStorage {
    /// Name of the S3 bucket vector files are written to (the pipeline's CacheStorage).
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$')").message("cacheStorage.bucket must be an S3 bucket name"))]
    #[schemars(length(max = 63))]
    pub bucket: String,
}

/// Scaling engine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScalingEngine {
    /// The operator polls the queue and scales the workers (no KEDA needed).
    #[default]
    Builtin,
    /// Emit a KEDA ScaledObject and TriggerAuthentication with the same settings.
    Keda,
}

/// How the workers follow the queue, with KEDA's aws-sqs-queue semantics: target
/// ceil((visible + in-flight) / messagesPerInstance) workers, scale up at once, scale down after
/// a stabilisation window, and to minInstances only after cooldownSeconds of an empty queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minInstances <= self.maxInstances").message("scaling.minInstances must not be greater than scaling.maxInstances").field_path(".minInstances"))]
#[x_kube(validation = Rule::new("!has(self.identityOwner) || self.identityOwner != 'workload' || !has(self.kedaRoleArn)").message("scaling.identityOwner: workload and scaling.kedaRoleArn exclude each other: KEDA uses the workers' role or the one given").field_path(".identityOwner"))]
#[x_kube(validation = Rule::new("!has(self.fallback) || self.fallback.replicas <= self.maxInstances").message("scaling.fallback.replicas must not be greater than scaling.maxInstances").field_path(".fallback.replicas"))]
pub struct Scaling {
    /// builtin (default) or keda.
    #[serde(default)]
    pub engine: ScalingEngine,
    /// Workers kept when the queue is empty (0: scale to zero).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_instances: i32,
    /// Most workers (the seed's default is 5); also bounds the GPU node pool.
    #[serde(default = "default_max_instances")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_instances: i32,
    /// Messages per worker (KEDA queueLength; the seed uses 10).
    #[serde(default = "default_messages_per_instance")]
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_instance: i32,
    /// How often the queue is read, in seconds.
    #[serde(default = "default_polling_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub polling_interval_seconds: i32,
    /// Seconds the queue must stay empty before scaling to minInstances.
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 86400))]
    pub cooldown_seconds: i32,
    /// keda engine only: IAM role KEDA assumes to read the queue's attributes. Default:
    /// serviceAccount.roleArn; neither: KEDA's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$')").message("scaling.kedaRoleArn must be an IAM role ARN"))]
    #[schemars(length(max = 600))]
    pub keda_role_arn: Option<String>,
    /// Queue length at or below which the workers are not started from zero (KEDA's
    /// activationQueueLength, both engines): the processor becomes active, and its cooldown
    /// restarts, only when visible + in-flight messages exceed it. Once running, the workers
    /// follow messagesPerInstance as usual. 0 (default): any message starts them.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 100000))]
    pub activation_queue_length: i32,
    /// keda engine only: whose AWS identity KEDA reads the queue with. keda (default): KEDA's
    /// own, or the role it assumes (kedaRoleArn, else serviceAccount.roleArn); workload: the
    /// role on the workers' ServiceAccount (serviceAccount.roleArn, required), read by KEDA
    /// from its eks.amazonaws.com/role-arn annotation, so no role needs to trust KEDA's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_owner: Option<IdentityOwner>,
    /// Workers to run while the queue cannot be read (both engines; KEDA's fallback with its
    /// static behaviour): after failureThreshold failed reads in a row the workers go to
    /// replicas (within minInstances..maxInstances) until a read succeeds. Unset (default): the
    /// workers stay as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// Whose AWS identity KEDA uses (its TriggerAuthentication's podIdentity.identityOwner).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityOwner {
    /// KEDA's own identity, or a role it assumes.
    Keda,
    /// The workers' ServiceAccount role.
    Workload,
}

/// What the workers do while the queue cannot be read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// Failed queue reads in a row before the fallback applies.
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: i32,
    /// Workers while it applies.
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
}

fn default_max_instances() -> i32 {
    5
}
fn default_messages_per_instance() -> i32 {
    10
}
fn default_polling_interval() -> i32 {
    15
}
fn default_cooldown() -> i32 {
    300
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            engine: ScalingEngine::Builtin,
            min_instances: 0,
            max_instances: default_max_instances(),
            messages_per_instance: default_messages_per_instance(),
            polling_interval_seconds: default_polling_interval(),
            cooldown_seconds: default_cooldown(),
            keda_role_arn: None,
            activation_queue_length: 0,
            identity_owner: None,
            fallback: None,
        }
    }
}

/// EC2 capacity type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    #[default]
    OnDemand,
    Spot,
}

impl CapacityType {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::OnDemand => "on-demand",
            CapacityType::Spot => "spot",
        }
    }
}

/// Who provides the GPU nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provisioner {
    /// A Karpenter NodePool owned by this processor (default).
    #[default]
    Karpenter,
    /// Existing GPU nodes, chosen with compute.nodeSelector and compute.tolerations.
    None,
}

/// The node pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolSpec {
    /// karpenter (default) or none.
    #[serde(default)]
    pub provisioner: Provisioner,
    /// karpenter: an existing EC2NodeClass (subnets, security groups, AMI alias).
    #[serde(default = "default_node_class")]
    #[schemars(length(min = 1, max = 253))]
    pub node_class_name: String,
}

fn default_node_class() -> String {
    "default".into()
}

impl Default for NodePoolSpec {
    fn default() -> Self {
        NodePoolSpec {
            provisioner: Provisioner::Karpenter,
            node_class_name: default_node_class(),
        }
    }
}

/// What the workers run CLIP on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    /// NVIDIA GPUs (default): each worker requests compute.gpusPerInstance of them and runs in
    /// fp16, on a Karpenter GPU pool or existing GPU nodes.
    #[default]
    Gpu,
    /// CPUs only: no GPU request and no node pool; workers request CPU and memory, run in fp32
    /// on any node (or those compute.nodeSelector picks). For dev clusters and small volumes.
    Cpu,
}

/// Worker capacity: GPUs (default) or CPUs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.device == 'cpu' || self.nodePool.provisioner == 'none' || ((!has(self.nodeSelector) || size(self.nodeSelector) == 0) && (!has(self.tolerations) || size(self.tolerations) == 0))").message("compute.nodeSelector and compute.tolerations are for nodePool.provisioner: none or device: cpu; a Karpenter pool is selected automatically"))]
pub struct Compute {
    /// gpu (default) or cpu.
    #[serde(default)]
    pub device: ComputeDevice,
    /// EC2 instance types for the GPU node pool (the seed uses g4dn.xlarge: 4 vCPU, 16 GiB, one
    /// T4). Unused with device: cpu.
    #[serde(default = "default_instance_types")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 32)))]
    #[x_kube(validation = Rule::new(r"self.all(t, t.matches('^[a-z0-9-]+\\.[a-z0-9]+$'))").message("compute.instanceTypes must be EC2 instance types such as g4dn.xlarge"))]
    pub instance_types: Vec<InstanceType>,
    /// on-demand (default) or spot.
    #[serde(default)]
    pub capacity_type: CapacityType,
    /// GPUs each worker uses (and each instance has). Unused with device: cpu.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 1, max = 8))]
    pub gpus_per_instance: i32,
    /// Who provides the nodes.
    #[serde(default)]
    pub node_pool: NodePoolSpec,
    /// provisioner none or device cpu: labels the workers' nodes carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// provisioner none or device cpu: tolerations for those nodes' taints (GPU workers always
    /// tolerate the nvidia.com/gpu taint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
}

/// An EC2 instance type name.
pub type InstanceType = String;

fn default_instance_types() -> Vec<String> {
    vec!["g4dn.xlarge".into()]
}
fn default_gpus() -> i32 {
    1
}

impl Default for Compute {
    fn default() -> Self {
        Compute {
            device: ComputeDevice::Gpu,
            instance_types: default_instance_types(),
            capacity_type: CapacityType::OnDemand,
            gpus_per_instance: 1,
            node_pool: NodePoolSpec::default(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

/// Where model weights are cached. Exactly one of efs, claimName or none.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.efs), has(self.claimName), has(self.none) && self.none].exists_one(x, x)").message("modelCache: set exactly one of efs, claimName or none: true"))]
pub struct ModelCache {
    /// An EFS file system the operator mounts through a static PersistentVolume; weights are
    /// downloaded once by a cache-warm Job and shared by every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efs: Option<EfsCache>,
    /// An existing ReadWriteMany PersistentVolumeClaim in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// true: no shared cache; each worker downloads the weights into an emptyDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub none: Option<bool>,
}

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache {
            efs: None,
            claim_name: None,
            none: Some(true),
        }
    }
}

/// An EFS file system (and optionally an access point).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EfsCache {
    /// File system ID, fs-....
    #[x_kube(validation = Rule::new(r"self.matches('^fs-[0-9a-f]{8,40}$')").message("modelCache.efs.fileSystemId must look like fs-0123456789abcdef0"))]
    #[schemars(length(max = 43))]
    pub file_system_id: String,
    /// Access point ID, fsap-... (recommended: root /cache owned by uid/gid 1000, as the seed's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^fsap-[0-9a-f]{8,40}$')").message("modelCache.efs.accessPointId must look like fsap-0123456789abcdef0"))]
    #[schemars(length(max = 45))]
    pub access_point_id: Option<String>,
}

/// The workers' ServiceAccount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSpec {
    /// IAM role for the workers (IRSA, eks.amazonaws.com/role-arn): consume the queue, read the
    /// documents, write the cache bucket, publish to the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$')").message("serviceAccount.roleArn must be an IAM role ARN: arn:aws:iam::<account>:role/<name>"))]
    #[schemars(length(max = 600))]
    pub role_arn: Option<String>,
}

/// Worker container and pod settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.podLabels) || self.podLabels.all(k, !k.startsWith('lakechain.dev/') && !(k in ['app.kubernetes.io/name', 'app.kubernetes.io/component', 'app.kubernetes.io/part-of', 'app.kubernetes.io/managed-by']))").message("worker.podLabels must not set lakechain.dev/* or the app.kubernetes.io name, component, part-of and managed-by labels: the operator selects its pods by them").field_path(".podLabels"))]
#[x_kube(validation = Rule::new("!has(self.podAnnotations) || !('karpenter.sh/do-not-disrupt' in self.podAnnotations)").message("worker.podAnnotations must not set karpenter.sh/do-not-disrupt: the operator keeps busy workers' nodes").field_path(".podAnnotations"))]
pub struct WorkerSpec {
    /// Worker image. Default: the operator's --worker-image (set by the Helm chart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Container resources. Default on GPUs: 2 CPU / 8 GiB requested, 14 GiB limit, and
    /// nvidia.com/gpu = compute.gpusPerInstance (always set from there); on CPUs: 2 CPU / 3 GiB
    /// requested, 6 GiB limit, and no GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Images per forward pass (BATCH_SIZE). Default: the worker's (32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: Option<i32>,
    /// Extra environment variables (any worker setting, see docs/worker.md); they override the
    /// operator's values of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Labels added to the worker pods and the cache-warm Job's pod (cost allocation, mesh
    /// opt-outs, policy selectors).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_labels: BTreeMap<String, String>,
    /// Annotations added to the worker pods and the cache-warm Job's pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra tolerations for the worker pods, with any provisioner (GPU workers always tolerate
    /// nvidia.com/gpu; compute.tolerations, for existing nodes, are added too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the worker pods. With a Karpenter pool the pods already select its nodes;
    /// a node affinity that its requirements cannot meet leaves them Pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Topology spread of the worker pods (e.g. across zones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the worker pods and the cache-warm Job's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Secrets (in this namespace) to pull the worker image with, for the workers and the
    /// cache-warm Job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
}

/// Observed state. The operator never writes spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClipProcessorStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (summary), Progressing, Degraded, Suspended, CacheReady, NodePoolReady,
    /// ScalerReady, WorkersAvailable; one of each type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Worker replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaStatus>,
    /// Queue depth as last read (builtin engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// When the scaler last changed the number of workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// When the queue last had messages (the cooldown counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_time: Option<Time>,
    /// The query endpoint, with spec.query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryStatus>,
}

/// The query endpoint's address and readiness.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueryStatus {
    /// The Service's in-cluster address, e.g. http://photos-query.media.svc:8080 (POST
    /// /v1/embeddings).
    pub url: String,
    /// Replicas ready to answer.
    pub ready_replicas: i32,
}

/// Worker replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Replicas the scaler asked for.
    pub desired: i32,
    /// Replicas ready to work.
    pub ready: i32,
    /// "ready/desired", for kubectl get.
    pub summary: String,
}

/// Queue depth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// ApproximateNumberOfMessages.
    pub visible: i64,
    /// ApproximateNumberOfMessagesNotVisible (received, not yet deleted).
    pub in_flight: i64,
    /// When it was read.
    pub read_at: Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn defaults_are_the_seeds() {
        let spec: ClipProcessorSpec = serde_json::from_value(serde_json::json!({
            "source": {"queueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/q"},
            "output": {"topicArn": "arn:aws:sns:us-east-1:123456789012:t"},
            "cacheStorage": {"bucket": "cache"}
        }))
        .unwrap();
        assert_eq!(spec.model, ClipModel::VitB32);
        assert!(spec.label_extraction);
        assert_eq!(spec.scaling.max_instances, 5);
        assert_eq!(spec.scaling.messages_per_instance, 10);
        assert_eq!(spec.scaling.polling_interval_seconds, 15);
        assert_eq!(spec.scaling.cooldown_seconds, 300);
        assert_eq!(spec.compute.instance_types, vec!["g4dn.xlarge"]);
        assert_eq!(spec.model_cache, ModelCache::default());
        assert_eq!(spec.model.spec().slug, "ViT-B-32");
    }

    #[test]
    fn the_crd_carries_defaults_rules_and_columns() {
        let crd = serde_json::to_string(&ClipProcessor::crd()).unwrap();
        for needle in [
            "\"default\":\"ViT-B/32\"",
            "exists_one",
            "scaling.minInstances must not be greater than scaling.maxInstances",
            "\"name\":\"Replicas\"",
            "\"shortNames\":[\"clip\"]",
            "\"description\":\"A CLIP image processor: reads Lakechain events",
            "\"x-kubernetes-list-map-keys\":[\"type\"],\"x-kubernetes-list-type\":\"map\"",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}

#[cfg(test)]
mod generated_crd {
    use super::*;
    use kube::CustomResourceExt;

    /// `crds/` is committed; regenerate it with `make crd` when the API changes.
    #[test]
    fn the_committed_crd_is_current() {
        let committed = include_str!("../../crds/clipprocessors.lakechain.dev.yaml");
        let generated = serde_yaml_ng::to_string(&ClipProcessor::crd()).unwrap();
        assert!(
            committed == generated,
            "crds/clipprocessors.lakechain.dev.yaml is stale: run `make crd`"
        );
    }
}
