//! The data path: receive -> fetch -> preprocess -> batch -> infer -> write -> publish -> delete,
//! as tasks connected by bounded channels. A semaphore caps the messages in flight, so memory
//! does not grow with queue depth; a heartbeat keeps every in-flight message invisible to other
//! workers; a message is deleted only after each of its documents is written and published.
//! Each stage is a file of its own; the delivery rules are the ledger's (`service::ledger`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::ServeConfig;
use super::http::Health;
use super::ledger::{Accepted, Disposition, Ledger, MsgKey, Policy, Received};
use super::metrics::{MessageOutcome, Metrics, Stage};
use crate::aws::{Aws, Failure};
use crate::event::{self, CloudEvent, DOCUMENT_DELETED, Enrichment};
use crate::preprocess::{ImageFormat, PreparedImage, Preprocessor};

mod batch;
mod drain;
mod fetch;
mod finalize;
mod heartbeat;
mod output;
mod receive;

pub use batch::inference_loop;

/// Long-poll wait of each receive. Shorter than SQS's 20 s maximum so a draining worker stops
/// within seconds; an idle worker's extra polls cost nothing once it has scaled to zero.
pub const LONG_POLL_SECONDS: i32 = 10;

/// A message in flight, holding its in-flight permit.
type Tracked = super::ledger::Tracked<OwnedSemaphorePermit>;

/// One document of a message.
pub struct Job {
    key: MsgKey,
    event: CloudEvent,
}

/// A document ready for the model.
pub struct Ready {
    job: Job,
    image: PreparedImage,
    content_id: String,
}

/// Work for the output stage.
pub enum Output {
    Embedded {
        job: Job,
        content_id: String,
        embedding: Vec<f32>,
        keywords: Vec<String>,
    },
    Forward(Job),
    Failed {
        job: Job,
        failure: Failure,
    },
}

/// Facts about the loaded model the output stage needs.
#[derive(Clone)]
pub struct ModelInfo {
    pub name: &'static str,
    pub slug: &'static str,
    pub dimensions: usize,
}

/// State shared by all stages.
pub struct Pipeline {
    cfg: ServeConfig,
    aws: Aws,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    model: ModelInfo,
    preprocessor: Preprocessor,
    pool: rayon::ThreadPool,
    ledger: std::sync::Mutex<Ledger<OwnedSemaphorePermit>>,
    permits: Arc<Semaphore>,
    /// Finished messages whose delete/retry/dead-letter call is still running.
    finalizing: AtomicUsize,
    /// From the queue's redrive policy, if it has one.
    max_receives: Option<u32>,
}

/// Senders into the stages, held by the receivers.
#[derive(Clone)]
struct Inlets {
    fetch: mpsc::Sender<Job>,
    output: mpsc::Sender<Output>,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: ServeConfig,
        aws: Aws,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        model: ModelInfo,
        preprocessor: Preprocessor,
        pool: rayon::ThreadPool,
        max_receives: Option<u32>,
    ) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
        Arc::new(Pipeline {
            cfg,
            aws,
            metrics,
            health,
            model,
            preprocessor,
            pool,
            ledger: Default::default(),
            permits,
            finalizing: AtomicUsize::new(0),
            max_receives,
        })
    }

    /// Runs every stage until `shutdown` turns true, then drains for the grace period and makes
    /// what is left visible again at once. `batches` feeds the inference thread, whose results
    /// come back on `results`.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        batches: mpsc::Sender<Vec<Ready>>,
        results: mpsc::Receiver<Output>,
    ) {
        let cap = self.cfg.max_in_flight.max(self.cfg.batch_size).max(1);
        let (fetch_tx, fetch_rx) = mpsc::channel::<Job>(cap);
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>(cap);
        let (output_tx, output_rx) = mpsc::channel::<Output>(cap);
        let inlets = Inlets {
            fetch: fetch_tx,
            output: output_tx.clone(),
        };

        let mut receivers = tokio::task::JoinSet::new();
        for _ in 0..self.cfg.receive_concurrency.max(1) {
            receivers.spawn(self.clone().receiver(inlets.clone(), shutdown.clone()));
        }
        drop(inlets);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(
            self.clone()
                .fetch_stage(fetch_rx, ready_tx, output_tx.clone()),
        );
        tasks.spawn(self.clone().batcher(ready_rx, batches));
        tasks.spawn(forward_results(results, output_tx));
        tasks.spawn(self.clone().output_stage(output_rx));
        tasks.spawn(self.clone().heartbeat());
        tasks.spawn(self.clone().progress());

        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        self.drain(receivers).await;
        tasks.abort_all();
    }
}

/// Passes the inference thread's results to the output stage.
async fn forward_results(mut results: mpsc::Receiver<Output>, output: mpsc::Sender<Output>) {
    while let Some(r) = results.recv().await {
        if output.send(r).await.is_err() {
            return;
        }
    }
}

/// The vector file's key.
pub fn vector_key(service: &str, slug: &str, content_id: &str) -> String {
    format!("{service}/{slug}/{content_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_models_and_keep_the_seed_prefix() {
        assert_eq!(
            vector_key("clip-image-processor", "ViT-B-32", "abc"),
            "clip-image-processor/ViT-B-32/abc"
        );
        assert_ne!(
            vector_key("s", "ViT-B-32", "abc"),
            vector_key("s", "ViT-L-14", "abc")
        );
    }
}
