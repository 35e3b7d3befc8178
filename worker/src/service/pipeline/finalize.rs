//! Finishing a message: its documents' outcomes recorded in the ledger, and the disposition the
//! ledger decides carried out with SQS calls.

use super::*;

impl Pipeline {
    /// Records one finished document; the last one finalises the message.
    pub(super) fn finish(self: &Arc<Self>, key: MsgKey, result: Result<MessageOutcome, Failure>) {
        let done = self.ledger.lock().expect("ledger lock").record(key, result);
        if let Some(t) = done {
            let me = self.clone();
            me.finalizing.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                me.finalize(t).await;
                me.finalizing.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Deletes, retries or dead-letters a finished message, as the ledger decides.
    pub(super) async fn finalize(&self, t: Tracked) {
        let queue = &self.cfg.queue_url;
        let policy = Policy {
            failure_queue: self.cfg.failure_queue.is_some(),
            max_receives: self.max_receives,
        };
        let disposition = t.disposition(policy);
        let outcome = disposition.outcome();
        let (id, attempt) = (&t.msg.message_id, t.msg.receive_count);
        match disposition {
            Disposition::Delete(_) => {
                let started = Instant::now();
                if let Err(e) = self.aws.delete(queue, &t.msg.receipt).await {
                    // Output exists; the message will come back and be redone (same key, duplicate
                    // event downstream), which at-least-once delivery allows.
                    tracing::error!(message = %id, "processed but not deleted: {e}");
                }
                self.metrics
                    .stage(Stage::Delete, started.elapsed().as_secs_f64());
            }
            Disposition::Retry { delay, reason } => {
                tracing::warn!(message = %id, attempt, "transient failure, retrying in {delay}s: {reason}");
                if let Err(e) = self.aws.set_visibility(queue, &t.msg.receipt, delay).await {
                    tracing::warn!(message = %id, "could not delay the retry: {e}");
                }
            }
            permanent => self.dead_letter(&t, permanent).await,
        }
        self.metrics.message(outcome);
        self.metrics.in_flight.dec();
    }

    /// Carries out a permanent failure's disposition: the failure queue, else the redrive policy,
    /// else a slow retry.
    pub(super) async fn dead_letter(&self, t: &Tracked, disposition: Disposition) {
        let queue = &self.cfg.queue_url;
        let (id, attempt) = (&t.msg.message_id, t.msg.receive_count);
        let mut disposition = disposition;
        if let Disposition::ToFailureQueue { reason, fallback } = disposition {
            let dest = self.cfg.failure_queue.as_deref().unwrap_or_default();
            match self
                .aws
                .send_failure(dest, &t.msg.body, &reason, queue)
                .await
            {
                Ok(()) => {
                    tracing::error!(message = %id, destination = %dest, "cannot be processed, sent to the failure queue: {reason}");
                    if let Err(e) = self.aws.delete(queue, &t.msg.receipt).await {
                        tracing::error!(message = %id, "sent to the failure queue but not deleted: {e}");
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(message = %id, "could not reach the failure queue ({e}); using the redrive policy")
                }
            }
            disposition = *fallback;
        }
        match disposition {
            Disposition::Redrive {
                reason,
                max_receives,
            } => {
                tracing::error!(
                    message = %id, attempt, max_receives,
                    "cannot be processed: {reason}; returned to the queue, its redrive policy moves it to the dead-letter queue after {max_receives} receives"
                );
                if let Err(e) = self.aws.set_visibility(queue, &t.msg.receipt, 0).await {
                    tracing::warn!(message = %id, "could not return it at once: {e}");
                }
            }
            Disposition::Keep { delay, reason } => {
                tracing::error!(
                    message = %id, attempt,
                    "cannot be processed: {reason}; the queue has no dead-letter queue and FAILURE_QUEUE_URL is unset, so it is kept and retried in {delay}s"
                );
                let _ = self.aws.set_visibility(queue, &t.msg.receipt, delay).await;
            }
            other => {
                tracing::error!(message = %id, "internal error: {other:?} is not a dead-letter disposition")
            }
        }
    }
}
