//! Prometheus metrics of `clip-worker serve` (`/metrics`). Names are part of the operations
//! guide and the Grafana dashboard: change them there too.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::preprocess::DecodeMemory;

/// What became of a message.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Embedded, written, published, deleted.
    Succeeded,
    /// A `document-deleted` event, forwarded to the topic.
    Forwarded,
    /// A `document-created` event of a type the worker does not embed: acknowledged, not embedded.
    Skipped,
    /// Nothing to do (S3 test event).
    Ignored,
    /// Cannot succeed: sent to the failure queue or left to the dead-letter queue.
    FailedPermanent,
    /// Failed for now: made visible again later.
    RetriedTransient,
    /// Made visible again at once on shutdown.
    Released,
}

impl MessageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Succeeded => "succeeded",
            MessageOutcome::Forwarded => "forwarded",
            MessageOutcome::Skipped => "skipped",
            MessageOutcome::Ignored => "ignored",
            MessageOutcome::FailedPermanent => "failed_permanent",
            MessageOutcome::RetriedTransient => "retried_transient",
            MessageOutcome::Released => "released",
        }
    }
}

impl EncodeLabelValue for MessageOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: MessageOutcome,
}

/// Pipeline stages with a latency histogram.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Stage {
    Fetch,
    Preprocess,
    Infer,
    Write,
    Publish,
    Delete,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Preprocess => "preprocess",
            Stage::Infer => "infer",
            Stage::Write => "write",
            Stage::Publish => "publish",
            Stage::Delete => "delete",
        }
    }
}

impl EncodeLabelValue for Stage {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: Stage,
}

/// All metrics, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub messages: Family<OutcomeLabel, Counter>,
    pub images_embedded: Counter,
    pub images_failed: Counter,
    pub batch_size: Histogram,
    pub stage_seconds: Family<StageLabel, Histogram>,
    pub queue_wait_seconds: Histogram,
    pub in_flight: Gauge,
    pub ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clip_worker");
        let messages = Family::<OutcomeLabel, Counter>::default();
        registry.register("messages", "Messages handled, by outcome", messages.clone());
        let images_embedded = Counter::default();
        registry.register(
            "images_embedded",
            "Images embedded and written",
            images_embedded.clone(),
        );
        let images_failed = Counter::default();
        registry.register(
            "images_failed",
            "Images that could not be embedded",
            images_failed.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        let stage_seconds = Family::<StageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "stage_seconds",
            "Latency of each pipeline stage",
            stage_seconds.clone(),
        );
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register(
            "queue_wait_seconds",
            "Time from enqueue to receive",
            queue_wait_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_messages",
            "Messages received and not yet finished",
            in_flight.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the model is loaded and the queue reachable",
            ready.clone(),
        );
        Metrics {
            registry,
            messages,
            images_embedded,
            images_failed,
            batch_size,
            stage_seconds,
            queue_wait_seconds,
            in_flight,
            ready,
        }
    }
}

/// The decode-memory budget's gauges, read when scraped.
#[derive(Debug)]
struct DecodeMemoryGauges(DecodeMemory);

impl Collector for DecodeMemoryGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, bytes) in [
            (
                "decode_memory_in_use_bytes",
                "Pixel memory that decodes hold now",
                self.0.in_use(),
            ),
            (
                "decode_memory_budget_bytes",
                "Pixel memory decodes may hold together (DECODE_MEMORY)",
                self.0.total(),
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The metrics of a worker whose decodes share `memory`.
    pub fn with_decode_memory(memory: DecodeMemory) -> Self {
        let mut m = Metrics::default();
        m.registry
            .register_collector(Box::new(DecodeMemoryGauges(memory)));
        m
    }

    pub fn message(&self, outcome: MessageOutcome) {
        self.messages.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn stage(&self, stage: Stage, seconds: f64) {
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::default();
        m.message(MessageOutcome::Succeeded);
        m.message(MessageOutcome::FailedPermanent);
        m.stage(Stage::Infer, 0.02);
        m.batch_size.observe(8.0);
        let text = m.encode();
        for name in [
            "clip_worker_messages_total{outcome=\"succeeded\"} 1",
            "clip_worker_messages_total{outcome=\"failed_permanent\"} 1",
            "clip_worker_stage_seconds_bucket{le=\"0.001\",stage=\"infer\"}",
            "clip_worker_batch_size_count 1",
            "clip_worker_images_embedded_total 0",
            "clip_worker_in_flight_messages 0",
            "clip_worker_ready 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn decode_memory_is_exported_as_it_is_at_scrape_time() {
        let memory = DecodeMemory::new(1_000);
        let m = Metrics::with_decode_memory(memory.clone());
        let held = memory.acquire(300);
        let text = m.encode();
        assert!(
            text.contains("clip_worker_decode_memory_in_use_bytes 300"),
            "{text}"
        );
        assert!(
            text.contains("clip_worker_decode_memory_budget_bytes 1000"),
            "{text}"
        );
        drop(held);
        assert!(
            m.encode()
                .contains("clip_worker_decode_memory_in_use_bytes 0")
        );
    }

    #[test]
    fn the_dashboard_and_the_operations_guide_query_metrics_that_exist() {
        use MessageOutcome::*;
        let m = Metrics::with_decode_memory(DecodeMemory::default());
        for o in [
            Succeeded,
            Forwarded,
            Skipped,
            Ignored,
            FailedPermanent,
            RetriedTransient,
            Released,
        ] {
            m.message(o);
        }
        m.stage(Stage::Fetch, 0.01);
        m.batch_size.observe(4.0);
        m.queue_wait_seconds.observe(1.0);
        let text = m.encode();
        let exposed = clip_contract::metrics::exposed(&text);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for doc in [
            "charts/clip-operator/dashboards/clip-operator.json",
            "docs/operations.md",
            "charts/clip-operator/templates/prometheusrule.yaml",
        ] {
            let body = std::fs::read_to_string(root.join(doc)).unwrap();
            let names = clip_contract::metrics::referenced(&body, "clip_worker_");
            assert!(!names.is_empty(), "{doc} names no worker metric");
            for name in names {
                assert!(
                    exposed.contains(&name),
                    "{doc} uses {name}, which the worker does not export: {exposed:?}"
                );
            }
            for outcome in ["failed_permanent", "retried_transient"] {
                if body.contains(outcome) {
                    assert!(text.contains(&format!("outcome=\"{outcome}\"")));
                }
            }
        }
    }
}
