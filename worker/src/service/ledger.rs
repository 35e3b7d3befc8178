//! The at-least-once ledger, as pure logic: which received messages are in flight, how many of
//! their documents are still being worked on, what happened to the finished ones, and what to do
//! with a message once its last document is done (its disposition). The pipeline feeds it
//! receives and document outcomes and carries out the dispositions with SQS calls; nothing here
//! does I/O, so every rule is unit-tested by feeding it events.

use std::collections::HashMap;

use super::metrics::MessageOutcome;
use crate::aws::Failure;

/// A message's key in the ledger: unique per receive (a redelivered message is a new entry).
pub type MsgKey = u64;

/// A message as the queue handed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub receipt: String,
    pub message_id: String,
    pub body: String,
    /// SQS's `ApproximateReceiveCount` (1 on the first delivery).
    pub receive_count: u32,
    /// When it was sent, milliseconds since the epoch, if SQS said.
    pub sent_ms: Option<u64>,
}

/// A received message while its documents are worked on. `P` is what it holds while in flight
/// (the pipeline's in-flight permit), released when the entry is dropped.
pub struct Tracked<P> {
    pub msg: Received,
    /// Documents not yet finished.
    remaining: usize,
    /// The most significant success among the finished documents.
    outcome: MessageOutcome,
    /// The failure that decides the message's fate, if any document failed.
    failure: Option<Failure>,
    _hold: P,
}

/// What [`Ledger::accept`] did with a message.
pub enum Accepted<P> {
    /// In flight under this key until each of its documents is recorded.
    Tracking(MsgKey),
    /// Nothing to work on (an unreadable body, or no documents): finished at once.
    Finished(Tracked<P>),
}

/// The messages in flight.
pub struct Ledger<P> {
    entries: HashMap<MsgKey, Tracked<P>>,
    next_key: MsgKey,
}

impl<P> Default for Ledger<P> {
    fn default() -> Self {
        Ledger {
            entries: HashMap::new(),
            next_key: 1,
        }
    }
}

impl<P> Ledger<P> {
    /// Takes a received message with `documents` to work on, or the reason its body cannot be
    /// read.
    pub fn accept(
        &mut self,
        msg: Received,
        documents: Result<usize, Failure>,
        hold: P,
    ) -> Accepted<P> {
        let (remaining, failure) = match documents {
            Ok(n) => (n, None),
            Err(f) => (0, Some(f)),
        };
        let tracked = Tracked {
            msg,
            remaining,
            outcome: MessageOutcome::Ignored,
            failure,
            _hold: hold,
        };
        if remaining == 0 {
            return Accepted::Finished(tracked);
        }
        let key = self.next_key;
        self.next_key += 1;
        self.entries.insert(key, tracked);
        Accepted::Tracking(key)
    }

    /// Records one finished document of `key`; returns the message when it was the last one.
    /// A key that is not in flight (already released at shutdown) is ignored.
    pub fn record(
        &mut self,
        key: MsgKey,
        result: Result<MessageOutcome, Failure>,
    ) -> Option<Tracked<P>> {
        let t = self.entries.get_mut(&key)?;
        t.remaining = t.remaining.saturating_sub(1);
        match result {
            Ok(outcome) => t.outcome = most_significant(t.outcome, outcome),
            // A permanent failure outranks a transient one: retrying cannot fix it.
            Err(f) if t.failure.as_ref().is_none_or(|old| !old.is_permanent()) => {
                t.failure = Some(f)
            }
            Err(_) => {}
        }
        if t.remaining == 0 {
            self.entries.remove(&key)
        } else {
            None
        }
    }

    /// The receipts of every message in flight (what the visibility heartbeat extends).
    pub fn receipts(&self) -> Vec<String> {
        self.entries
            .values()
            .map(|t| t.msg.receipt.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes every message still in flight out of the ledger (shutdown: they are released).
    pub fn drain(&mut self) -> Vec<Tracked<P>> {
        self.entries.drain().map(|(_, t)| t).collect()
    }
}

/// What the queue's configuration offers for messages that cannot be processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `FAILURE_QUEUE_URL` is set.
    pub failure_queue: bool,
    /// The input queue's redrive `maxReceiveCount`, if it has a dead-letter queue.
    pub max_receives: Option<u32>,
}

/// What to do with a finished message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Every document is done: delete the message.
    Delete(MessageOutcome),
    /// A transient failure: keep it, visible again after `delay` seconds.
    Retry { delay: i32, reason: String },
    /// A permanent failure and a failure queue: send it there with the reason, then delete it;
    /// if the failure queue cannot be reached, `fallback`.
    ToFailureQueue {
        reason: String,
        fallback: Box<Disposition>,
    },
    /// A permanent failure and a dead-letter queue: visible again at once, so the redrive policy
    /// moves it after `max_receives` receives.
    Redrive { reason: String, max_receives: u32 },
    /// A permanent failure and nowhere to put it: kept, retried after `delay` seconds.
    Keep { delay: i32, reason: String },
}

