//! Dynamic batching: items arriving one by one leave in groups of up to `max`, each group waiting
//! at most `wait` after its first item. The queue worker batches prepared images with it; the
//! query endpoint batches the inputs of concurrent requests with it.

use std::time::Duration;

use tokio::sync::mpsc;

/// Forwards `items` to `batches` in groups of 1 to `max` (0 counts as 1); calls `observe` with each
/// group's size before it is sent. Returns when `items` is closed and empty, or `batches` closed.
pub async fn run<T>(
    mut items: mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    batches: mpsc::Sender<Vec<T>>,
    mut observe: impl FnMut(usize),
) {
    let max = max.max(1);
    while let Some(first) = items.recv().await {
        let deadline = tokio::time::Instant::now() + wait;
        let mut batch = vec![first];
        while batch.len() < max {
            // What is already queued joins at once; then wait for more until the deadline.
            match items.try_recv() {
                Ok(item) => batch.push(item),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, items.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        _ => break,
                    }
                }
            }
        }
        observe(batch.len());
        if batches.send(batch).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn groups_what_waits_and_stops_at_the_deadline_or_the_maximum() {
        let (tx, rx) = mpsc::channel(64);
        let (btx, mut brx) = mpsc::channel(64);
        let mut seen = Vec::new();
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        let task = tokio::spawn(async move {
            run(rx, 4, Duration::from_millis(500), btx, |n| seen.push(n)).await;
            seen
        });
        assert_eq!(brx.recv().await.unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(brx.recv().await.unwrap(), vec![4, 5, 6, 7]);
        // Two left: the group waits for the deadline, then leaves short.
        assert_eq!(brx.recv().await.unwrap(), vec![8, 9]);
        // One item after a pause is a group of one once the wait is over.
        tx.send(10).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(11).await.unwrap();
        assert_eq!(brx.recv().await.unwrap(), vec![10, 11]);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tx.send(12).await.unwrap();
        drop(tx);
        assert_eq!(brx.recv().await.unwrap(), vec![12]);
        assert!(brx.recv().await.is_none());
        assert_eq!(task.await.unwrap(), vec![4, 4, 2, 2, 1]);
    }
}
