//! Shutdown: stop taking work, wait out the grace period, release what is left.

use super::*;

impl Pipeline {
    /// Stops taking work, waits up to the grace period for what is in flight, makes the rest
    /// visible again at once, and waits for the receives still polling (they release what they
    /// get).
    pub(super) async fn drain(&self, mut receivers: tokio::task::JoinSet<()>) {
        self.health.draining.store(true, Ordering::Relaxed);
        let busy = || {
            !self.ledger.lock().expect("ledger lock").is_empty()
                || self.finalizing.load(Ordering::SeqCst) > 0
        };
        let deadline = Instant::now() + self.cfg.grace;
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rest: Vec<Tracked> = self.ledger.lock().expect("ledger lock").drain();
        if !rest.is_empty() {
            tracing::warn!(
                count = rest.len(),
                "grace period over: making unfinished messages visible again"
            );
        }
        for t in rest {
            self.release(&t.msg.receipt, &t.msg.message_id).await;
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
