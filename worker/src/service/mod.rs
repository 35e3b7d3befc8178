//! `clip-worker serve`: the queue worker, a drop-in for the seed's ECS container (same
//! environment, events and vector files), batched, concurrent and at-least-once.
//!
//! Start-up order: HTTP probes first (so a slow model load reads as "starting", not "dead"),
//! then the weights (downloaded once to the shared cache if missing), then the model on its own
//! thread, then the queue. SIGTERM/SIGINT drain (see [`pipeline`]).

pub mod batcher;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod pipeline;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};

use crate::aws::Aws;
use crate::engine::{Engine, EngineConfig};
use crate::model::Placement;
use crate::preprocess::Preprocessor;
use crate::weights::{self, WeightsConfig};
use http::Health;
use metrics::Metrics;
use pipeline::{ModelInfo, Pipeline};

/// Everything `serve` needs, parsed from flags and the environment.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub queue_url: String,
    /// Output topic; `None`: events are not published (as the seed when `SNS_TARGET_TOPIC` is empty).
    pub topic: Option<String>,
    /// Cache bucket for vector files.
    pub bucket: String,
    pub service_name: String,
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`: one endpoint for S3, SQS and SNS.
    pub aws_endpoint_url: Option<String>,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub max_in_flight: usize,
    pub fetch_concurrency: usize,
    pub receive_concurrency: usize,
    pub decode_threads: Option<usize>,
    pub visibility: Duration,
    pub grace: Duration,
    pub failure_queue: Option<String>,
    pub top_k: usize,
    pub progress_interval: Duration,
    pub http_port: u16,
}

impl ServeConfig {
    /// The visibility timeout in whole seconds (SQS's unit), at least 1.
    pub fn visibility_secs(&self) -> i32 {
        self.visibility.as_secs().clamp(1, 43_200) as i32
    }
}

/// Model-side settings of `serve`.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Where the weights are; its `spec` is the model served.
    pub weights: WeightsConfig,
    pub device: crate::model::DeviceChoice,
    pub precision: crate::model::PrecisionChoice,
    pub labels: crate::engine::LabelSource,
    pub torch_threads: Option<i32>,
    /// Limits and options; its `size` is replaced by the model's input size once loaded.
    pub preprocessor: Preprocessor,
}

/// Runs the worker until a termination signal; returns after draining.
pub async fn serve(cfg: ServeConfig, model: ModelSettings) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::with_decode_memory(
        model.preprocessor.memory.clone(),
    ));
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", cfg.http_port))
        .await
        .with_context(|| format!("cannot listen on port {}", cfg.http_port))?;
    tracing::info!(port = cfg.http_port, "serving /healthz, /readyz, /metrics");
    let app = http::router(health.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("termination signal: no new messages, finishing those in flight");
        let _ = stop_tx.send(true);
    });

    let aws = Aws::from_env(cfg.region.clone(), cfg.aws_endpoint_url.clone()).await;
    let weights_dir = weights::ensure(&model.weights, Some(&aws))
        .await
        .context("model weights are not available")?;

    // The model lives on its own thread; batches come in, results go out.
    let (batch_tx, batch_rx) = mpsc::channel(2);
    let (result_tx, result_rx) = mpsc::channel(cfg.max_in_flight.max(cfg.batch_size).max(1));
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let engine_cfg = EngineConfig {
        weights: weights_dir,
        spec: model.weights.spec,
        placement: Placement::detect(model.device, model.precision)?,
        labels: model.labels.clone(),
        text_queries: false,
    };
    let top_k = cfg.top_k;
    let (thread_metrics, thread_health) = (metrics.clone(), health.clone());
    let torch_threads = model.torch_threads;
    let inference = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            if let Some(n) = torch_threads {
                tch::set_num_threads(n.max(1));
            }
            let engine = match Engine::load(&engine_cfg) {
                Ok(e) => e,
                Err(e) => {
                    let _ = loaded_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let info = ModelInfo {
                name: engine.spec().name,
                slug: engine.spec().slug,
                dimensions: engine.dimensions(),
            };
            let _ = loaded_tx.send(Ok((info, engine.image_size())));
            thread_health.inference_alive.store(true, Ordering::Relaxed);
            pipeline::inference_loop(&engine, top_k, &thread_metrics, batch_rx, result_tx);
            thread_health
                .inference_alive
                .store(false, Ordering::Relaxed);
        })?;
    // The queue side owns the batch sender, so when it ends, however it ends, the inference thread
    // finishes the batch it holds and returns.
    let outcome = async move {
        let (info, image_size) = loaded_rx
            .await
            .map_err(|_| anyhow::anyhow!("the inference thread died while loading the model"))?
            .map_err(|e| anyhow::anyhow!("cannot load the model: {e}"))?;
        health.model_loaded.store(true, Ordering::Relaxed);

        let max_receives = match aws.redrive_max_receives(&cfg.queue_url).await {
            Ok(m) => {
                health.queue_reachable.store(true, Ordering::Relaxed);
                if m.is_none() && cfg.failure_queue.is_none() {
                    tracing::warn!(
                        queue = %cfg.queue_url,
                        "the input queue has no redrive policy and FAILURE_QUEUE_URL is unset: messages that cannot be processed are retried with backoff and never dead-lettered"
                    );
                }
                m
            }
            Err(e) => {
                tracing::error!("cannot read the input queue's attributes: {e}");
                None
            }
        };
        if cfg.topic.is_none() {
            tracing::warn!("SNS_TARGET_TOPIC is empty: enriched events are not published");
        }
        let pool = decode_pool(cfg.decode_threads)?;
        let preprocessor = Preprocessor {
            size: image_size,
            ..model.preprocessor
        };
        tracing::info!(
            queue = %cfg.queue_url, bucket = %cfg.bucket, model = info.name, batch_size = cfg.batch_size,
            max_in_flight = cfg.max_in_flight, "worker started"
        );
        let pipeline = Pipeline::new(
            cfg,
            aws,
            metrics,
            health,
            info,
            preprocessor,
            pool,
            max_receives,
        );
        pipeline.run(stop_rx, batch_tx, result_rx).await;
        anyhow::Ok(())
    }
    .await;
    // Wait for it: a process that exits while libtorch still runs on another thread races
    // libtorch's global destructors (oneDNN unmaps the code of its kernels): a segfault at exit
    // instead of a clean one.
    if let Ok(Err(_)) = tokio::task::spawn_blocking(move || inference.join()).await {
        tracing::error!("the inference thread panicked");
    }
    tracing::info!("stopped");
    outcome
}

/// The thread pool that decodes and preprocesses (default: one thread per core).
pub fn decode_pool(threads: Option<usize>) -> anyhow::Result<rayon::ThreadPool> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .context("cannot start the decode threads")
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
