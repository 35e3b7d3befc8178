//! The data path: receive -> fetch -> preprocess -> batch -> infer -> write -> publish -> delete,
//! as tasks connected by bounded channels. A semaphore caps the messages in flight, so memory
//! does not grow with queue depth; a heartbeat keeps every in-flight message invisible to other
//! workers; a message is deleted only after each of its documents is written and published.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::ServeConfig;
use super::http::Health;
use super::metrics::{MessageOutcome, Metrics, Stage};
use crate::aws::{Aws, Failure};
use crate::event::{self, CloudEvent, DOCUMENT_DELETED, Enrichment};
use crate::preprocess::{ImageFormat, PreparedImage, Preprocessor};

type MsgKey = u64;

/// Long-poll wait of each receive. Shorter than SQS's 20 s maximum so a draining worker stops
/// within seconds; an idle worker's extra polls cost nothing once it has scaled to zero.
pub const LONG_POLL_SECONDS: i32 = 10;

/// A received message while its documents are worked on.
struct Tracked {
    receipt: String,
    message_id: String,
    body: String,
    receive_count: u32,
    /// Documents not yet finished.
    remaining: usize,
    /// What happened to the finished ones: the worst outcome decides the message's fate.
    outcome: MessageOutcome,
    failure: Option<Failure>,
    _permit: OwnedSemaphorePermit,
}

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
    tracked: std::sync::Mutex<HashMap<MsgKey, Tracked>>,
    permits: Arc<Semaphore>,
    next_key: AtomicU64,
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
            tracked: Default::default(),
            permits,
            next_key: AtomicU64::new(1),
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

    // ----------------------------------------------------------------------------- receive

    async fn receiver(self: Arc<Self>, inlets: Inlets, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Receive only as many messages as there is room for.
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.changed() => return,
            };
            let mut permits = vec![first];
            while permits.len() < 10 {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let visibility = self.cfg.visibility_secs();
            // Not cancelled on shutdown: a receive cut short could leave messages SQS already
            // handed out invisible until their timeout. What arrives after SIGTERM is released.
            let received = self
                .aws
                .receive(
                    &self.cfg.queue_url,
                    permits.len() as i32,
                    LONG_POLL_SECONDS,
                    visibility,
                )
                .await;
            match received {
                Ok(messages) if *shutdown.borrow() => {
                    for m in messages {
                        self.release(
                            m.receipt_handle.as_deref().unwrap_or_default(),
                            m.message_id.as_deref().unwrap_or_default(),
                        )
                        .await;
                    }
                    return;
                }
                Ok(messages) => {
                    self.health.queue_reachable.store(true, Ordering::Relaxed);
                    backoff = Duration::from_secs(1);
                    for (message, permit) in messages.into_iter().zip(permits.drain(..)) {
                        self.accept(message, permit, &inlets).await;
                    }
                }
                Err(e) => {
                    self.health.queue_reachable.store(false, Ordering::Relaxed);
                    tracing::error!(
                        "cannot receive from {}: {e}; retrying in {backoff:?}",
                        self.cfg.queue_url
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Registers a message and sends its documents on their way.
    async fn accept(self: &Arc<Self>, m: Message, permit: OwnedSemaphorePermit, inlets: &Inlets) {
        let attr =
            |a: MessageSystemAttributeName| m.attributes.as_ref().and_then(|x| x.get(&a)).cloned();
        let receive_count = attr(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        if let Some(sent) =
            attr(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse::<u64>().ok())
        {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            self.metrics
                .queue_wait_seconds
                .observe(now.saturating_sub(sent) as f64 / 1000.0);
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let body = m.body.unwrap_or_default();
        let parsed = event::parse_body(&body);
        let remaining = parsed.as_ref().map_or(0, Vec::len);
        let tracked = Tracked {
            receipt: m.receipt_handle.unwrap_or_default(),
            message_id: m.message_id.unwrap_or_default(),
            body,
            receive_count,
            remaining,
            outcome: MessageOutcome::Ignored,
            failure: parsed
                .as_ref()
                .err()
                .map(|e| Failure::Permanent(e.to_string())),
            _permit: permit,
        };
        let id = tracked.message_id.clone();
        self.metrics.in_flight.inc();
        if remaining == 0 {
            // Unreadable body, or nothing in it (S3 test event): finish now.
            self.finalize(tracked).await;
            return;
        }
        self.tracked
            .lock()
            .expect("tracked lock")
            .insert(key, tracked);
        for ev in parsed.unwrap_or_default() {
            let job = Job { key, event: ev };
            if job.event.kind() == DOCUMENT_DELETED {
                // Deletions pass through so consumers behind this processor see them too.
                let _ = inlets.output.send(Output::Forward(job)).await;
                continue;
            }
            match job.event.mime_type() {
                Ok(mime) if ImageFormat::from_mime(mime).is_some() => {
                    let _ = inlets.fetch.send(job).await;
                }
                Ok(mime) => {
                    tracing::info!(message = %id, event = job.event.id(), mime, "not an image type this processor embeds; acknowledged without output");
                    self.finish(key, Ok(MessageOutcome::Skipped));
                }
                Err(e) => self.finish(key, Err(Failure::Permanent(e.to_string()))),
            }
        }
    }

    // ------------------------------------------------------------------------ fetch + decode

    async fn fetch_stage(
        self: Arc<Self>,
        mut jobs: mpsc::Receiver<Job>,
        ready: mpsc::Sender<Ready>,
        output: mpsc::Sender<Output>,
    ) {
        let limit = Arc::new(Semaphore::new(self.cfg.fetch_concurrency.max(1)));
        while let Some(job) = jobs.recv().await {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (me, ready, output) = (self.clone(), ready.clone(), output.clone());
            tokio::spawn(async move {
                match me.fetch_and_prepare(&job).await {
                    Ok((image, content_id)) => {
                        let _ = ready
                            .send(Ready {
                                job,
                                image,
                                content_id,
                            })
                            .await;
                    }
                    Err(failure) => {
                        let _ = output.send(Output::Failed { job, failure }).await;
                    }
                }
                // Held until the image is prepared: bounds the encoded bytes held in memory.
                drop(permit);
            });
        }
    }

    async fn fetch_and_prepare(&self, job: &Job) -> Result<(PreparedImage, String), Failure> {
        let loc = job
            .event
            .location()
            .map_err(|e| Failure::Permanent(e.to_string()))?;
        let started = Instant::now();
        let (bytes, _) = self
            .aws
            .get_object(&loc, self.preprocessor.limits.max_bytes)
            .await?;
        self.metrics
            .stage(Stage::Fetch, started.elapsed().as_secs_f64());
        let etag = job.event.etag();
        let declared = job.event.mime_type().ok().map(str::to_string);
        let pre = self.preprocessor.clone();
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        // On the CPU pool, with the decode: hashing up to MAX_IMAGE_BYTES would stall the runtime.
        self.pool.spawn(move || {
            // The seed keys vectors by the document's etag and fails without one; we fall back
            // to the content's SHA-256 (same bytes, same key).
            let content_id =
                etag.unwrap_or_else(|| format!("sha256-{}", hex::encode(Sha256::digest(&bytes))));
            let _ = tx.send((pre.prepare(&bytes, declared.as_deref()), content_id));
        });
        let (image, content_id) = rx
            .await
            .map_err(|_| Failure::Transient("the preprocessing pool stopped".into()))?;
        let image = image
            .map_err(|e| Failure::Permanent(format!("s3://{}/{}: {e}", loc.bucket, loc.key)))?;
        self.metrics
            .stage(Stage::Preprocess, started.elapsed().as_secs_f64());
        if let Some(m) = &image.mismatch {
            tracing::warn!(event = job.event.id(), declared = %m.declared, actual = %m.actual, "declared type disagrees with the bytes; decoded as {}", m.actual);
        }
        Ok((image, content_id))
    }

    // --------------------------------------------------------------------------------- batch

    /// Groups prepared images into batches of up to `batch_size`, waiting at most `batch_wait`
    /// after the first one.
    async fn batcher(
        self: Arc<Self>,
        ready: mpsc::Receiver<Ready>,
        batches: mpsc::Sender<Vec<Ready>>,
    ) {
        let metrics = self.metrics.clone();
        super::batcher::run(
            ready,
            self.cfg.batch_size,
            self.cfg.batch_wait,
            batches,
            |n| metrics.batch_size.observe(n as f64),
        )
        .await;
    }

    // -------------------------------------------------------------------------------- output

    async fn output_stage(self: Arc<Self>, mut outputs: mpsc::Receiver<Output>) {
        let limit = Arc::new(Semaphore::new(32));
        while let Some(out) = outputs.recv().await {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let (key, result) = me.write_and_publish(out).await;
                me.finish(key, result);
                drop(permit);
            });
        }
    }

    async fn write_and_publish(&self, out: Output) -> (MsgKey, Result<MessageOutcome, Failure>) {
        match out {
            Output::Failed { job, failure } => {
                self.metrics.images_failed.inc();
                (job.key, Err(failure))
            }
            Output::Forward(job) => {
                let ev = event::forward(&job.event, &self.cfg.service_name);
                (
                    job.key,
                    self.publish(&ev).await.map(|_| MessageOutcome::Forwarded),
                )
            }
            Output::Embedded {
                job,
                content_id,
                embedding,
                keywords,
            } => {
                let result = async {
                    let key = self.vector_key(&content_id);
                    let body = serde_json::to_vec(&embedding)
                        .map_err(|e| Failure::Permanent(e.to_string()))?;
                    let started = Instant::now();
                    self.aws.put_json(&self.cfg.bucket, &key, body).await?;
                    self.metrics
                        .stage(Stage::Write, started.elapsed().as_secs_f64());
                    let enriched = event::enrich(
                        &job.event,
                        &Enrichment {
                            vectors: format!("s3://{}/{}", self.cfg.bucket, key),
                            model: self.model.name,
                            dimensions: self.model.dimensions,
                            keywords: &keywords,
                            service: &self.cfg.service_name,
                        },
                    );
                    self.publish(&enriched).await?;
                    self.metrics.images_embedded.inc();
                    Ok(MessageOutcome::Succeeded)
                }
                .await;
                (job.key, result)
            }
        }
    }

    /// `<service>/<model slug>/<etag | sha256-...>`: the model is part of the key, so processors
    /// with different models never overwrite each other; a retry overwrites its own file.
    fn vector_key(&self, content_id: &str) -> String {
        vector_key(&self.cfg.service_name, self.model.slug, content_id)
    }

    async fn publish(&self, ev: &serde_json::Value) -> Result<(), Failure> {
        let Some(topic) = self.cfg.topic.as_deref() else {
            return Ok(());
        };
        let started = Instant::now();
        self.aws.publish(topic, ev.to_string()).await?;
        self.metrics
            .stage(Stage::Publish, started.elapsed().as_secs_f64());
        Ok(())
    }

    // ------------------------------------------------------------------------ bookkeeping

    /// Records one finished document; the last one finalises the message.
    fn finish(self: &Arc<Self>, key: MsgKey, result: Result<MessageOutcome, Failure>) {
        let done = {
            let mut map = self.tracked.lock().expect("tracked lock");
            let Some(t) = map.get_mut(&key) else { return };
            t.remaining = t.remaining.saturating_sub(1);
            match result {
                Ok(outcome) => t.outcome = worst(t.outcome, outcome),
                // A permanent failure outranks a transient one: retrying cannot fix it.
                Err(f) if t.failure.as_ref().is_none_or(|old| !old.is_permanent()) => {
                    t.failure = Some(f)
                }
                Err(_) => {}
            }
            if t.remaining == 0 {
                map.remove(&key)
            } else {
                None
            }
        };
        if let Some(t) = done {
            let me = self.clone();
            me.finalizing.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                me.finalize(t).await;
                me.finalizing.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Deletes, retries or dead-letters a finished message.
    async fn finalize(&self, t: Tracked) {
        let queue = &self.cfg.queue_url;
        let outcome = match &t.failure {
            None => {
                let started = Instant::now();
                if let Err(e) = self.aws.delete(&self.cfg.queue_url, &t.receipt).await {
                    // Output exists; the message will come back and be redone (same key, duplicate
                    // event downstream), which at-least-once delivery allows.
                    tracing::error!(message = %t.message_id, "processed but not deleted: {e}");
                }
                self.metrics
                    .stage(Stage::Delete, started.elapsed().as_secs_f64());
                t.outcome
            }
            Some(Failure::Transient(reason)) => {
                let delay = retry_delay(t.receive_count);
                tracing::warn!(message = %t.message_id, attempt = t.receive_count, "transient failure, retrying in {delay}s: {reason}");
                if let Err(e) = self.aws.set_visibility(queue, &t.receipt, delay).await {
                    tracing::warn!(message = %t.message_id, "could not delay the retry: {e}");
                }
                MessageOutcome::RetriedTransient
            }
            Some(Failure::Permanent(reason)) => {
                self.dead_letter(&t, reason).await;
                MessageOutcome::FailedPermanent
            }
        };
        self.metrics.message(outcome);
        self.metrics.in_flight.dec();
    }

    async fn dead_letter(&self, t: &Tracked, reason: &str) {
        let queue = &self.cfg.queue_url;
        if let Some(dest) = &self.cfg.failure_queue {
            match self.aws.send_failure(dest, &t.body, reason, queue).await {
                Ok(()) => {
                    tracing::error!(message = %t.message_id, destination = %dest, "cannot be processed, sent to the failure queue: {reason}");
                    if let Err(e) = self.aws.delete(&self.cfg.queue_url, &t.receipt).await {
                        tracing::error!(message = %t.message_id, "sent to the failure queue but not deleted: {e}");
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(message = %t.message_id, "could not reach the failure queue ({e}); using the redrive policy")
                }
            }
        }
        match self.max_receives {
            Some(max) => {
                tracing::error!(
                    message = %t.message_id, attempt = t.receive_count, max_receives = max,
                    "cannot be processed: {reason}; returned to the queue, its redrive policy moves it to the dead-letter queue after {max} receives"
                );
                if let Err(e) = self.aws.set_visibility(queue, &t.receipt, 0).await {
                    tracing::warn!(message = %t.message_id, "could not return it at once: {e}");
                }
            }
            None => {
                let delay = retry_delay(t.receive_count + 4);
                tracing::error!(
                    message = %t.message_id, attempt = t.receive_count,
                    "cannot be processed: {reason}; the queue has no dead-letter queue and FAILURE_QUEUE_URL is unset, so it is kept and retried in {delay}s"
                );
                let _ = self.aws.set_visibility(queue, &t.receipt, delay).await;
            }
        }
    }

    /// Keeps every in-flight message invisible while it is worked on.
    async fn heartbeat(self: Arc<Self>) {
        let visibility = self.cfg.visibility_secs();
        let period = Duration::from_secs_f64((f64::from(visibility) / 3.0).max(0.5));
        loop {
            tokio::time::sleep(period).await;
            let receipts: Vec<String> = self
                .tracked
                .lock()
                .expect("tracked lock")
                .values()
                .map(|t| t.receipt.clone())
                .collect();
            if !receipts.is_empty() {
                let failed = self
                    .aws
                    .extend_visibility(&self.cfg.queue_url, &receipts, visibility)
                    .await;
                if failed > 0 {
                    tracing::warn!(
                        failed,
                        total = receipts.len(),
                        "could not extend the visibility of some messages"
                    );
                }
            }
        }
    }

    /// A log line every `progress_interval`: processed, rate, failures, in flight.
    async fn progress(self: Arc<Self>) {
        let mut last = (0u64, 0u64, Instant::now());
        loop {
            tokio::time::sleep(self.cfg.progress_interval).await;
            let (done, failed) = (
                self.metrics.images_embedded.get(),
                self.metrics.images_failed.get(),
            );
            let secs = last.2.elapsed().as_secs_f64();
            let in_flight = self.metrics.in_flight.get();
            if done != last.0 || failed != last.1 || in_flight > 0 {
                tracing::info!(
                    embedded = done,
                    failed,
                    in_flight,
                    images_per_second = format!("{:.1}", (done - last.0) as f64 / secs),
                    "progress"
                );
            }
            last = (done, failed, Instant::now());
        }
    }

    /// Makes one message visible again at once.
    async fn release(&self, receipt: &str, message_id: &str) {
        if let Err(e) = self
            .aws
            .set_visibility(&self.cfg.queue_url, receipt, 0)
            .await
        {
            tracing::warn!(message = %message_id, "could not release: {e}; it returns after its visibility timeout");
        }
        self.metrics.message(MessageOutcome::Released);
    }

    /// Stops taking work, waits up to the grace period for what is in flight, makes the rest
    /// visible again at once, and waits for the receives still polling (they release what they
    /// get).
    async fn drain(&self, mut receivers: tokio::task::JoinSet<()>) {
        self.health.draining.store(true, Ordering::Relaxed);
        let busy = || {
            !self.tracked.lock().expect("tracked lock").is_empty()
                || self.finalizing.load(Ordering::SeqCst) > 0
        };
        let deadline = Instant::now() + self.cfg.grace;
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rest: Vec<Tracked> = self
            .tracked
            .lock()
            .expect("tracked lock")
            .drain()
            .map(|(_, t)| t)
            .collect();
        if !rest.is_empty() {
            tracing::warn!(
                count = rest.len(),
                "grace period over: making unfinished messages visible again"
            );
        }
        for t in rest {
            self.release(&t.receipt, &t.message_id).await;
            self.metrics.in_flight.dec();
        }
        let polls = Duration::from_secs(LONG_POLL_SECONDS as u64 + 5);
        let _ = tokio::time::timeout(polls, async {
            while receivers.join_next().await.is_some() {}
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.finalizing.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// Seconds before a transiently failed message is retried: 15 s, doubling per receive, at most
/// 15 minutes.
pub fn retry_delay(receive_count: u32) -> i32 {
    let exp = receive_count.saturating_sub(1).min(6);
    (15i32 << exp).min(900)
}

/// The outcome a message reports when its documents had several (successes only).
fn worst(a: MessageOutcome, b: MessageOutcome) -> MessageOutcome {
    use MessageOutcome::*;
    let rank = |o: MessageOutcome| match o {
        Ignored => 0,
        Skipped => 1,
        Forwarded => 2,
        _ => 3,
    };
    if rank(b) >= rank(a) { b } else { a }
}

/// Runs the model on batches, on the thread that owns it.
pub fn inference_loop(
    engine: &crate::engine::Engine,
    top_k: usize,
    metrics: &Metrics,
    mut batches: mpsc::Receiver<Vec<Ready>>,
    results: mpsc::Sender<Output>,
) {
    while let Some(batch) = batches.blocking_recv() {
        let started = Instant::now();
        let images: Vec<&PreparedImage> = batch.iter().map(|r| &r.image).collect();
        let outcome = engine.embed_images(&images, top_k);
        metrics.stage(Stage::Infer, started.elapsed().as_secs_f64());
        match outcome {
            Ok(out) => {
                for ((ready, embedding), keywords) in
                    batch.into_iter().zip(out.embeddings).zip(out.keywords)
                {
                    let o = Output::Embedded {
                        job: ready.job,
                        content_id: ready.content_id,
                        embedding,
                        keywords,
                    };
                    if results.blocking_send(o).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // Out of memory or a device fault, not the images' fault: retry them later.
                tracing::error!(images = batch.len(), "inference failed: {e}");
                for ready in batch {
                    let failure = Failure::Transient(format!("inference failed: {e}"));
                    if results
                        .blocking_send(Output::Failed {
                            job: ready.job,
                            failure,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
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

    #[test]
    fn transient_retries_back_off() {
        assert_eq!(retry_delay(1), 15);
        assert_eq!(retry_delay(2), 30);
        assert_eq!(retry_delay(4), 120);
        assert_eq!(retry_delay(100), 900);
    }

    #[test]
    fn a_message_reports_its_most_significant_success() {
        use MessageOutcome::*;
        assert_eq!(worst(Ignored, Skipped), Skipped);
        assert_eq!(worst(Succeeded, Skipped), Succeeded);
        assert_eq!(worst(Forwarded, Succeeded), Succeeded);
    }
}
