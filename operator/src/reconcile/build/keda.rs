//! `engine: keda`: a `ScaledObject` with KEDA's aws-sqs-queue trigger, with exactly the settings
//! the builtin scaler uses, and its `TriggerAuthentication` (AWS pod identity).
//!
//! Until the cache-warm Job has filled the shared model cache the ScaledObject carries KEDA's
//! `autoscaling.keda.sh/paused-replicas: "0"`, so KEDA holds the workers at zero exactly as the
//! builtin scaler does; the next apply after the Job succeeds drops the annotation.

use std::collections::BTreeMap;

use super::{meta, names};
use crate::crd::IdentityOwner;
use crate::external::keda_scaled_object::{
    ScaledObject, ScaledObjectAdvanced, ScaledObjectAdvancedHorizontalPodAutoscalerConfig,
    ScaledObjectAdvancedHorizontalPodAutoscalerConfigBehavior,
    ScaledObjectAdvancedHorizontalPodAutoscalerConfigBehaviorScaleDown, ScaledObjectFallback,
    ScaledObjectFallbackBehavior, ScaledObjectScaleTargetRef, ScaledObjectSpec,
    ScaledObjectTriggers, ScaledObjectTriggersAuthenticationRef,
};
use crate::external::keda_trigger_authentication::{
    TriggerAuthentication, TriggerAuthenticationPodIdentity,
    TriggerAuthenticationPodIdentityIdentityOwner, TriggerAuthenticationPodIdentityProvider,
    TriggerAuthenticationSpec,
};
use crate::reconcile::validate::ValidatedProcessor;
use crate::scaler::stabilization_seconds;

/// The role KEDA assumes: scaling.kedaRoleArn, else the workers' role; none: KEDA's own identity.
/// With `identityOwner: workload` KEDA takes the workers' role from their ServiceAccount itself.
fn keda_role(p: &ValidatedProcessor) -> Option<String> {
    if workload_identity(p) {
        return None;
    }
    p.spec
        .scaling
        .keda_role_arn
        .clone()
        .or_else(|| p.spec.service_account.role_arn.clone())
}

fn workload_identity(p: &ValidatedProcessor) -> bool {
    p.spec.scaling.identity_owner == Some(IdentityOwner::Workload)
}

pub fn trigger_authentication(p: &ValidatedProcessor) -> TriggerAuthentication {
    TriggerAuthentication {
        metadata: meta(p, names::trigger_authentication(p), "scaler"),
        spec: TriggerAuthenticationSpec {
            pod_identity: Some(TriggerAuthenticationPodIdentity {
                provider: TriggerAuthenticationPodIdentityProvider::Aws,
                role_arn: keda_role(p),
                external_id: None,
                identity_authority_host: None,
                identity_id: None,
                identity_owner: workload_identity(p)
                    .then_some(TriggerAuthenticationPodIdentityIdentityOwner::Workload),
                identity_tenant_id: None,
            }),
            ..Default::default()
        },
        status: None,
    }
}

