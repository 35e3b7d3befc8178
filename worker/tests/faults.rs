//! `clip-worker serve` while AWS misbehaves. A fault-injecting proxy (`common/fault_proxy.rs`)
//! sits between the worker and moto and, per operation, answers 5xx or throttling errors, adds
//! latency, resets connections, or takes the whole endpoint away. Each test ends with every
//! message accounted for: one output per event, nothing dead-lettered, the input queue empty,
//! one vector file per distinct image (a redone image overwrites its file with the same
//! content). Duplicate outputs are counted, bounded and reported; each test prints a `FAULT:`
//! line, the row of the fault matrix in BENCHMARKS.md.
//!
//! Out of scope: moto itself restarting (it keeps its state in memory, so a restart loses the
//! queues and buckets, which real AWS never does).

mod common;
#[path = "common/fault_proxy.rs"]
mod fault_proxy;
#[path = "common/local_aws.rs"]
mod local_aws;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{fixtures, rt};
use fault_proxy::{Fault, FaultProxy};
use local_aws::{Stack, Worker, free_port, output_ids, send_photos};

fn tmp(name: &str) -> PathBuf {
    common::scratch("clip-fault", name)
}

/// A stack, the proxy in front of it, and a worker that reaches AWS only through the proxy.
struct Run {
    rt: tokio::runtime::Runtime,
    stack: Stack,
    proxy: FaultProxy,
    worker: Worker,
}

/// The duplicate outputs a fault may cause at most: every message redone once more per second
/// of fault is far above what at-least-once delivery needs; a runaway loop breaks it.
const MAX_RECEIVES: u32 = 10;

fn start(name: &str, extra: &[(&str, &str)]) -> Run {
    let rt = rt();
    let stack = rt.block_on(Stack::create(MAX_RECEIVES));
    let proxy = FaultProxy::start(&stack.moto.endpoint);
    let dir = tmp(name);
    let mut env = stack.worker_env(free_port(), &fixtures().join("models/tiny"), &dir);
    for (k, v) in env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = proxy.endpoint.clone();
        }
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    Run {
        rt,
        stack,
        proxy,
        worker,
    }
}

impl Run {
    /// Collects outputs, after those already `seen`, until every one of `ids` is out (or
    /// `timeout`); returns them all, duplicates included, and when the last new one arrived.
    fn outputs_for(
        &self,
        ids: &HashSet<String>,
        mut seen: Vec<String>,
        timeout: Duration,
    ) -> (Vec<String>, Instant) {
        let deadline = Instant::now() + timeout;
        let mut last_new = Instant::now();
        loop {
            let unique: HashSet<&String> = seen.iter().collect();
            if unique.len() >= ids.len() || Instant::now() >= deadline {
                break;
            }
            let got = output_ids(&self.rt.block_on(self.stack.collect(
                &self.stack.sink,
                ids.len(),
                Duration::from_secs(2),
            )));
            for id in got {
                if !seen.contains(&id) {
                    last_new = Instant::now();
                }
                seen.push(id);
            }
        }
        (seen, last_new)
    }

    /// Asserts that every message is accounted for; prints and returns the fault-matrix row.
    fn account(
        &self,
        name: &str,
        fault: &str,
        ids: &HashSet<String>,
        outputs: &[String],
        fault_ended: Instant,
        last_new: Instant,
    ) -> usize {
        let unique: HashSet<String> = outputs.iter().cloned().collect();
        let missing: Vec<&String> = ids.difference(&unique).collect();
        assert!(
            missing.is_empty(),
            "{name}: {} of {} events have no output:\n{}",
            missing.len(),
            ids.len(),
            self.worker.logs()
        );
        assert!(unique.is_subset(ids), "{name}: outputs for unknown events");
        // Duplicates still in flight are deleted in the end, and nothing went to the DLQ.
        assert_eq!(
            self.rt.block_on(
                self.stack
                    .settled(&self.stack.input, Duration::from_secs(60))
            ),
            (0, 0),
            "{name}: the input queue is empty in the end"
        );
        // What was redone after a failed delete is published again: count it too.
        let mut outputs = outputs.to_vec();
        outputs.extend(output_ids(&self.rt.block_on(self.stack.collect(
            &self.stack.sink,
            usize::MAX,
            Duration::from_secs(3),
        ))));
        let dead = self.rt.block_on(self.stack.depth(&self.stack.dlq));
        assert_eq!(dead, (0, 0), "{name}: nothing dead-lettered");
        let listed = self
            .rt
            .block_on(
                self.stack
                    .c
                    .s3
                    .list_objects_v2()
                    .bucket(&self.stack.cache_bucket)
                    .send(),
            )
            .unwrap();
        assert_eq!(
            listed.key_count,
            Some(5),
            "{name}: one vector file per distinct image"
        );
        let duplicates = outputs.len() - unique.len();
        assert!(
            duplicates <= ids.len() * MAX_RECEIVES as usize,
            "{name}: {duplicates} duplicates for {} events",
            ids.len()
        );
        let recovery = last_new.saturating_duration_since(fault_ended);
        println!(
            "FAULT: {name} | {fault} | in {} | out {} | dead-lettered 0 | duplicates {duplicates} | last output {:.1} s after the fault ended",
            ids.len(),
            unique.len(),
            recovery.as_secs_f64()
        );
        duplicates
    }

    fn wait_first_output(&self) -> Vec<String> {
        let first = output_ids(&self.rt.block_on(self.stack.collect(
            &self.stack.sink,
            1,
            Duration::from_secs(60),
        )));
        assert!(
            !first.is_empty(),
            "no output at all:\n{}",
            self.worker.logs()
        );
        first
    }
}

