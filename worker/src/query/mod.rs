//! `clip-worker query`: text and image embeddings over HTTP, from the same engine, weights and
//! preprocessing as the queue worker, so a search query lands in the vector space of the stored
//! vectors. OpenAI's embeddings API (`POST /v1/embeddings`), with image inputs as an extension.
//!
//! One thread owns the model. Requests are split into inputs, images are preprocessed on the
//! decode pool, and every input goes through the worker's batcher ([`crate::service::batcher`]),
//! so concurrent requests share forward passes. The inputs accepted and not yet answered are
//! bounded (`QUERY_MAX_QUEUE`): beyond it a request gets `429` with `Retry-After`.

pub mod api;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::engine::{Engine, EngineConfig, LabelSource};
use crate::model::Placement;
use crate::preprocess::{PreparedImage, Preprocessor};
use crate::service::ModelSettings;
use crate::tokenizer::ClipTokenizer;
use api::{ApiError, Input, RequestLimits, Usage};

/// Everything `clip-worker query` needs besides the model.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub http_port: u16,
    /// Inputs per forward pass.
    pub batch_size: usize,
    /// Extra wait for a batch to fill once the model is free (see
    /// [`crate::service::batcher::run_when_free`]).
    pub batch_wait: Duration,
    /// Inputs accepted and not yet answered, over all requests; also the most requests in
    /// progress at once.
    pub max_queue: usize,
    pub limits: RequestLimits,
    /// Bytes of one request body.
    pub max_body_bytes: usize,
    /// Default for requests that do not say: L2-normalised vectors (`true`) or the raw features
    /// the queue worker stores (`false`).
    pub normalize: bool,
    pub decode_threads: Option<usize>,
    pub aws_region: Option<String>,
    pub aws_endpoint_url: Option<String>,
}

impl QueryConfig {
    /// Checks settings that only make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.limits.max_inputs > self.max_queue {
            return Err(format!(
                "QUERY_MAX_INPUTS ({}) is over QUERY_MAX_QUEUE ({}): such a request could never be queued",
                self.limits.max_inputs, self.max_queue
            ));
        }
        if self.max_queue == 0 || self.limits.max_inputs == 0 || self.batch_size == 0 {
            return Err(
                "QUERY_MAX_QUEUE, QUERY_MAX_INPUTS and BATCH_SIZE must be at least 1".into(),
            );
        }
        Ok(())
    }
}

/// Prometheus metrics of the query endpoint (`clip_query_*`).
pub struct QueryMetrics {
    registry: Registry,
    pub requests: Family<CodeLabel, Counter>,
    pub request_seconds: Histogram,
    pub inputs: Family<KindLabel, Counter>,
    pub batch_size: Family<KindLabel, Histogram, fn() -> Histogram>,
    pub forward_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    pub queue_depth: Gauge,
    pub queue_limit: Gauge,
    pub ready: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl QueryMetrics {
    pub fn new(max_queue: usize) -> Self {
        let mut registry = Registry::with_prefix("clip_query");
        let requests = Family::<CodeLabel, Counter>::default();
        registry.register(
            "requests",
            "Embedding requests answered, by HTTP status",
            requests.clone(),
        );
        let request_seconds = seconds_histogram();
        registry.register(
            "request_duration_seconds",
            "Time from request to response",
            request_seconds.clone(),
        );
        let inputs = Family::<KindLabel, Counter>::default();
        registry.register(
            "inputs",
            "Inputs embedded, by kind (text, image)",
            inputs.clone(),
        );
        let batch_size: Family<KindLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(batch_histogram);
        registry.register(
            "batch_size",
            "Inputs per forward pass, by tower (text, image)",
            batch_size.clone(),
        );
        let forward_seconds: Family<KindLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "forward_seconds",
            "Time of one forward pass, by tower",
            forward_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Inputs accepted and not yet answered",
            queue_depth.clone(),
        );
        let queue_limit = Gauge::default();
        queue_limit.set(max_queue as i64);
        registry.register(
            "queue_limit",
            "Inputs that may wait at once (QUERY_MAX_QUEUE); beyond it requests get 429",
            queue_limit.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the endpoint answers queries",
            ready.clone(),
        );
        QueryMetrics {
            registry,
            requests,
            request_seconds,
            inputs,
            batch_size,
            forward_seconds,
            queue_depth,
            queue_limit,
            ready,
        }
    }

