//! Fetching and preparing: each document read from S3 (bounded concurrency) and decoded on the
//! CPU pool.

use super::*;

impl Pipeline {
    pub(super) async fn fetch_stage(
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

    pub(super) async fn fetch_and_prepare(
        &self,
        job: &Job,
    ) -> Result<(PreparedImage, String), Failure> {
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
}