/// Sends `n` events, injects `fault` on `op` for `secs` once the first output is out (mid-burst),
/// and checks that everything is accounted for.
fn scenario(
    name: &str,
    op: &'static str,
    fault: Fault,
    secs: u64,
    n: usize,
    env: &[(&str, &str)],
) -> Run {
    let run = start(name, env);
    // A first wave is under way when the fault starts; the second arrives during it.
    let mut ids = run.rt.block_on(send_photos(&run.stack, n / 4));
    let first = run.wait_first_output();
    run.proxy.inject(op, fault, Duration::from_secs(secs));
    let fault_ended = Instant::now() + Duration::from_secs(secs);
    ids.extend(run.rt.block_on(send_photos(&run.stack, n - n / 4)));
    let (outputs, last_new) = run.outputs_for(&ids, first, Duration::from_secs(secs + 180));
    assert!(
        run.proxy.injected(op) > 0,
        "{name}: the fault never hit {op} (requests: {})",
        run.proxy.requests(op)
    );
    run.account(
        name,
        &format!("{op} {fault:?} for {secs} s"),
        &ids,
        &outputs,
        fault_ended,
        last_new,
    );
    run
}

#[test]
fn s3_get_503_for_20_s_mid_burst() {
    scenario(
        "s3-get-503",
        "s3:GetObject",
        Fault::Error(503, "SlowDown"),
        20,
        40,
        &[],
    );
}

#[test]
fn s3_put_throttled_for_20_s() {
    scenario(
        "s3-put-throttled",
        "s3:PutObject",
        Fault::Error(503, "SlowDown"),
        20,
        40,
        &[],
    );
}

#[test]
fn sns_publish_failing_for_30_s() {
    scenario(
        "sns-publish-500",
        "sns:Publish",
        Fault::Error(500, "InternalError"),
        30,
        40,
        &[],
    );
}

#[test]
fn sqs_delete_failing_for_20_s_causes_bounded_duplicates() {
    scenario(
        "sqs-delete-500",
        "sqs:DeleteMessage",
        Fault::Error(500, "InternalError"),
        20,
        40,
        // Redone sooner than after the default 60 s.
        &[("VISIBILITY_TIMEOUT", "10")],
    );
}

/// Receives failing, then the whole endpoint gone: `/readyz` turns 503 while the queue cannot be
/// read and 200 again once it can, without a restart.
fn outage(name: &str, op: &'static str, fault: Fault) {
    let secs = 30;
    let run = start(name, &[]);
    assert_eq!(run.worker.get("/readyz").unwrap().0, 200);
    run.proxy.inject(op, fault, Duration::from_secs(secs));
    let fault_ended = Instant::now() + Duration::from_secs(secs);
    let ids = run.rt.block_on(send_photos(&run.stack, 30));
    // Not ready while the queue cannot be read (a receive fails after the SDK's retries).
    while run.worker.get("/readyz").unwrap().0 == 200 {
        assert!(
            Instant::now() < fault_ended,
            "{name}: /readyz stayed 200 during the outage:\n{}",
            run.worker.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        run.worker.metric("clip_worker_ready"),
        0.0,
        "{name}: the ready gauge follows"
    );
    let (outputs, last_new) = run.outputs_for(&ids, Vec::new(), Duration::from_secs(secs + 180));
    assert_eq!(
        run.worker.get("/readyz").unwrap().0,
        200,
        "{name}: ready again after the outage, with no restart"
    );
    assert!(run.proxy.injected(op) > 0);
    run.account(
        name,
        &format!(
            "{} {fault:?} for {secs} s",
            if op.is_empty() { "everything" } else { op }
        ),
        &ids,
        &outputs,
        fault_ended,
        last_new,
    );
}

#[test]
fn sqs_receive_failing_for_30_s() {
    outage(
        "sqs-receive-500",
        "sqs:ReceiveMessage",
        Fault::Error(500, "InternalError"),
    );
}

#[test]
fn the_whole_endpoint_down_for_30_s_then_back() {
    outage("endpoint-down", "", Fault::Reset);
}

/// A batch that takes three times the visibility timeout (its S3 reads are slowed to 10 s with
/// a 3 s timeout) still yields each event exactly once, with no second receive: the heartbeat
/// keeps the messages invisible. Without it they reappear after 3 s and are done twice.
#[test]
fn the_heartbeat_keeps_a_slow_batch_invisible() {
    let run = start("heartbeat", &[("VISIBILITY_TIMEOUT", "3")]);
    run.proxy.inject(
        "s3:GetObject",
        Fault::Delay(Duration::from_secs(10)),
        Duration::from_secs(15),
    );
    let n = 10;
    let ids = run.rt.block_on(send_photos(&run.stack, n));
    let (mut outputs, _) = run.outputs_for(&ids, Vec::new(), Duration::from_secs(120));
    // Anything done twice would show up within a few seconds of the first copy.
    outputs.extend(output_ids(&run.rt.block_on(run.stack.collect(
        &run.stack.sink,
        n,
        Duration::from_secs(5),
    ))));
    let unique: HashSet<String> = outputs.iter().cloned().collect();
    assert_eq!(unique, ids, "every event out");
    assert_eq!(
        outputs.len(),
        n,
        "each event exactly once (no redelivery while its batch was slow):\n{}",
        run.worker.logs()
    );
    let handled: f64 = ["succeeded", "retried_transient", "released"]
        .iter()
        .map(|o| {
            run.worker
                .metric(&format!("clip_worker_messages_total{{outcome=\"{o}\"}}"))
        })
        .sum();
    assert_eq!(handled, n as f64, "one receive per message");
    assert!(run.proxy.injected("s3:GetObject") >= n as u64);
    assert!(
        run.proxy.requests("sqs:ChangeMessageVisibility") > 0,
        "the heartbeat extended the visibility"
    );
}