    fn kind(kind: &str) -> KindLabel {
        KindLabel { kind: kind.into() }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One input waiting for the model.
enum Job {
    Text(String),
    Image(PreparedImage),
}

struct Item {
    job: Job,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// What is known once the model has loaded.
struct Loaded {
    name: &'static str,
    slug: &'static str,
    hf_repo: &'static str,
    dimensions: usize,
    tokenizer: ClipTokenizer,
    preprocessor: Preprocessor,
}

struct Shared {
    cfg: QueryConfig,
    metrics: Arc<QueryMetrics>,
    loaded: OnceLock<Loaded>,
    draining: AtomicBool,
    inference_alive: Arc<AtomicBool>,
    /// Inputs accepted and not yet answered.
    queue: Arc<Semaphore>,
    /// Requests in progress (bounds the request bodies held in memory).
    requests: Arc<Semaphore>,
    items: mpsc::Sender<Item>,
    pool: rayon::ThreadPool,
}

/// Runs the endpoint until SIGTERM/SIGINT, then finishes the requests in progress and returns.
pub async fn serve(cfg: QueryConfig, model: ModelSettings) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", cfg.http_port))
        .await
        .with_context(|| format!("cannot listen on port {}", cfg.http_port))?;
    tracing::info!(
        port = cfg.http_port,
        "serving /v1/embeddings, /v1/models, /healthz, /readyz, /metrics"
    );
    let (items_tx, items_rx) = mpsc::channel::<Item>(cfg.max_queue);
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<Item>>(1);
    // The inference thread gives this permit back after each batch (continuous batching).
    let model_free = Arc::new(Semaphore::new(1));
    let shared = Arc::new(Shared {
        metrics: Arc::new(QueryMetrics::new(cfg.max_queue)),
        loaded: OnceLock::new(),
        draining: AtomicBool::new(false),
        inference_alive: Arc::new(AtomicBool::new(false)),
        queue: Arc::new(Semaphore::new(cfg.max_queue)),
        requests: Arc::new(Semaphore::new(cfg.max_queue)),
        items: items_tx,
        pool: crate::service::decode_pool(cfg.decode_threads)?,
        cfg: cfg.clone(),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let on_signal = shared.clone();
    tokio::spawn(async move {
        crate::service::wait_for_signal().await;
        tracing::info!("termination signal: not ready, finishing the requests in progress");
        on_signal.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(());
    });
    let server = tokio::spawn(
        axum::serve(listener, router(shared.clone()))
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .into_future(),
    );

    let aws = crate::aws::Aws::from_env(cfg.aws_region.clone(), cfg.aws_endpoint_url.clone()).await;
    let weights_dir = crate::weights::ensure(&model.weights, Some(&aws))
        .await
        .context("model weights are not available")?;
    let engine_cfg = EngineConfig {
        weights: weights_dir.clone(),
        spec: model.weights.spec,
        placement: Placement::detect(model.device, model.precision)?,
        labels: LabelSource::Off,
        text_queries: true,
    };
    let (loaded_tx, loaded_rx) = oneshot::channel();
    // Not `shared`: it holds the inputs' sender, whose end is what stops this thread.
    let (metrics, alive) = (shared.metrics.clone(), shared.inference_alive.clone());
    let free = model_free.clone();
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
            let _ = loaded_tx.send(Ok((
                engine.image_size(),
                engine.text_context(),
                engine.dimensions(),
            )));
            alive.store(true, Ordering::Relaxed);
            inference_loop(&engine, &metrics, batch_rx, &free);
            alive.store(false, Ordering::Relaxed);
        })?;
    tokio::spawn(crate::service::batcher::run_when_free(
        items_rx,
        cfg.batch_size,
        cfg.batch_wait,
        model_free,
        batch_tx,
        |_| {},
    ));

    let (image_size, context, dimensions) = loaded_rx
        .await
        .map_err(|_| anyhow::anyhow!("the inference thread died while loading the model"))?
        .map_err(|e| anyhow::anyhow!("cannot load the model: {e}"))?;
    let spec = model.weights.spec;
    let loaded = Loaded {
        name: spec.name,
        slug: spec.slug,
        hf_repo: spec.hf_repo,
        dimensions,
        tokenizer: ClipTokenizer::from_dir(&weights_dir, context)?,
        preprocessor: Preprocessor {
            size: image_size,
            ..model.preprocessor
        },
    };
    let _ = shared.loaded.set(loaded);
    tracing::info!(
        model = spec.name,
        batch_size = cfg.batch_size,
        max_queue = cfg.max_queue,
        "query endpoint ready"
    );
    // The batcher and the inference thread end when the last sender of inputs is gone: the
    // server's handlers hold it, and they are dropped when the server has finished.
    drop(shared);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("HTTP server stopped: {e}"),
        Err(e) => tracing::error!("HTTP server task failed: {e}"),
    }
    // As in `serve`: never exit while libtorch runs on another thread.
    if let Ok(Err(_)) = tokio::task::spawn_blocking(move || inference.join()).await {
        tracing::error!("the inference thread panicked");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the model on batches of inputs: the texts of a batch in one forward pass, its images in
/// another; gives `free` a permit back after each batch.
fn inference_loop(
    engine: &Engine,
    metrics: &QueryMetrics,
    mut batches: mpsc::Receiver<Vec<Item>>,
    free: &Semaphore,
) {
    while let Some(batch) = batches.blocking_recv() {
        run_batch(engine, metrics, batch);
        free.add_permits(1);
    }
}

fn run_batch(engine: &Engine, metrics: &QueryMetrics, batch: Vec<Item>) {
    let (texts, images): (Vec<Item>, Vec<Item>) = batch
        .into_iter()
        .partition(|i| matches!(i.job, Job::Text(_)));
    if !texts.is_empty() {
        let strings: Vec<&str> = texts
            .iter()
            .map(|i| match &i.job {
                Job::Text(t) => t.as_str(),
                Job::Image(_) => "",
            })
            .collect();
        let started = Instant::now();
        let out = engine.embed_texts(&strings).map_err(|e| e.to_string());
        observe(metrics, "text", strings.len(), started);
        reply(texts, out);
    }
    if !images.is_empty() {
        let prepared: Vec<&PreparedImage> = images
            .iter()
            .filter_map(|i| match &i.job {
                Job::Image(p) => Some(p),
                Job::Text(_) => None,
            })
            .collect();
        let started = Instant::now();
        let out = engine
            .embed_images(&prepared, 0)
            .map(|o| o.embeddings)
            .map_err(|e| e.to_string());
        observe(metrics, "image", prepared.len(), started);
        reply(images, out);
    }
}

fn observe(metrics: &QueryMetrics, tower: &str, n: usize, started: Instant) {
    let k = QueryMetrics::kind(tower);
    metrics.batch_size.get_or_create(&k).observe(n as f64);
    metrics
        .forward_seconds
        .get_or_create(&k)
        .observe(started.elapsed().as_secs_f64());
}

fn reply(items: Vec<Item>, out: Result<Vec<Vec<f32>>, String>) {
    match out {
        Ok(rows) if rows.len() == items.len() => {
            for (item, row) in items.into_iter().zip(rows) {
                // A client that went away no longer listens; nothing to do.
                let _ = item.reply.send(Ok(row));
            }
        }
        Ok(rows) => {
            let msg = format!(
                "internal error: {} vectors for {} inputs",
                rows.len(),
                items.len()
            );
            for item in items {
                let _ = item.reply.send(Err(msg.clone()));
            }
        }
        Err(e) => {
            tracing::error!(inputs = items.len(), "inference failed: {e}");
            for item in items {
                let _ = item.reply.send(Err(format!("inference failed: {e}")));
            }
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route(clip_contract::HEALTHZ_PATH, get(healthz))
        .route(clip_contract::READYZ_PATH, get(readyz))
        .route(clip_contract::METRICS_PATH, get(metrics_text))
        .with_state(shared)
}

fn json_response(status: u16, body: &Value, retry_after: Option<u64>) -> Response {
    let mut r = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(s) = retry_after {
        r = r.header(header::RETRY_AFTER, s.to_string());
    }
    r.body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn error_response(e: &ApiError) -> Response {
    let retry = matches!(e.status, 429 | 503).then_some(1);
    json_response(e.status, &e.body(), retry)
}

async fn embeddings(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = match handle(&s, &headers, body).await {
        Ok(v) => json_response(200, &v, None),
        Err(e) => {
            if e.status >= 500 {
                tracing::warn!(status = e.status, "{}", e.message);
            }
            error_response(&e)
        }
    };
    s.metrics
        .requests
        .get_or_create(&CodeLabel {
            code: response.status().as_u16().to_string(),
        })
        .inc();
    s.metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

fn unavailable(msg: &str) -> ApiError {
    ApiError {
        status: 503,
        message: msg.into(),
        kind: "server_error",
        param: None,
        code: Some("unavailable"),
    }
}

fn busy() -> ApiError {
    ApiError {
        status: 429,
        message: "the endpoint is busy: too many inputs are waiting (QUERY_MAX_QUEUE); retry after the Retry-After seconds".into(),
        kind: "rate_limit_error",
        param: None,
        code: Some("rate_limit_exceeded"),
    }
}

/// Counts an accepted input in `queue_depth` until it is answered.
struct DepthGuard<'a>(&'a Gauge, i64);

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.dec_by(self.1);
    }
}

async fn handle(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    if s.draining.load(Ordering::Relaxed) {
        return Err(unavailable("the endpoint is shutting down"));
    }
    let Some(loaded) = s.loaded.get() else {
        return Err(unavailable("the model is still loading"));
    };
    let _request = s.requests.clone().try_acquire_owned().map_err(|_| busy())?;
    let limit = s.cfg.max_body_bytes;
    let too_large = || {
        ApiError::invalid(
            None,
            format!("the request body is over the limit of {limit} bytes (QUERY_MAX_BODY_BYTES)"),
        )
        .with_status(413)
    };
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let text = format!("{e:?}");
        if text.contains("LengthLimit") {
            too_large()
        } else {
            ApiError::invalid(None, format!("cannot read the request body: {e}"))
        }
    })?;
    let req = api::parse(&bytes, &s.cfg.limits)?;
    drop(bytes);
    let m = req.model.as_str();
    if ![loaded.name, loaded.slug, loaded.hf_repo]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(m))
    {
        return Err(ApiError {
            status: 404,
            message: format!(
                "the model `{m}` does not exist here: this endpoint serves {} (GET /v1/models)",
                loaded.name
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    if let Some(d) = req.dimensions
        && d != loaded.dimensions as u64
    {
        return Err(ApiError::invalid(
            Some("dimensions"),
            format!(
                "{} gives {}-dimensional vectors; CLIP's cannot be shortened (omit `dimensions`)",
                loaded.name, loaded.dimensions
            ),
        ));
    }
    let n = req.inputs.len();
    let _permits = s
        .queue
        .clone()
        .try_acquire_many_owned(n as u32)
        .map_err(|_| busy())?;
    s.metrics.queue_depth.inc_by(n as i64);
    let _depth = DepthGuard(&s.metrics.queue_depth, n as i64);

    // Tokens are counted (and texts checked) here; images are prepared on the decode pool, all
    // of them in parallel, exactly as the queue worker prepares them.
    let mut tokens = 0usize;
    let mut jobs: Vec<Option<Job>> = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for (i, input) in req.inputs.into_iter().enumerate() {
        match input {
            Input::Text(t) => {
                let ids = loaded
                    .tokenizer
                    .encode(&t)
                    .map_err(|e| ApiError::invalid(Some(&format!("input[{i}]")), e))?;
                tokens += ids.len();
                jobs.push(Some(Job::Text(t)));
            }
            Input::Image { bytes, declared } => {
                let (tx, rx) = oneshot::channel();
                let pre = loaded.preprocessor.clone();
                s.pool.spawn(move || {
                    let _ = tx.send(pre.prepare(&bytes, declared.as_deref()));
                });
                pending.push((i, rx));
                jobs.push(None);
            }
        }
    }
    for (i, rx) in pending {
        let prepared = rx
            .await
            .map_err(|_| unavailable("the decode pool stopped"))?
            .map_err(|e| ApiError::invalid(Some(&format!("input[{i}]")), e.to_string()))?;
        jobs[i] = Some(Job::Image(prepared));
    }
    let mut replies = Vec::with_capacity(n);
    for job in jobs.into_iter().flatten() {
        let kind = match job {
            Job::Text(_) => "text",
            Job::Image(_) => "image",
        };
        s.metrics
            .inputs
            .get_or_create(&QueryMetrics::kind(kind))
            .inc();
        let (tx, rx) = oneshot::channel();
        // Never full: the channel holds QUERY_MAX_QUEUE items and the permits bound what waits.
        s.items
            .try_send(Item { job, reply: tx })
            .map_err(|_| unavailable("the model is not accepting inputs"))?;
        replies.push(rx);
    }
    let normalize = req.normalize.unwrap_or(s.cfg.normalize);
    let mut data = Vec::with_capacity(n);
    for (index, rx) in replies.into_iter().enumerate() {
        let mut v = rx
            .await
            .map_err(|_| unavailable("the inference thread stopped"))?
            .map_err(|e| ApiError {
                status: 500,
                message: e,
                kind: "server_error",
                param: None,
                code: None,
            })?;
        if normalize {
            api::l2_normalize(&mut v);
        }
        data.push(json!({
            "object": "embedding",
            "index": index,
            "embedding": api::encode_vector(&v, req.encoding),
        }));
    }
    Ok(json!({
        "object": "list",
        "data": data,
        "model": loaded.name,
        "usage": Usage { prompt_tokens: tokens, total_tokens: tokens },
    }))
}

fn model_card(l: &Loaded) -> Value {
    json!({"id": l.name, "object": "model", "created": 0, "owned_by": "clip-operator", "dimensions": l.dimensions})
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    let data: Vec<Value> = s.loaded.get().map(model_card).into_iter().collect();
    json_response(200, &json!({"object": "list", "data": data}), None)
}

async fn model(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.loaded.get() {
        Some(l)
            if [l.name, l.slug, l.hf_repo]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&id)) =>
        {
            json_response(200, &model_card(l), None)
        }
        Some(l) => error_response(&ApiError {
            status: 404,
            message: format!(
                "the model `{id}` does not exist here: this endpoint serves {}",
                l.name
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }),
        None => error_response(&unavailable("the model is still loading")),
    }
}

fn ready(s: &Shared) -> Result<(), String> {
    let mut why = Vec::new();
    if s.loaded.get().is_none() {
        why.push("model loading");
    }
    if s.draining.load(Ordering::Relaxed) {
        why.push("draining");
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join(", "))
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.loaded.get().is_some() && !s.inference_alive.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "inference thread stopped\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match ready(&s) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(ready(&s).is_ok()));
    (
        [(header::CONTENT_TYPE, clip_contract::metrics::CONTENT_TYPE)],
        s.metrics.encode(),
    )
}
