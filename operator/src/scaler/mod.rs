//! The builtin scaler: KEDA's `aws-sqs-queue` decision as a pure function, so the same behaviour
//! is available without KEDA and is tested without a cluster.
//!
//! * queue length = visible + in flight (busy workers keep the processor active);
//! * active when the length is above `activationQueueLength` (0 by default);
//! * while workers run (or the queue is active), target `ceil(length / messagesPerInstance)`
//!   within `[max(min, 1), max]`; scaling up happens at once, scaling down only to the highest
//!   target of the stabilisation window (the HPA's rule);
//! * while inactive, no worker is started from zero, and running ones go to `minInstances` once
//!   `cooldownSeconds` have passed since the queue was last active.
//!
//! Deliberate differences: from zero we go straight to the target (KEDA activates to 1, then the
//! HPA scales up on its next sync); the stabilisation window is `min(cooldownSeconds, 300)`, and
//! the operator emits the same window in the ScaledObject of the keda engine.

pub mod runner;
pub mod sqs;
pub mod target;

use std::collections::VecDeque;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::Scaling;

/// The scale-down stabilisation window, in seconds.
pub fn stabilization_seconds(s: &Scaling) -> i32 {
    s.cooldown_seconds.min(300)
}

/// KEDA's `isActive`: the queue length is above `activationQueueLength`.
pub fn active(s: &Scaling, visible: u64, in_flight: u64) -> bool {
    visible + in_flight > s.activation_queue_length.max(0) as u64
}

/// What the decision sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleInput {
    pub visible: u64,
    pub in_flight: u64,
    /// Replicas the Deployment has now.
    pub current: i32,
    pub min: i32,
    pub max: i32,
    pub per_instance: i32,
    /// Active only above this length.
    pub activation: u64,
    pub now: Timestamp,
    /// When the queue was last seen non-empty.
    pub last_active: Option<Timestamp>,
    pub cooldown: SignedDuration,
    pub stabilization: SignedDuration,
}

impl ScaleInput {
    /// KEDA's `isActive`: the queue length is above the activation length.
    pub fn is_active(&self) -> bool {
        self.visible + self.in_flight > self.activation
    }

    pub fn from_spec(
        s: &Scaling,
        visible: u64,
        in_flight: u64,
        current: i32,
        now: Timestamp,
        last_active: Option<Timestamp>,
    ) -> Self {
        ScaleInput {
            visible,
            in_flight,
            current,
            min: s.min_instances,
            max: s.max_instances,
            per_instance: s.messages_per_instance.max(1),
            activation: s.activation_queue_length.max(0) as u64,
            now,
            last_active,
            cooldown: SignedDuration::from_secs(i64::from(s.cooldown_seconds)),
            stabilization: SignedDuration::from_secs(i64::from(stabilization_seconds(s))),
        }
    }
}

/// Why the decision is what it is (an Event reason when replicas change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Messages waiting: scale to the target now.
    ScaleUp,
    /// Fewer messages: scale down to the stabilised target.
    ScaleDown,
    /// Queue empty for the whole cooldown: down to minInstances.
    CooledDown,
    /// Queue empty, cooldown running: hold.
    Cooldown,
    /// Nothing to change.
    Steady,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaleUp => "ScaledUp",
            Reason::ScaleDown => "ScaledDown",
            Reason::CooledDown => "ScaledToMinimum",
            Reason::Cooldown => "Cooldown",
            Reason::Steady => "Steady",
        }
    }
}

/// The outcome of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub desired: i32,
    pub active: bool,
    pub reason: Reason,
}

/// Recommendations of the last stabilisation window (per processor, kept by the operator).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History(VecDeque<(Timestamp, i32)>);

impl History {
    fn record(&mut self, now: Timestamp, recommendation: i32, window: SignedDuration) -> i32 {
        self.0.push_back((now, recommendation));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            self.0.pop_front();
        }
        self.0
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommendation)
    }
}

