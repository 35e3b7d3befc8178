//! Validation (pure): the CRD's own CEL rules, evaluated locally, plus the checks CEL cannot
//! express; the result is a [`ValidatedProcessor`] every builder takes.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::{
    CapacityType, ClipProcessor, ClipProcessorSpec, ComputeDevice, Provisioner, ScalingEngine,
};

/// Where the model cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheMode {
    /// A static EFS PersistentVolume and its claim, created by the operator.
    Efs {
        file_system_id: String,
        access_point_id: Option<String>,
    },
    /// A claim the user created.
    Claim(String),
    /// Per-pod emptyDir.
    EmptyDir,
    /// A ReadWriteMany claim the operator creates, provisioned by the class's StorageClass.
    Dynamic { storage_class: String, size: String },
}

impl CacheMode {
    /// Whether all workers share one cache (then a cache-warm Job downloads the weights once).
    pub fn shared(&self) -> bool {
        !matches!(self, CacheMode::EmptyDir)
    }
}

/// Operator-wide settings that feed the builders.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorSettings {
    /// Worker image when the spec has none.
    pub worker_image: String,
    /// Image pull policy for workers and cache-warm Jobs.
    pub image_pull_policy: Option<String>,
    /// `AWS_ENDPOINT_URL` passed to workers (tests and private endpoints); usually unset.
    pub aws_endpoint_url: Option<String>,
    /// Pull secrets every worker and cache-warm pod gets (the chart's worker.imagePullSecrets).
    pub image_pull_secrets: Vec<String>,
    /// How often a processor is reconciled when nothing changed.
    pub resync: std::time::Duration,
    /// Processors without a class (named or default) are refused (`--require-class`).
    pub require_class: bool,
    /// The namespaces served (`--namespaces`).
    pub namespaces: super::scope::Namespaces,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        OperatorSettings {
            resync: super::RESYNC,
            worker_image: format!(
                "ghcr.io/clip-operator/clip-worker:{}",
                env!("CARGO_PKG_VERSION")
            ),
            image_pull_policy: None,
            aws_endpoint_url: None,
            image_pull_secrets: Vec::new(),
            require_class: false,
            namespaces: Default::default(),
        }
    }
}

/// A `ClipProcessor` that passed validation, with everything derived from it resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedProcessor {
    pub name: String,
    pub namespace: String,
    pub generation: Option<i64>,
    pub spec: ClipProcessorSpec,
    pub model: clip_contract::ModelSpec,
    /// `spec.region`, else the queue URL's region.
    pub region: String,
    pub image: String,
    pub cache: CacheMode,
    pub engine: ScalingEngine,
    pub device: ComputeDevice,
    /// Who provides the nodes: always `None` on CPUs (no node pool is created for them).
    pub provisioner: Provisioner,
    pub capacity_type: CapacityType,
    pub settings: OperatorSettings,
    /// The processor's ClipProcessorClass, once applied ([`crate::class::govern`]).
    pub class: Option<crate::class::Governed>,
}

impl ValidatedProcessor {
    /// No workers may run: suspended, or the class budget grants none.
    pub fn held(&self) -> bool {
        self.spec.suspend || self.class.as_ref().is_some_and(|c| c.max_workers == 0)
    }
}

