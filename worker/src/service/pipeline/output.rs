//! Output: the vector file written, the enriched event published; each document's outcome recorded.

use super::*;

impl Pipeline {
    pub(super) async fn output_stage(self: Arc<Self>, mut outputs: mpsc::Receiver<Output>) {
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

    pub(super) async fn write_and_publish(
        &self,
        out: Output,
    ) -> (MsgKey, Result<MessageOutcome, Failure>) {
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
    pub(super) fn vector_key(&self, content_id: &str) -> String {
        vector_key(&self.cfg.service_name, self.model.slug, content_id)
    }

    pub(super) async fn publish(&self, ev: &serde_json::Value) -> Result<(), Failure> {
        let Some(topic) = self.cfg.topic.as_deref() else {
            return Ok(());
        };
        let started = Instant::now();
        self.aws.publish(topic, ev.to_string()).await?;
        self.metrics
            .stage(Stage::Publish, started.elapsed().as_secs_f64());
        Ok(())
    }
}