/// One scaler tick.
pub fn decide(i: &ScaleInput, history: &mut History) -> Decision {
    let length = i.visible + i.in_flight;
    let active = i.is_active();
    let floor = i.min.max(1).min(i.max);
    let cooled = i
        .last_active
        .is_none_or(|t| i.now.duration_since(t) >= i.cooldown);
    let (desired, reason) = if active || (i.current > 0 && !(cooled && i.min == 0)) {
        // The HPA's part: it runs while there are workers, active or in cooldown (below the
        // activation length the queue may still hold messages, and they are worked on).
        let target =
            (length.div_ceil(i.per_instance as u64).min(i.max as u64) as i32).clamp(floor, i.max);
        let stabilized = history.record(i.now, target, i.stabilization);
        if target > i.current {
            (target, Reason::ScaleUp)
        } else {
            // Scale down only as far as the highest recommendation of the window allows.
            let d = stabilized.min(i.current).max(target);
            let reason = match d < i.current {
                true if !active && cooled && d == i.min => Reason::CooledDown,
                true => Reason::ScaleDown,
                false if active => Reason::Steady,
                false => Reason::Cooldown,
            };
            (d, reason)
        }
    } else if i.current < i.min {
        history.record(i.now, i.min, i.stabilization);
        (i.min, Reason::ScaleUp)
    } else {
        // Inactive with no worker, or cooled down with minInstances 0.
        history.record(i.now, i.min, i.stabilization);
        (
            i.min,
            if i.current > i.min {
                Reason::CooledDown
            } else {
                Reason::Steady
            },
        )
    };
    Decision {
        desired,
        active,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Seed defaults: min 0, max 5, 10 messages per instance, 300 s cooldown.
    fn input(visible: u64, in_flight: u64, current: i32) -> ScaleInput {
        ScaleInput::from_spec(&Scaling::default(), visible, in_flight, current, t(0), None)
    }

    #[test]
    fn the_seeds_cases_and_where_we_differ() {
        // (visible, in flight, current workers) -> desired workers. The seed counts "tasks to
        // start" and ignores running tasks; we target a total like KEDA.
        let cases = [
            // seed: 1 visible, none running -> start 1.            ours: 1
            (1, 0, 0, 1),
            // seed: 25 -> start 3.                                 ours: 3
            (25, 0, 0, 3),
            // seed: 100 -> start 5 (max).                          ours: 5
            (100, 0, 0, 5),
            // seed: 30 visible, 2 running -> starts 3 more (5 in all, running ignored).
            // ours: 30 messages need 3 workers; the 2 running ones count: 3 in all.
            (30, 0, 2, 3),
            // seed: 25 visible, 1 pending -> floor(25/10) = 2 more. ours: 3 in all.
            (25, 0, 1, 3),
            // seed: 5 visible, 1 pending -> start 0.               ours: 1 in all (the pending one).
            (5, 0, 1, 1),
            // In-flight messages count (the seed reads only visible ones): workers busy with 40
            // messages are not scaled away.
            (0, 40, 4, 4),
            (5, 45, 0, 5),
        ];
        for (visible, in_flight, current, want) in cases {
            let d = decide(&input(visible, in_flight, current), &mut History::default());
            assert_eq!(
                d.desired, want,
                "visible {visible}, in flight {in_flight}, current {current}"
            );
            assert!(d.active);
        }
    }

    #[test]
    fn scale_up_is_immediate_and_capped() {
        let d = decide(&input(10_000, 0, 1), &mut History::default());
        assert_eq!((d.desired, d.reason), (5, Reason::ScaleUp));
        let mut s = Scaling {
            min_instances: 2,
            ..Scaling::default()
        };
        s.max_instances = 3;
        let d = decide(
            &ScaleInput::from_spec(&s, 1, 0, 0, t(0), None),
            &mut History::default(),
        );
        assert_eq!(d.desired, 2, "at least minInstances while active");
    }

    #[test]
    fn scale_down_waits_for_the_stabilisation_window() {
        let mut h = History::default();
        let s = Scaling::default();
        let at = |secs, visible, current, h: &mut History| {
            decide(
                &ScaleInput::from_spec(&s, visible, 0, current, t(secs), Some(t(secs))),
                h,
            )
        };
        assert_eq!(at(0, 50, 0, &mut h).desired, 5);
        // Backlog drops to 10 messages: the 5 recommended a moment ago still hold.
        assert_eq!(at(60, 10, 5, &mut h).desired, 5);
        assert_eq!(at(200, 10, 5, &mut h).desired, 5);
        // Past the window (300 s after the last 5), down to 1.
        let d = at(301, 10, 5, &mut h);
        assert_eq!((d.desired, d.reason), (1, Reason::ScaleDown));
    }

    #[test]
    fn an_empty_queue_goes_to_minimum_only_after_the_cooldown() {
        let s = Scaling {
            cooldown_seconds: 120,
            ..Scaling::default()
        };
        let mut h = History::default();
        let tick = |secs, current, h: &mut History| {
            decide(
                &ScaleInput::from_spec(&s, 0, 0, current, t(secs), Some(t(0))),
                h,
            )
        };
        let d = tick(30, 1, &mut h);
        assert_eq!(
            (d.desired, d.reason, d.active),
            (1, Reason::Cooldown, false)
        );
        let d = tick(119, 1, &mut h);
        assert_eq!(d.desired, 1);
        let d = tick(120, 1, &mut h);
        assert_eq!((d.desired, d.reason), (0, Reason::CooledDown));
        // Already at zero: nothing to do.
        assert_eq!(tick(500, 0, &mut h).reason, Reason::Steady);
        // Never active since start (no last_active): minInstances at once.
        assert_eq!(
            decide(
                &ScaleInput::from_spec(&s, 0, 0, 3, t(0), None),
                &mut History::default()
            )
            .desired,
            0
        );
    }

    #[test]
    fn below_the_activation_length_no_worker_starts_but_running_ones_work_it_off() {
        let s = Scaling {
            activation_queue_length: 20,
            cooldown_seconds: 60,
            ..Scaling::default()
        };
        let at = |visible, current, secs, last: Option<i64>, h: &mut History| {
            decide(
                &ScaleInput::from_spec(&s, visible, 0, current, t(secs), last.map(t)),
                h,
            )
        };
        let mut h = History::default();
        // 20 messages do not start a worker (active means strictly more); 21 do, straight to
        // the target.
        let d = at(20, 0, 0, None, &mut h);
        assert_eq!((d.desired, d.active, d.reason), (0, false, Reason::Steady));
        let d = at(21, 0, 0, None, &mut h);
        assert_eq!((d.desired, d.active, d.reason), (3, true, Reason::ScaleUp));
        // Back below it with workers running: they keep following the queue (HPA), and go to
        // zero only after the cooldown from the last active read.
        let d = at(15, 3, 10, Some(0), &mut h);
        assert_eq!(
            (d.desired, d.active, d.reason),
            (3, false, Reason::Cooldown)
        );
        let d = at(15, 3, 59, Some(0), &mut h);
        assert_eq!(d.desired, 3, "stabilised");
        let d = at(15, 3, 60, Some(0), &mut h);
        assert_eq!((d.desired, d.reason), (0, Reason::CooledDown));
        // The default (0) is the old rule: any message is activity.
        let d = decide(&input(1, 0, 0), &mut History::default());
        assert!(d.active);
    }

    #[test]
    fn min_instances_are_kept_when_idle() {
        let s = Scaling {
            min_instances: 1,
            ..Scaling::default()
        };
        let d = decide(
            &ScaleInput::from_spec(&s, 0, 0, 0, t(0), None),
            &mut History::default(),
        );
        assert_eq!((d.desired, d.reason), (1, Reason::ScaleUp));
        let d = decide(
            &ScaleInput::from_spec(&s, 0, 0, 1, t(1000), Some(t(0))),
            &mut History::default(),
        );
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn the_window_follows_the_cooldown_up_to_the_hpa_default() {
        assert_eq!(
            stabilization_seconds(&Scaling {
                cooldown_seconds: 30,
                ..Scaling::default()
            }),
            30
        );
        assert_eq!(
            stabilization_seconds(&Scaling {
                cooldown_seconds: 3600,
                ..Scaling::default()
            }),
            300
        );
    }
}