impl Disposition {
    /// The outcome counted for it.
    pub fn outcome(&self) -> MessageOutcome {
        match self {
            Disposition::Delete(o) => *o,
            Disposition::Retry { .. } => MessageOutcome::RetriedTransient,
            _ => MessageOutcome::FailedPermanent,
        }
    }
}

impl<P> Tracked<P> {
    /// The disposition of this finished message under `policy`.
    pub fn disposition(&self, policy: Policy) -> Disposition {
        let permanent = |reason: &str| match policy.max_receives {
            Some(max_receives) => Disposition::Redrive {
                reason: reason.into(),
                max_receives,
            },
            None => Disposition::Keep {
                delay: retry_delay(self.msg.receive_count + 4),
                reason: reason.into(),
            },
        };
        match &self.failure {
            None => Disposition::Delete(self.outcome),
            Some(Failure::Transient(reason)) => Disposition::Retry {
                delay: retry_delay(self.msg.receive_count),
                reason: reason.clone(),
            },
            Some(Failure::Permanent(reason)) if policy.failure_queue => {
                Disposition::ToFailureQueue {
                    reason: reason.clone(),
                    fallback: Box::new(permanent(reason)),
                }
            }
            Some(Failure::Permanent(reason)) => permanent(reason),
        }
    }
}

/// Seconds before a transiently failed message is retried: 15 s, doubling per receive, at most
/// 15 minutes.
pub fn retry_delay(receive_count: u32) -> i32 {
    let exp = receive_count.saturating_sub(1).min(6);
    (15i32 << exp).min(900)
}

