//! The visibility heartbeat that keeps in-flight messages from other workers, and the progress
//! log line.

use super::*;

impl Pipeline {
    /// Keeps every in-flight message invisible while it is worked on.
    pub(super) async fn heartbeat(self: Arc<Self>) {
        let visibility = self.cfg.visibility_secs();
        let period = Duration::from_secs_f64((f64::from(visibility) / 3.0).max(0.5));
        loop {
            tokio::time::sleep(period).await;
            let receipts = self.ledger.lock().expect("ledger lock").receipts();
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
    pub(super) async fn progress(self: Arc<Self>) {
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
}
