//! Batching prepared images for the inference thread, and that thread's loop.

use super::*;

impl Pipeline {
    /// Groups prepared images into batches of up to `batch_size`, waiting at most `batch_wait`
    /// after the first one.
    pub(super) async fn batcher(
        self: Arc<Self>,
        ready: mpsc::Receiver<Ready>,
        batches: mpsc::Sender<Vec<Ready>>,
    ) {
        let metrics = self.metrics.clone();
        crate::service::batcher::run(
            ready,
            self.cfg.batch_size,
            self.cfg.batch_wait,
            batches,
            |n| metrics.batch_size.observe(n as f64),
        )
        .await;
    }
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
