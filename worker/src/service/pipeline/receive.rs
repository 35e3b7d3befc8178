//! Receiving: long polls for as many messages as there is room for, each registered in the
//! ledger and its documents sent on their way; releasing a message.

use super::*;

impl Pipeline {
    pub(super) async fn receiver(
        self: Arc<Self>,
        inlets: Inlets,
        mut shutdown: watch::Receiver<bool>,
    ) {
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
                        self.release(&m.receipt, &m.message_id).await;
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
    pub(super) async fn accept(
        self: &Arc<Self>,
        m: Received,
        permit: OwnedSemaphorePermit,
        inlets: &Inlets,
    ) {
        if let Some(sent) = m.sent_ms {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            self.metrics
                .queue_wait_seconds
                .observe(now.saturating_sub(sent) as f64 / 1000.0);
        }
        let parsed = event::parse_body(&m.body);
        let documents = parsed
            .as_ref()
            .map(Vec::len)
            .map_err(|e| Failure::Permanent(e.to_string()));
        let id = m.message_id.clone();
        self.metrics.in_flight.inc();
        let accepted = self
            .ledger
            .lock()
            .expect("ledger lock")
            .accept(m, documents, permit);
        let key = match accepted {
            Accepted::Tracking(key) => key,
            // Unreadable body, or nothing in it (S3 test event): finish now.
            Accepted::Finished(t) => {
                self.finalize(t).await;
                return;
            }
        };
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

    /// Makes one message visible again at once.
    pub(super) async fn release(&self, receipt: &str, message_id: &str) {
        if let Err(e) = self
            .aws
            .set_visibility(&self.cfg.queue_url, receipt, 0)
            .await
        {
            tracing::warn!(message = %message_id, "could not release: {e}; it returns after its visibility timeout");
        }
        self.metrics.message(MessageOutcome::Released);
    }
}