pub fn scaled_object(p: &ValidatedProcessor) -> ScaledObject {
    let s = &p.spec.scaling;
    let metadata = BTreeMap::from([
        ("queueURL".to_string(), p.spec.source.queue_url.clone()),
        ("awsRegion".to_string(), p.region.clone()),
        (
            "queueLength".to_string(),
            s.messages_per_instance.to_string(),
        ),
        (
            "activationQueueLength".to_string(),
            s.activation_queue_length.to_string(),
        ),
        // Busy workers keep the scaler active: never scaled away in the middle of a batch.
        ("scaleOnInFlight".to_string(), "true".to_string()),
    ])
    .into_iter()
    // The endpoint the workers reach SQS at (an emulator, a private endpoint) is the one KEDA
    // reads the queue at.
    .chain(
        p.settings
            .aws_endpoint_url
            .clone()
            .map(|e| ("awsEndpoint".to_string(), e)),
    )
    .collect();
    ScaledObject {
        metadata: meta(p, names::scaled_object(p), "scaler"),
        spec: ScaledObjectSpec {
            scale_target_ref: ScaledObjectScaleTargetRef {
                api_version: Some("apps/v1".into()),
                kind: Some("Deployment".into()),
                name: names::worker(p),
                env_source_container_name: None,
            },
            polling_interval: Some(s.polling_interval_seconds),
            cooldown_period: Some(s.cooldown_seconds),
            min_replica_count: Some(s.min_instances),
            max_replica_count: Some(s.max_instances),
            fallback: s.fallback.as_ref().map(|f| ScaledObjectFallback {
                behavior: Some(ScaledObjectFallbackBehavior::Static),
                failure_threshold: f.failure_threshold,
                replicas: f.replicas,
            }),
            advanced: Some(ScaledObjectAdvanced {
                horizontal_pod_autoscaler_config: Some(ScaledObjectAdvancedHorizontalPodAutoscalerConfig {
                    behavior: Some(ScaledObjectAdvancedHorizontalPodAutoscalerConfigBehavior {
                        scale_down: Some(ScaledObjectAdvancedHorizontalPodAutoscalerConfigBehaviorScaleDown {
                            stabilization_window_seconds: Some(stabilization_seconds(s)),
                            ..Default::default()
                        }),
                        scale_up: None,
                    }),
                    name: None,
                }),
                ..Default::default()
            }),
            triggers: vec![ScaledObjectTriggers {
                r#type: "aws-sqs-queue".into(),
                name: Some("sqs".into()),
                metadata,
                authentication_ref: Some(ScaledObjectTriggersAuthenticationRef {
                    name: names::trigger_authentication(p),
                    kind: None,
                }),
                metric_type: None,
                use_cached_metrics: None,
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// KEDA's annotation that pins the target at a replica count and stops autoscaling.
pub const PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// Holds the workers at zero (KEDA's paused-replicas) while the model cache is not warm yet.
pub fn hold_until_warm(so: &mut ScaledObject, warmed: bool) {
    if warmed {
        return;
    }
    so.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PAUSED_REPLICAS.to_string(), "0".to_string());
}

#[cfg(test)]
mod tests {
    use super::super::tests::processor;
    use super::*;
    use serde_json::json;

    #[test]
    fn the_scaled_object_mirrors_the_builtin_settings() {
        let p = processor(
            json!({"scaling": {"engine": "keda", "maxInstances": 9, "messagesPerInstance": 25, "pollingIntervalSeconds": 20, "cooldownSeconds": 120}}),
        );
        let so = scaled_object(&p);
        assert_eq!(so.spec.scale_target_ref.name, "photos-worker");
        assert_eq!(
            (so.spec.min_replica_count, so.spec.max_replica_count),
            (Some(0), Some(9))
        );
        assert_eq!(
            (so.spec.polling_interval, so.spec.cooldown_period),
            (Some(20), Some(120))
        );
        let t = &so.spec.triggers[0];
        assert_eq!(t.r#type, "aws-sqs-queue");
        assert_eq!(t.metadata["queueLength"], "25");
        assert_eq!(t.metadata["activationQueueLength"], "0");
        assert_eq!(t.metadata["scaleOnInFlight"], "true");
        assert_eq!(t.metadata["awsRegion"], "eu-west-1");
        assert_eq!(t.authentication_ref.as_ref().unwrap().name, "photos-sqs");
        let down = so
            .spec
            .advanced
            .unwrap()
            .horizontal_pod_autoscaler_config
            .unwrap()
            .behavior
            .unwrap()
            .scale_down
            .unwrap();
        assert_eq!(down.stabilization_window_seconds, Some(120));
        assert!(
            !t.metadata.contains_key("awsEndpoint"),
            "the SDK's own endpoint"
        );
    }

    #[test]
    fn activation_fallback_and_workload_identity_reach_keda() {
        let p = processor(json!({
            "serviceAccount": {"roleArn": "arn:aws:iam::123456789012:role/w"},
            "scaling": {"engine": "keda", "activationQueueLength": 40, "identityOwner": "workload",
                        "fallback": {"failureThreshold": 3, "replicas": 2}}
        }));
        let so = scaled_object(&p);
        assert_eq!(so.spec.triggers[0].metadata["activationQueueLength"], "40");
        let f = so.spec.fallback.unwrap();
        assert_eq!((f.failure_threshold, f.replicas), (3, 2));
        assert_eq!(f.behavior, Some(ScaledObjectFallbackBehavior::Static));
        let pi = trigger_authentication(&p).spec.pod_identity.unwrap();
        assert_eq!(
            (pi.identity_owner, pi.role_arn),
            (
                Some(TriggerAuthenticationPodIdentityIdentityOwner::Workload),
                None
            ),
            "KEDA reads the role from the workers' ServiceAccount; roleArn would contradict it"
        );
        let p = processor(json!({"scaling": {"engine": "keda"}}));
        assert!(scaled_object(&p).spec.fallback.is_none());
        assert!(
            trigger_authentication(&p)
                .spec
                .pod_identity
                .unwrap()
                .identity_owner
                .is_none()
        );
    }

    #[test]
    fn keda_reads_the_queue_at_the_workers_endpoint() {
        let mut p = processor(json!({"scaling": {"engine": "keda"}}));
        p.settings.aws_endpoint_url = Some("http://10.88.0.1:5000".into());
        let so = scaled_object(&p);
        assert_eq!(
            so.spec.triggers[0].metadata["awsEndpoint"],
            "http://10.88.0.1:5000"
        );
    }

    #[test]
    fn the_workers_stay_at_zero_until_the_cache_is_warm() {
        let p = processor(json!({"scaling": {"engine": "keda"}}));
        let mut so = scaled_object(&p);
        hold_until_warm(&mut so, false);
        assert_eq!(
            so.metadata.annotations.as_ref().unwrap()[PAUSED_REPLICAS],
            "0"
        );
        let mut so = scaled_object(&p);
        hold_until_warm(&mut so, true);
        assert!(so.metadata.annotations.is_none());
    }

    #[test]
    fn the_trigger_authentication_uses_aws_pod_identity() {
        let ta = trigger_authentication(&processor(
            json!({"serviceAccount": {"roleArn": "arn:aws:iam::123456789012:role/w"}}),
        ));
        let pi = ta.spec.pod_identity.unwrap();
        assert_eq!(pi.provider, TriggerAuthenticationPodIdentityProvider::Aws);
        assert_eq!(
            pi.role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/w")
        );
        let ta = trigger_authentication(&processor(
            json!({"scaling": {"kedaRoleArn": "arn:aws:iam::123456789012:role/k"}}),
        ));
        assert_eq!(
            ta.spec.pod_identity.unwrap().role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/k")
        );
        assert_eq!(
            trigger_authentication(&processor(json!({})))
                .spec
                .pod_identity
                .unwrap()
                .role_arn,
            None
        );
    }
}
