//! Prometheus metrics of the operator (`/metrics`): reconciles, failures, durations, per-processor
//! conditions, scaler decisions and the queue depth it saw.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessorLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub name: String,
    pub condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChildLabels {
    pub child: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub namespace: String,
    pub name: String,
    pub state: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub apply_failures: Family<ChildLabels, Counter>,
    pub duration: Histogram,
    pub condition: Family<ConditionLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub desired_replicas: Family<ProcessorLabels, Gauge>,
    pub queue_messages: Family<QueueLabels, Gauge>,
    pub queue_reads: Counter,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clip_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        let apply_failures = Family::<ChildLabels, Counter>::default();
        registry.register(
            "apply_failures",
            "Children the API server refused, by kind (one count per refused write)",
            apply_failures.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 13));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconciliation",
            duration.clone(),
        );
        let condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "processor_condition",
            "1 when the processor's condition is True",
            condition.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "scaler_decisions",
            "Builtin scaler decisions that changed replicas",
            decisions.clone(),
        );
        let desired_replicas = Family::<ProcessorLabels, Gauge>::default();
        registry.register(
            "desired_replicas",
            "Workers the scaler asked for",
            desired_replicas.clone(),
        );
        let queue_messages = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Queue depth the builtin scaler read",
            queue_messages.clone(),
        );
        let queue_reads = Counter::default();
        registry.register(
            "queue_reads",
            "GetQueueAttributes calls of the builtin scaler",
            queue_reads.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 on the replica holding the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            apply_failures,
            duration,
            condition,
            decisions,
            desired_replicas,
            queue_messages,
            queue_reads,
            leader,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Drops a deleted processor's series.
    /// One refused write of this kind of child, in `clip_operator_apply_failures_total`.
    pub fn count_refused(&self, child: &str) {
        self.apply_failures
            .get_or_create(&ChildLabels {
                child: child.into(),
            })
            .inc();
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        for c in [
            "Ready",
            "Progressing",
            "Degraded",
            "CacheReady",
            "NodePoolReady",
            "ScalerReady",
            "WorkersAvailable",
            "Suspended",
        ] {
            self.condition.remove(&ConditionLabels {
                namespace: namespace.into(),
                name: name.into(),
                condition: c.into(),
            });
        }
        self.desired_replicas.remove(&ProcessorLabels {
            namespace: namespace.into(),
            name: name.into(),
        });
        for state in ["visible", "in_flight"] {
            self.queue_messages.remove(&QueueLabels {
                namespace: namespace.into(),
                name: name.into(),
                state: state.into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_and_the_operations_guide_query_metrics_that_exist() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.failures
            .get_or_create(&ErrorLabels {
                error: "kube".into(),
            })
            .inc();
        m.apply_failures
            .get_or_create(&ChildLabels {
                child: "NodePool".into(),
            })
            .inc();
        m.duration.observe(0.1);
        let p = ProcessorLabels {
            namespace: "media".into(),
            name: "photos".into(),
        };
        m.condition
            .get_or_create(&ConditionLabels {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                condition: "Ready".into(),
            })
            .set(1);
        m.decisions
            .get_or_create(&DecisionLabels {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                reason: "scale-up".into(),
            })
            .inc();
        m.desired_replicas.get_or_create(&p).set(2);
        m.queue_messages
            .get_or_create(&QueueLabels {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                state: "visible".into(),
            })
            .set(5);
        let exposed = clip_contract::metrics::exposed(&m.encode());
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for doc in [
            "charts/clip-operator/dashboards/clip-operator.json",
            "docs/operations.md",
            "charts/clip-operator/templates/prometheusrule.yaml",
        ] {
            let text = std::fs::read_to_string(root.join(doc)).unwrap();
            let names = clip_contract::metrics::referenced(&text, "clip_operator_");
            assert!(!names.is_empty(), "{doc} names no operator metric");
            for name in names {
                assert!(
                    exposed.contains(&name),
                    "{doc} uses {name}, which the operator does not export: {exposed:?}"
                );
            }
        }
    }
}