/// The first problem found, as one sentence naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Validates a processor; `settings` supplies operator defaults.
pub fn validate(
    cp: &ClipProcessor,
    settings: &OperatorSettings,
) -> Result<ValidatedProcessor, InvalidSpec> {
    let name = cp.name_any();
    let namespace = cp.namespace().unwrap_or_else(|| "default".into());
    // The CRD's CEL rules, evaluated here exactly as the API server evaluates them.
    cp.validate_cel()
        .map_err(|errors| InvalidSpec(cel_message(&errors.to_string())))?;
    let spec = &cp.spec;
    let region = match &spec.region {
        Some(r) => r.clone(),
        None => queue_region(&spec.source.queue_url).ok_or_else(|| {
            InvalidSpec(format!(
                "spec.region is unset and cannot be read from source.queueUrl {:?}",
                spec.source.queue_url
            ))
        })?,
    };
    let cache = match (
        &spec.model_cache.efs,
        &spec.model_cache.claim_name,
        spec.model_cache.none,
    ) {
        (Some(efs), None, None | Some(false)) => CacheMode::Efs {
            file_system_id: efs.file_system_id.clone(),
            access_point_id: efs.access_point_id.clone(),
        },
        (None, Some(claim), None | Some(false)) => CacheMode::Claim(claim.clone()),
        (None, None, Some(true)) => CacheMode::EmptyDir,
        _ => {
            return Err(InvalidSpec(
                "modelCache: set exactly one of efs, claimName or none: true".into(),
            ));
        }
    };
    let image = spec
        .worker
        .image
        .clone()
        .unwrap_or_else(|| settings.worker_image.clone());
    let mut seen = BTreeMap::new();
    for (i, e) in spec.worker.env.iter().enumerate() {
        if let Some(first) = seen.insert(e.name.clone(), i) {
            return Err(InvalidSpec(format!(
                "worker.env[{i}] repeats {:?} from worker.env[{first}]",
                e.name
            )));
        }
    }
    Ok(ValidatedProcessor {
        name,
        namespace,
        generation: cp.metadata.generation,
        spec: spec.clone(),
        model: spec.model.spec(),
        region,
        image,
        cache,
        engine: spec.scaling.engine,
        device: spec.compute.device,
        provisioner: match spec.compute.device {
            ComputeDevice::Gpu => spec.compute.node_pool.provisioner,
            ComputeDevice::Cpu => Provisioner::None,
        },
        capacity_type: spec.compute.capacity_type,
        settings: settings.clone(),
        class: None,
    })
}

/// Longest `ClipProcessor` name (a CEL rule in the CRD): `<name>-cache-warm-vit-b-32` must stay a
/// valid Job name (63).
pub const MAX_NAME: usize = 43;

/// `sqs.<region>.amazonaws.com` in a queue URL.
pub fn queue_region(url: &str) -> Option<String> {
    let host = url.strip_prefix("https://")?.split('/').next()?;
    let mut parts = host.split('.');
    (parts.next()? == "sqs").then_some(())?;
    let region = parts.next()?;
    (!region.is_empty()).then(|| region.to_string())
}

