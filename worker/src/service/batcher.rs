//! Dynamic batching: items arriving one by one leave in groups of up to `max`, each group waiting
//! at most `wait` after its first item ([`run`]), or after the consumer is free again
//! ([`run_when_free`]). The queue worker batches prepared images with it; the query endpoint
//! batches the inputs of concurrent requests with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

/// Forwards `items` to `batches` in groups of 1 to `max` (0 counts as 1); calls `observe` with each
/// group's size before it is sent. Returns when `items` is closed and empty, or `batches` closed.
pub async fn run<T>(
    items: mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    batches: mpsc::Sender<Vec<T>>,
    observe: impl FnMut(usize),
) {
    group(items, max, wait, None, batches, observe).await
}

/// Like [`run`], for a consumer that takes one batch at a time and gives a permit back to `free`
/// when it is done with it (`free` starts with one permit): a group forms when the first item
/// arrives, leaves as soon as the consumer is free, with everything queued by then (up to `max`),
/// and only then waits up to `wait` for more. So a lone item never waits for companions while the
/// consumer is idle, and while the consumer is busy the items that arrive queue up and leave
/// together (continuous batching).
pub async fn run_when_free<T>(
    items: mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    free: Arc<Semaphore>,
    batches: mpsc::Sender<Vec<T>>,
    observe: impl FnMut(usize),
) {
    group(items, max, wait, Some(free), batches, observe).await
}

/// Both modes: after a group's first item, waits for a permit of `free` if there is one, then
/// fills the group.
async fn group<T>(
    mut items: mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    free: Option<Arc<Semaphore>>,
    batches: mpsc::Sender<Vec<T>>,
    mut observe: impl FnMut(usize),
) {
    let max = max.max(1);
    while let Some(first) = items.recv().await {
        if let Some(free) = &free {
            match free.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
        }
        let mut batch = vec![first];
        fill(&mut items, &mut batch, max, wait).await;
        observe(batch.len());
        if batches.send(batch).await.is_err() {
            return;
        }
    }
}

/// Adds to `batch`, up to `max` items, what is already queued on `items`, then what arrives
/// within `wait`.
async fn fill<T>(items: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match items.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) if wait.is_zero() => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, items.recv()).await {
                    Ok(Some(item)) => batch.push(item),
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_free_consumer_gets_a_lone_item_at_once_a_busy_one_gets_what_queued() {
        let (tx, rx) = mpsc::channel(64);
        let (btx, mut brx) = mpsc::channel(1);
        let free = Arc::new(Semaphore::new(1));
        let task = tokio::spawn(run_when_free(
            rx,
            4,
            Duration::ZERO,
            free.clone(),
            btx,
            |_| {},
        ));
        // Idle consumer: a lone item leaves at once, with no wait for companions.
        let started = tokio::time::Instant::now();
        tx.send(0).await.unwrap();
        assert_eq!(brx.recv().await.unwrap(), vec![0]);
        assert!(started.elapsed() < Duration::from_millis(500));
        // The consumer is busy (no permit back yet): what arrives meanwhile waits and leaves
        // together, up to the maximum, once it is free.
        for i in 1..=6 {
            tx.send(i).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            brx.try_recv().is_err(),
            "nothing leaves while the consumer is busy"
        );
        free.add_permits(1);
        assert_eq!(brx.recv().await.unwrap(), vec![1, 2, 3, 4]);
        free.add_permits(1);
        assert_eq!(brx.recv().await.unwrap(), vec![5, 6]);
        drop(tx);
        free.add_permits(1);
        task.await.unwrap();
        assert!(brx.recv().await.is_none());
    }

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
