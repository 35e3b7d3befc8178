//! A budget for the pixel memory that decodes hold at the same time.
//!
//! The per-image limits bound one image; this bounds them all together. Without it, N decode
//! threads on a large node (one per core) each decoding a 100-megapixel image would need N times
//! 300-800 MB at once, past any sensible container limit, and an out-of-memory kill would send the
//! same messages back to crash the next replica. Each decode takes a [`Permit`] for about what its
//! pixels will take, read from the header before anything is allocated, and waits while the
//! budget is spent. Waiters are served in arrival order, so a large image is not starved by a
//! stream of small ones. An image larger than the whole budget waits until nothing else holds
//! memory and then runs alone.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Default budget: 2 GiB.
pub const DEFAULT_DECODE_MEMORY: u64 = 2 << 30;

/// A shared decode-memory budget (cheap to clone: clones share the budget).
#[derive(Clone)]
pub struct DecodeMemory(Arc<Inner>);

struct Inner {
    total: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    used: u64,
    peak: u64,
    /// Ticket of the next caller, and of the caller whose turn it is.
    next: u64,
    serving: u64,
}

/// Memory taken from a [`DecodeMemory`]; given back when dropped.
pub struct Permit {
    inner: Arc<Inner>,
    bytes: u64,
}

impl DecodeMemory {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: u64) -> Self {
        DecodeMemory(Arc::new(Inner {
            total: total.max(1),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }))
    }

    /// The budget, in bytes.
    pub fn total(&self) -> u64 {
        self.0.total
    }

    /// Bytes held by permits now.
    pub fn in_use(&self) -> u64 {
        self.0.lock().used
    }

    /// The most bytes permits have held at once.
    pub fn peak(&self) -> u64 {
        self.0.lock().peak
    }

    /// Takes `bytes` (at most the whole budget), waiting in turn until they are free.
    pub fn acquire(&self, bytes: u64) -> Permit {
        let inner = &self.0;
        let bytes = bytes.min(inner.total);
        let mut s = inner.lock();
        let ticket = s.next;
        s.next += 1;
        while s.serving != ticket || s.used + bytes > inner.total {
            s = inner
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        s.serving += 1;
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        drop(s);
        // The next in line may fit too.
        inner.changed.notify_all();
        Permit {
            inner: Arc::clone(inner),
            bytes,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters updated in one step: still consistent after a panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for DecodeMemory {
    fn default() -> Self {
        DecodeMemory::new(DEFAULT_DECODE_MEMORY)
    }
}

impl std::fmt::Debug for DecodeMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodeMemory({} bytes)", self.0.total)
    }
}

/// Two budgets are equal when they are configured alike (same size).
impl PartialEq for DecodeMemory {
    fn eq(&self, other: &Self) -> bool {
        self.0.total == other.0.total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.used -= self.bytes;
        drop(s);
        self.inner.changed.notify_all();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({} bytes)", self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn permits_are_returned_on_drop() {
        let m = DecodeMemory::new(100);
        let a = m.acquire(60);
        let b = m.acquire(40);
        assert_eq!(m.in_use(), 100);
        drop(a);
        assert_eq!(m.in_use(), 40);
        drop(b);
        assert_eq!((m.in_use(), m.peak()), (0, 100));
    }

    #[test]
    fn an_image_larger_than_the_budget_runs_alone() {
        let m = DecodeMemory::new(100);
        let p = m.acquire(1_000);
        assert_eq!(m.in_use(), 100);
        drop(p);
        assert_eq!(m.in_use(), 0);
    }

    #[test]
    fn a_caller_waits_until_memory_is_free() {
        let m = DecodeMemory::new(100);
        let held = m.acquire(80);
        let got = Arc::new(AtomicU64::new(0));
        let t = {
            let (m, got) = (m.clone(), Arc::clone(&got));
            std::thread::spawn(move || {
                let _p = m.acquire(50);
                got.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(got.load(Ordering::SeqCst), 0, "50 bytes fitted into 20");
        drop(held);
        t.join().unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 1);
        assert_eq!(m.peak(), 80);
    }

    #[test]
    fn many_threads_never_exceed_the_budget_and_all_finish() {
        let m = DecodeMemory::new(1_000);
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for j in 0..50u64 {
                        let _p = m.acquire(100 + (i * 37 + j * 91) % 700);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.in_use(), 0);
        assert!(m.peak() <= 1_000, "peak {}", m.peak());
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        // A large request queued behind a held permit is not overtaken by a small one that
        // arrives later and would fit.
        let m = DecodeMemory::new(100);
        let held = m.acquire(60);
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |bytes: u64, name: &'static str| {
            let (m, order) = (m.clone(), Arc::clone(&order));
            std::thread::spawn(move || {
                let _p = m.acquire(bytes);
                order.lock().unwrap().push(name);
            })
        };
        let big = spawn(90, "big");
        std::thread::sleep(Duration::from_millis(100));
        // 20 would fit beside the held 60, but not beside big's 90: it must wait its turn.
        let small = spawn(20, "small");
        std::thread::sleep(Duration::from_millis(100));
        assert!(order.lock().unwrap().is_empty(), "small overtook big");
        drop(held);
        big.join().unwrap();
        small.join().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["big", "small"]);
    }
}