/// kube-cel's error text, reduced to the rule messages users wrote.
fn cel_message(raw: &str) -> String {
    raw.trim().trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub fn manifest(spec: serde_json::Value) -> ClipProcessor {
        let mut base = json!({
            "apiVersion": "lakechain.dev/v1alpha1",
            "kind": "ClipProcessor",
            "metadata": {"name": "photos", "namespace": "media", "generation": 3},
            "spec": {
                "source": {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/clip-input"},
                "output": {"topicArn": "arn:aws:sns:eu-west-1:123456789012:clip-output"},
                "cacheStorage": {"bucket": "lakechain-cache"}
            }
        });
        merge(&mut base["spec"], spec);
        serde_json::from_value(base).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn err(spec: serde_json::Value) -> String {
        validate(&manifest(spec), &OperatorSettings::default())
            .unwrap_err()
            .0
    }

    #[test]
    fn a_minimal_manifest_resolves_its_defaults() {
        let v = validate(&manifest(json!({})), &OperatorSettings::default()).unwrap();
        assert_eq!(v.region, "eu-west-1", "region from the queue URL");
        assert_eq!(v.cache, CacheMode::EmptyDir);
        assert_eq!(v.model.name, "ViT-B/32");
        assert!(v.image.starts_with("ghcr.io/clip-operator/clip-worker:"));
        assert_eq!((v.namespace.as_str(), v.generation), ("media", Some(3)));
    }

    #[test]
    fn invalid_combinations_are_named() {
        let e = err(json!({"scaling": {"minInstances": 6, "maxInstances": 5}}));
        assert!(
            e.contains("scaling.minInstances must not be greater than scaling.maxInstances"),
            "{e}"
        );
        let e = err(json!({"modelCache": {"none": true, "claimName": "weights"}}));
        assert!(
            e.contains("modelCache: set exactly one of efs, claimName or none"),
            "{e}"
        );
        let e = err(json!({"modelCache": {"none": null, "efs": {"fileSystemId": "fs-12"}}}));
        assert!(e.contains("modelCache.efs.fileSystemId"), "{e}");
        let e = err(json!({"serviceAccount": {"roleArn": "arn:aws:iam::12:role/x"}}));
        assert!(
            e.contains("serviceAccount.roleArn must be an IAM role ARN"),
            "{e}"
        );
        let e = err(json!({"source": {"queueUrl": "http://localhost/q"}}));
        assert!(
            e.contains("source.queueUrl must be an SQS queue URL"),
            "{e}"
        );
        let e = err(json!({"output": {"topicArn": "arn:aws:sqs:eu-west-1:123456789012:q"}}));
        assert!(e.contains("output.topicArn"), "{e}");
        let e = err(json!({"compute": {"nodeSelector": {"gpu": "t4"}}}));
        assert!(
            e.contains(
                "compute.nodeSelector and compute.tolerations are for nodePool.provisioner: none or device: cpu"
            ),
            "{e}"
        );
        let e = err(json!({"worker": {"podLabels": {"app.kubernetes.io/name": "x"}}}));
        assert!(e.contains("worker.podLabels must not set"), "{e}");
        let e = err(json!({"worker": {"podLabels": {"lakechain.dev/processor": "other"}}}));
        assert!(e.contains("worker.podLabels must not set"), "{e}");
        let e =
            err(json!({"worker": {"podAnnotations": {"karpenter.sh/do-not-disrupt": "false"}}}));
        assert!(
            e.contains("worker.podAnnotations must not set karpenter.sh/do-not-disrupt"),
            "{e}"
        );
        let e = err(json!({"scaling": {"engine": "keda", "identityOwner": "workload"}}));
        assert!(
            e.contains("scaling.identityOwner: workload needs serviceAccount.roleArn"),
            "{e}"
        );
        let e = err(
            json!({"scaling": {"identityOwner": "workload", "kedaRoleArn": "arn:aws:iam::123456789012:role/k"},
                           "serviceAccount": {"roleArn": "arn:aws:iam::123456789012:role/w"}}),
        );
        assert!(e.contains("exclude each other"), "{e}");
        let e = err(
            json!({"scaling": {"maxInstances": 3, "fallback": {"failureThreshold": 2, "replicas": 4}}}),
        );
        assert!(
            e.contains("scaling.fallback.replicas must not be greater than scaling.maxInstances"),
            "{e}"
        );
        let e = err(
            json!({"worker": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}}),
        );
        assert!(e.contains("worker.env[1] repeats \"A\""), "{e}");
    }

    #[test]
    fn long_names_are_refused_by_the_crd_rule() {
        let mut cp = manifest(json!({}));
        cp.metadata.name = Some("p".repeat(MAX_NAME + 1));
        let e = validate(&cp, &OperatorSettings::default()).unwrap_err().0;
        assert!(
            e.contains("metadata.name must be at most 43 characters"),
            "{e}"
        );
        cp.metadata.name = Some("p".repeat(MAX_NAME));
        assert!(validate(&cp, &OperatorSettings::default()).is_ok());
    }

    #[test]
    fn valid_alternatives_pass() {
        let s = OperatorSettings::default();
        let v = validate(&manifest(json!({"modelCache": {"none": null, "efs": {"fileSystemId": "fs-0123456789abcdef0", "accessPointId": "fsap-0123456789abcdef0"}}})), &s).unwrap();
        assert!(matches!(v.cache, CacheMode::Efs { .. }));
        let v = validate(
            &manifest(json!({"modelCache": {"none": null, "claimName": "weights"}})),
            &s,
        )
        .unwrap();
        assert_eq!(v.cache, CacheMode::Claim("weights".into()));
        let v = validate(
            &manifest(json!({"compute": {"nodePool": {"provisioner": "none"}, "nodeSelector": {"gpu": "t4"}}, "region": "us-east-2"})),
            &s,
        )
        .unwrap();
        assert_eq!(v.region, "us-east-2");
        let v = validate(
            &manifest(json!({"compute": {"device": "cpu", "nodeSelector": {"pool": "general"}}})),
            &s,
        )
        .unwrap();
        assert_eq!(
            (v.device, v.provisioner),
            (ComputeDevice::Cpu, Provisioner::None),
            "CPU workers get no node pool"
        );
        assert_eq!(
            queue_region("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q").as_deref(),
            Some("cn-north-1")
        );
    }
}
