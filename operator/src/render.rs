//! `clip-operator render -f FILE`: offline and deterministic, every object the operator would
//! apply for the `ClipProcessor`s in FILE, as multi-document YAML (for GitOps diffs and reviews).
//! Owner references need the live object's uid, so they are left out; everything else is what
//! the operator applies. A manifest the API server would refuse is refused here too: the CRD's
//! schema and unknown fields ([`schema`]), then its CEL rules and the operator's own checks.

use serde::Deserialize;
use serde_json::Value;

use kube::ResourceExt;

use crate::class::{self, ClipProcessorClass};
use crate::crd::ClipProcessor;
use crate::reconcile::build::{self, Children};
use crate::reconcile::validate::{OperatorSettings, validate};
use crate::schema;

/// Renders every `ClipProcessor` in `yaml` (one or many documents). The `ClipProcessorClass`es
/// in `yaml` are the cluster's classes: a processor of one is rendered under it (its nodes,
/// cache, policy, and its share of the budget among the processors in `yaml`).
pub fn render(yaml: &str, settings: &OperatorSettings) -> Result<String, String> {
    let mut out = Vec::new();
    let mut processors = Vec::new();
    let mut classes = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let value =
            Value::deserialize(doc).map_err(|e| format!("document {}: not YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let where_ = |msg: String| format!("document {}: {msg}", i + 1);
        let (api_version, kind) = (
            value["apiVersion"].as_str().unwrap_or(""),
            value["kind"].as_str().unwrap_or(""),
        );
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or("<unnamed>")
            .to_string();
        match (api_version, kind) {
            ("lakechain.dev/v1alpha1", "ClipProcessor") => {}
            ("lakechain.dev/v1alpha1", "ClipProcessorClass") => {
                let violations = schema::clip_processor_class_violations(&value);
                if !violations.is_empty() {
                    return Err(where_(format!(
                        "ClipProcessorClass {name:?} is invalid:\n  {}",
                        violations.join("\n  ")
                    )));
                }
                let class: ClipProcessorClass = serde_path_to_error::deserialize(value)
                    .map_err(|e| where_(format!("{}: {}", e.path(), e.inner())))?;
                class
                    .validate_cel()
                    .map_err(|e| where_(format!("ClipProcessorClass {name:?} is invalid: {e}")))?;
                classes.push(class);
                continue;
            }
            _ => {
                return Err(where_(format!(
                    "expected apiVersion lakechain.dev/v1alpha1, kind ClipProcessor or ClipProcessorClass; got {api_version:?}, {kind:?}"
                )));
            }
        }
        // What the API server refuses before CEL: the schema and unknown fields (as kubectl's
        // default strict field validation does).
        let violations = schema::clip_processor_violations(&value);
        if !violations.is_empty() {
            return Err(where_(format!(
                "ClipProcessor {name:?} is invalid:\n  {}",
                violations.join("\n  ")
            )));
        }
        let mut cp: ClipProcessor = serde_path_to_error::deserialize(value)
            .map_err(|e| where_(format!("{}: {}", e.path(), e.inner())))?;
        if cp.metadata.namespace.is_none() {
            cp.metadata.namespace = Some("default".into());
        }
        processors.push((i, cp));
    }
    let all: Vec<ClipProcessor> = processors.iter().map(|(_, cp)| cp.clone()).collect();
    let mut pools = std::collections::BTreeSet::new();
    for (i, cp) in &processors {
        let where_ = |msg: String| format!("document {}: {msg}", i + 1);
        let name = cp.metadata.name.clone().unwrap_or_default();
        let p = validate(cp, settings)
            .map_err(|e| where_(format!("{name} is invalid: {}", e.0)))
            .and_then(|p| {
                let refused =
                    |r: class::Refusal| where_(format!("{name} is refused: {}", r.message));
                let Some(c) =
                    class::select(cp, &classes, settings.require_class).map_err(refused)?
                else {
                    return Ok(p);
                };
                let asks: Vec<class::Ask> = all
                    .iter()
                    .filter(|x| {
                        class::class_of(x, &classes).as_deref() == Some(c.name_any().as_str())
                    })
                    .map(|x| class::Ask::of(x, c))
                    .collect();
                class::govern(p, c, class::grant(c, &asks, &class::Ask::of(cp, c))).map_err(refused)
            })?;
        let Children {
            service_account,
            deployment,
            persistent_volume,
            persistent_volume_claim,
            cache_warm_job,
            node_pool,
            trigger_authentication,
            scaled_object,
            query,
        } = build::children(&p);
        let mut emit = |yaml: Result<String, serde_yaml_ng::Error>| {
            out.push(yaml.map_err(|e| where_(e.to_string()))?);
            Ok::<_, String>(())
        };
        if let Some(x) = service_account {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = persistent_volume {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = persistent_volume_claim {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = cache_warm_job {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(mut x) = deployment {
            // What the first apply creates: the scaler takes it from 0.
            if let Some(spec) = x.spec.as_mut() {
                spec.replicas = Some(0);
            }
            emit(serde_yaml_ng::to_string(&x))?;
        }
        // A class's pool is shared: rendered once.
        if let Some(x) = node_pool
            && pools.insert(x.name_any())
        {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = trigger_authentication {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = scaled_object {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        let build::QueryChildren {
            deployment,
            service,
            pod_disruption_budget,
            horizontal_pod_autoscaler,
        } = query;
        if let Some(x) = deployment {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = service {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = pod_disruption_budget {
            emit(serde_yaml_ng::to_string(&x))?;
        }
        if let Some(x) = horizontal_pod_autoscaler {
            emit(serde_yaml_ng::to_string(&x))?;
        }
    }
    if out.is_empty() {
        return Err("no ClipProcessor in the input".into());
    }
    Ok(out.iter().map(|d| format!("---\n{d}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: lakechain.dev/v1alpha1
kind: ClipProcessor
metadata: {name: photos, namespace: media}
spec:
  source: {queueUrl: "https://sqs.us-east-1.amazonaws.com/123456789012/clip-input"}
  output: {topicArn: "arn:aws:sns:us-east-1:123456789012:clip-output"}
  cacheStorage: {bucket: lakechain-cache}
  modelCache: {efs: {fileSystemId: fs-0123456789abcdef0}}
  scaling: {engine: keda}
"#;

    #[test]
    fn renders_every_child_deterministically() {
        let s = OperatorSettings::default();
        let a = render(MANIFEST, &s).unwrap();
        assert_eq!(a, render(MANIFEST, &s).unwrap());
        let kinds: Vec<&str> = a.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "PersistentVolume",
                "PersistentVolumeClaim",
                "Job",
                "Deployment",
                "NodePool",
                "TriggerAuthentication",
                "ScaledObject"
            ]
        );
        assert!(a.contains("replicas: 0"));
    }

    #[test]
    fn invalid_manifests_name_the_problem() {
        let s = OperatorSettings::default();
        let e = render(
            &MANIFEST.replace("engine: keda", "engine: keda, minInstances: 9"),
            &s,
        )
        .unwrap_err();
        assert!(
            e.contains("scaling.minInstances must not be greater than scaling.maxInstances"),
            "{e}"
        );
        let e = render(
            &MANIFEST.replace("scaling: {engine: keda}", "scaling: {maxInstances: many}"),
            &s,
        )
        .unwrap_err();
        assert!(e.contains("spec.scaling.maxInstances"), "{e}");
        // What the API server refuses for its schema, not for a CEL rule.
        let e = render(
            &MANIFEST.replace("scaling: {engine: keda}", "scaling: {maxInstances: 0}"),
            &s,
        )
        .unwrap_err();
        assert!(
            e.contains(
                "spec.scaling.maxInstances: Invalid value: 0: spec.scaling.maxInstances in body should be greater than or equal to 1"
            ),
            "{e}"
        );
        let e = render(
            &MANIFEST.replace(
                "scaling: {engine: keda}",
                "scaling: {engin: keda, maxInstances: 1001}",
            ),
            &s,
        )
        .unwrap_err();
        assert!(
            e.contains("unknown field \"spec.scaling.engin\"")
                && e.contains("less than or equal to 1000"),
            "every violation is listed: {e}"
        );
        let e = render(
            &MANIFEST
                .replace("model", "model: ViT-H/14\n  x")
                .replace("  x", "  modelX"),
            &s,
        )
        .unwrap_err();
        assert!(e.contains("document 1"), "{e}");
        let e = render("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", &s).unwrap_err();
        assert!(
            e.contains("expected apiVersion lakechain.dev/v1alpha1"),
            "{e}"
        );
        assert!(render("", &s).unwrap_err().contains("no ClipProcessor"));
    }

    #[test]
    fn processors_render_under_the_classes_in_the_input() {
        let s = OperatorSettings::default();
        let class = "apiVersion: lakechain.dev/v1alpha1\nkind: ClipProcessorClass\nmetadata: {name: ml}\nspec:\n  compute: {karpenter: {nodeClassRef: {name: gpu}}}\n  budget: {maxGPUs: 2}\n";
        let with_class = MANIFEST.replace(
            "modelCache: {efs: {fileSystemId: fs-0123456789abcdef0}}",
            "className: ml",
        );
        let two = format!(
            "{class}---{with_class}---{}",
            with_class.replace("name: photos", "name: later")
        );
        let out = render(&two, &s).unwrap();
        assert_eq!(
            out.matches("kind: NodePool").count(),
            1,
            "the class pool once"
        );
        assert!(out.contains("name: clip-class-ml"));
        // 2 GPUs for 5 + 5 asked: the first gets 2, the second none (KEDA held at zero).
        assert!(out.contains("maxReplicaCount: 2"), "{out}");
        let e = render(&with_class, &s).unwrap_err();
        assert!(
            e.contains("names ClipProcessorClass \"ml\", which does not exist"),
            "{e}"
        );
        let e = render(
            &format!(
                "{class}---{}",
                MANIFEST.replace(
                    "scaling: {engine: keda}",
                    "scaling: {engine: keda}\n  className: ml"
                )
            ),
            &s,
        )
        .unwrap_err();
        assert!(e.contains("modelCache.efs"), "{e}");
    }
}