/// The outcome a message reports when its documents had several (successes only).
fn most_significant(a: MessageOutcome, b: MessageOutcome) -> MessageOutcome {
    use MessageOutcome::*;
    let rank = |o: MessageOutcome| match o {
        Ignored => 0,
        Skipped => 1,
        Forwarded => 2,
        _ => 3,
    };
    if rank(b) >= rank(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MessageOutcome::*;

    fn msg(id: &str, receive_count: u32) -> Received {
        Received {
            receipt: format!("r-{id}"),
            message_id: id.into(),
            body: "{}".into(),
            receive_count,
            sent_ms: None,
        }
    }

    const DLQ: Policy = Policy {
        failure_queue: false,
        max_receives: Some(5),
    };

    fn tracking<P>(a: Accepted<P>) -> MsgKey {
        match a {
            Accepted::Tracking(k) => k,
            Accepted::Finished(_) => panic!("finished at once"),
        }
    }

    fn finished<P>(a: Accepted<P>) -> Tracked<P> {
        match a {
            Accepted::Finished(t) => t,
            Accepted::Tracking(_) => panic!("tracked"),
        }
    }

    #[test]
    fn a_message_is_deleted_after_its_last_document_with_its_best_outcome() {
        let mut l = Ledger::default();
        let k = tracking(l.accept(msg("a", 1), Ok(3), ()));
        assert_eq!(l.receipts(), ["r-a"]);
        assert!(l.record(k, Ok(Skipped)).is_none());
        assert!(l.record(k, Ok(Succeeded)).is_none());
        let t = l
            .record(k, Ok(Forwarded))
            .expect("the last document finishes it");
        assert_eq!(t.disposition(DLQ), Disposition::Delete(Succeeded));
        assert!(l.is_empty(), "out of the ledger, out of the heartbeat");
        // A late record for a finished or released message changes nothing.
        assert!(l.record(k, Ok(Succeeded)).is_none());
    }

    #[test]
    fn a_redelivery_is_a_new_entry() {
        let mut l = Ledger::default();
        let a = tracking(l.accept(msg("a", 1), Ok(1), ()));
        let b = tracking(l.accept(msg("a", 2), Ok(1), ()));
        assert_ne!(a, b);
        assert_eq!(l.len(), 2);
        let t = l.record(b, Ok(Succeeded)).unwrap();
        assert_eq!(t.msg.receive_count, 2);
        assert_eq!(l.receipts(), ["r-a"]);
    }

    #[test]
    fn nothing_to_do_finishes_at_once() {
        let mut l: Ledger<()> = Ledger::default();
        // An S3 test event: no documents, deleted.
        let t = finished(l.accept(msg("test-event", 1), Ok(0), ()));
        assert_eq!(t.disposition(DLQ), Disposition::Delete(Ignored));
        // An unreadable body: a permanent failure at once.
        let t = finished(l.accept(
            msg("junk", 1),
            Err(Failure::Permanent("not a Lakechain event".into())),
            (),
        ));
        assert_eq!(
            t.disposition(DLQ),
            Disposition::Redrive {
                reason: "not a Lakechain event".into(),
                max_receives: 5
            }
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_transient_failure_is_retried_later_and_backs_off() {
        let mut l = Ledger::default();
        for (receive_count, delay) in [(1, 15), (2, 30), (3, 60), (50, 900)] {
            let k = tracking(l.accept(msg("a", receive_count), Ok(2), ()));
            l.record(k, Ok(Succeeded));
            let t = l
                .record(k, Err(Failure::Transient("S3 503".into())))
                .unwrap();
            let d = t.disposition(DLQ);
            assert_eq!(
                d,
                Disposition::Retry {
                    delay,
                    reason: "S3 503".into()
                }
            );
            assert_eq!(d.outcome(), RetriedTransient);
        }
    }

    #[test]
    fn a_permanent_failure_outranks_a_transient_one_in_either_order() {
        for order in [[false, true], [true, false]] {
            let mut l = Ledger::default();
            let k = tracking(l.accept(msg("a", 1), Ok(2), ()));
            let mut last = None;
            for permanent in order {
                let f = if permanent {
                    Failure::Permanent("corrupt JPEG".into())
                } else {
                    Failure::Transient("throttled".into())
                };
                last = l.record(k, Err(f));
            }
            let d = last.unwrap().disposition(DLQ);
            assert_eq!(
                d,
                Disposition::Redrive {
                    reason: "corrupt JPEG".into(),
                    max_receives: 5
                },
                "{order:?}"
            );
            assert_eq!(d.outcome(), FailedPermanent);
        }
    }

    #[test]
    fn permanent_failures_go_where_the_queue_configuration_allows() {
        let mut l = Ledger::default();
        let k = tracking(l.accept(msg("a", 2), Ok(1), ()));
        let t = l
            .record(k, Err(Failure::Permanent("not an image".into())))
            .unwrap();
        let reason = || "not an image".to_string();
        // A failure queue first, with the redrive policy behind it.
        assert_eq!(
            t.disposition(Policy {
                failure_queue: true,
                max_receives: Some(3)
            }),
            Disposition::ToFailureQueue {
                reason: reason(),
                fallback: Box::new(Disposition::Redrive {
                    reason: reason(),
                    max_receives: 3
                })
            }
        );
        // Neither: kept and retried slowly (receive 2 + 4 = 6th step: 480 s), never lost.
        let nowhere = Policy {
            failure_queue: false,
            max_receives: None,
        };
        assert_eq!(
            t.disposition(nowhere),
            Disposition::Keep {
                delay: 480,
                reason: reason()
            }
        );
        assert_eq!(
            t.disposition(Policy {
                failure_queue: true,
                ..nowhere
            }),
            Disposition::ToFailureQueue {
                reason: reason(),
                fallback: Box::new(Disposition::Keep {
                    delay: 480,
                    reason: reason()
                })
            }
        );
    }

    #[test]
    fn shutdown_drains_what_is_in_flight_and_releases_the_holds() {
        use std::sync::Arc;
        let hold = Arc::new(());
        let mut l = Ledger::default();
        let a = tracking(l.accept(msg("a", 1), Ok(1), hold.clone()));
        tracking(l.accept(msg("b", 1), Ok(2), hold.clone()));
        assert_eq!(Arc::strong_count(&hold), 3);
        let mut receipts = l.receipts();
        receipts.sort();
        assert_eq!(receipts, ["r-a", "r-b"]);
        let rest = l.drain();
        assert_eq!(rest.len(), 2);
        assert!(l.is_empty() && l.receipts().is_empty());
        drop(rest);
        assert_eq!(Arc::strong_count(&hold), 1, "every hold released");
        // A document finishing after the drain is ignored.
        assert!(l.record(a, Ok(Succeeded)).is_none());
    }
}
