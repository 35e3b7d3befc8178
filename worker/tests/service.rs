//! `clip-worker serve` end to end against a real local S3/SQS/SNS (moto's server): events in,
//! vectors in S3, enriched events out through an SQS queue subscribed to the topic with raw
//! delivery; bad inputs; `kill -9`; SIGTERM; 1,000 messages.

mod common;
#[path = "common/local_aws.rs"]
mod local_aws;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fixtures, rt};
use local_aws::{Stack, Worker, free_port, output_ids, send_photos};
use serde_json::{Value, json};

fn tmp(name: &str) -> PathBuf {
    common::scratch("clip-svc", name)
}

fn tiny() -> PathBuf {
    fixtures().join("models/tiny")
}

/// `clip-worker embed` on `files`: file -> (embedding, keywords).
fn embed_cli(files: &[PathBuf]) -> HashMap<String, (Vec<f64>, Vec<String>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
        .args(["embed", "--labels", "--weights"])
        .arg(tiny())
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let emb = v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let kw = v["keywords"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            (v["file"].as_str().unwrap().to_string(), (emb, kw))
        })
        .collect()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
}

#[test]
fn events_in_vectors_and_enriched_events_out() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(3));
    let images = fixtures().join("images");
    // (object key, fixture file, declared type, how the event arrives)
    let cases = [
        (
            "photos/cat with space.jpg",
            "chelsea-baseline.jpg",
            "image/jpeg",
            "bare",
        ),
        (
            "photos/émigré/astronaut.png",
            "astronaut.png",
            "image/png",
            "bare",
        ),
        ("coffee.gif", "coffee.gif", "image/gif", "sns-envelope"),
        ("hopper.webp", "hopper-lossy.webp", "image/webp", "bare"),
        ("moto.bmp", "motorcycle.bmp", "image/bmp", "bare"),
        ("chelsea.tiff", "chelsea.tiff", "image/tiff", "no-etag"),
        ("chelsea.pcx", "chelsea.pcx", "image/x-pcx", "bare"),
        (
            "upload/rocket.jpg",
            "rocket-original.jpg",
            "image/jpeg",
            "s3-notification",
        ),
    ];
    let mut sent: HashMap<String, (Value, &str, String)> = HashMap::new(); // fixture -> (event, how, etag)
    rt.block_on(async {
        for (key, file, mime, how) in cases {
            let etag = stack.upload(key, &images.join(file)).await;
            let mut ev = stack.event(key, mime, (how != "no-etag").then_some(etag.as_str()));
            ev["data"]["metadata"] = json!({"keywords": ["upstream"], "properties": {"kind": "image", "attrs": {"dimensions": {"width": 1}}}});
            let body = match how {
                "sns-envelope" => json!({"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": ev.to_string()}).to_string(),
                "s3-notification" => json!({"Records": [{
                    "eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "eventTime": "2026-11-27T10:00:00.000Z",
                    "s3": {"bucket": {"name": stack.docs_bucket}, "object": {"key": "upload/rocket.jpg", "size": 10, "eTag": etag}}
                }]})
                .to_string(),
                _ => ev.to_string(),
            };
            stack.send(&body).await;
            sent.insert(file.to_string(), (ev, how, etag));
        }
    });

    let dir = tmp("e2e");
    let mut env = stack.worker_env(free_port(), &tiny(), &dir);
    env.push(("BATCH_SIZE".into(), "4".into()));
    // A 64 MiB decode budget: the photos fit; the metrics report it.
    env.push(("DECODE_MEMORY".into(), (64u64 << 20).to_string()));
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    let outputs = rt.block_on(stack.collect(&stack.sink, cases.len(), Duration::from_secs(90)));
    // Which documents came out, with their event ids, so a missing or repeated one is named.
    let arrived: Vec<String> = outputs
        .iter()
        .map(|m| {
            let v: Value =
                serde_json::from_str(m.body.as_deref().unwrap_or("null")).unwrap_or_default();
            format!("{} {}", v["id"], v["data"]["document"]["url"])
        })
        .collect();
    assert_eq!(
        outputs.len(),
        cases.len(),
        "outputs: {}\n{}\n{}",
        outputs.len(),
        arrived.join("\n"),
        worker.logs()
    );

    let reference = embed_cli(
        &cases
            .iter()
            .map(|(_, f, _, _)| images.join(f))
            .collect::<Vec<_>>(),
    );
    for m in &outputs {
        let out: Value = serde_json::from_str(m.body.as_deref().unwrap()).unwrap();
        let url = out["data"]["document"]["url"].as_str().unwrap();
        let loc = clip_worker::event::parse_s3_url(url).unwrap();
        assert_eq!(loc.bucket, stack.docs_bucket);
        let (_, file, mime, how) = cases
            .iter()
            .find(|(k, ..)| loc.key == *k)
            .unwrap_or_else(|| panic!("unexpected document {url}"));
        let (input, _, etag) = &sent[*file];
        let emb = &out["data"]["metadata"]["properties"]["attrs"]["embeddings"];
        assert_eq!(emb["model"], "ViT-B/32");
        assert_eq!(emb["dimensions"], 32);
        assert_eq!(
            out["data"]["metadata"]["properties"]["kind"], "image",
            "{file}: kind stays image"
        );
        assert_eq!(out["data"]["callStack"][0], "clip-image-processor");
        assert_eq!(out["data"]["document"]["type"], *mime);
        if *how != "s3-notification" {
            for k in ["specversion", "id", "type", "time"] {
                assert_eq!(out[k], input[k], "{file}: {k} passes through");
            }
            for k in ["chainId", "source", "document"] {
                assert_eq!(
                    out["data"][k], input["data"][k],
                    "{file}: data.{k} passes through"
                );
            }
            assert_eq!(
                out["data"]["callStack"],
                json!(["clip-image-processor", "s3-event-trigger"])
            );
            assert_eq!(
                out["data"]["metadata"]["properties"]["attrs"]["dimensions"],
                json!({"width": 1})
            );
            assert_eq!(
                out["data"]["metadata"]["keywords"][0], "upstream",
                "{file}: upstream keywords kept"
            );
        }
        // The vector file: under the model's prefix, keyed by etag (or the content's SHA-256).
        let vectors = emb["vectors"].as_str().unwrap();
        let key = vectors
            .strip_prefix(&format!("s3://{}/", stack.cache_bucket))
            .unwrap();
        if *how == "no-etag" {
            assert!(
                key.starts_with("clip-image-processor/ViT-B-32/sha256-"),
                "{key}"
            );
        } else {
            assert_eq!(key, format!("clip-image-processor/ViT-B-32/{etag}"));
        }
        let (body, content_type) = rt.block_on(stack.object(&stack.cache_bucket, key));
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let vector: Vec<f64> = serde_json::from_slice(&body).unwrap();
        let (want, keywords) = &reference[images.join(file).to_str().unwrap()];
        assert!(
            close(&vector, want),
            "{file}: vector differs from `clip-worker embed`"
        );
        let ours: Vec<&str> = out["data"]["metadata"]["keywords"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for k in keywords {
            assert!(
                ours.contains(&k.as_str()),
                "{file}: keyword {k} missing from {ours:?}"
            );
        }
    }

    assert_eq!(worker.get("/healthz").unwrap().0, 200);
    // Prometheus is told it gets OpenMetrics, which is what prometheus-client writes.
    let (_, head, body) = worker.get_with_headers("/metrics").unwrap();
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert!(
        worker.metric("clip_worker_messages_total{outcome=\"succeeded\"}") >= cases.len() as f64
    );
    assert!(worker.metric("clip_worker_batch_size_count") >= 2.0);
    assert_eq!(
        worker.metric("clip_worker_decode_memory_budget_bytes"),
        (64u64 << 20) as f64
    );
    assert_eq!(worker.metric("clip_worker_decode_memory_in_use_bytes"), 0.0);
    assert_eq!(
        rt.block_on(stack.depth(&stack.input)),
        (0, 0),
        "every message deleted"
    );

    worker.signal(libc::SIGTERM);
    let (status, took) = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "exit {status}:\n{}", worker.logs());
    // At most one long poll (10 s) plus the releases.
    assert!(
        took < Duration::from_secs(15),
        "idle shutdown took {took:?}"
    );
}

#[test]
fn bad_inputs_reach_their_documented_outcomes() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(2));
    let f = fixtures();
    let mut bad_ids = HashSet::new();
    let mut good = 0;
    rt.block_on(async {
        let mut send = |body: String, bad: bool| {
            if bad {
                bad_ids.insert(body.clone());
            }
            body
        };
        let mut bodies = Vec::new();
        for (key, file, mime) in [
            (
                "bad/truncated.jpg",
                f.join("bad/truncated.jpg"),
                "image/jpeg",
            ),
            ("bad/bomb.png", f.join("bad/bomb-30000.png"), "image/png"),
            (
                "bad/not-an-image.jpg",
                f.join("bad/text-declared-jpeg.jpg"),
                "image/jpeg",
            ),
        ] {
            let etag = stack.upload(key, &file).await;
            bodies.push(send(stack.event(key, mime, Some(&etag)).to_string(), true));
        }
        bodies.push(send(
            stack
                .event("missing/object.png", "image/png", Some("x"))
                .to_string(),
            true,
        ));
        bodies.push(send("this is not json".into(), true));
        let mut no_doc = stack.event("a.png", "image/png", None);
        no_doc["data"].as_object_mut().unwrap().remove("document");
        bodies.push(send(no_doc.to_string(), true));
        // An unsupported type is acknowledged, not embedded, not dead-lettered.
        let etag = stack.upload("notes.txt", &f.join("texts.json")).await;
        bodies.push(send(
            stack
                .event("notes.txt", "text/plain", Some(&etag))
                .to_string(),
            false,
        ));
        for (key, file) in [
            ("ok/1.jpg", "chelsea-baseline.jpg"),
            ("ok/2.png", "astronaut.png"),
            ("ok/3.gif", "coffee.gif"),
        ] {
            let etag = stack.upload(key, &f.join("images").join(file)).await;
            bodies.push(send(
                stack.event(key, "image/jpeg", Some(&etag)).to_string(),
                false,
            ));
            good += 1;
        }
        stack.send_many(&bodies).await;
    });
    let dir = tmp("bad");
    let mut worker = Worker::spawn(
        &stack.worker_env(free_port(), &tiny(), &dir),
        &dir.join("worker.log"),
    );
    worker.wait_ready(Duration::from_secs(60));
    let outputs = rt.block_on(stack.collect(&stack.sink, good, Duration::from_secs(60)));
    assert_eq!(
        outputs.len(),
        good,
        "every good message is processed alongside the bad ones"
    );
    let dead = rt.block_on(stack.collect(&stack.dlq, bad_ids.len(), Duration::from_secs(60)));
    let dead_bodies: HashSet<String> = dead.iter().map(|m| m.body.clone().unwrap()).collect();
    assert_eq!(
        dead_bodies, bad_ids,
        "every bad message ends in the dead-letter queue"
    );
    assert_eq!(
        rt.block_on(stack.settled(&stack.input, Duration::from_secs(30))),
        (0, 0)
    );
    assert_eq!(
        worker.metric("clip_worker_messages_total{outcome=\"skipped\"}"),
        1.0
    );
    assert!(
        worker.metric("clip_worker_messages_total{outcome=\"failed_permanent\"}")
            >= bad_ids.len() as f64
    );
    // The worker logged a reason for each, and is still healthy.
    let logs = worker.logs();
    for reason in [
        "truncated or corrupt JPEG",
        "pixel limit",
        "not a supported image",
        "NoSuchKey",
        "not JSON",
        "data.document is missing",
        "not an image type this processor embeds",
    ] {
        assert!(logs.contains(reason), "no log line mentions {reason:?}");
    }
    assert_eq!(worker.get("/healthz").unwrap().0, 200);
    assert!(
        worker.peak_rss_mib() < 1024,
        "the bomb was refused without decoding it"
    );
}

#[test]
fn a_failure_queue_gets_the_message_and_the_reason() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(5));
    let failures = rt.block_on(async {
        let q = stack
            .c
            .sqs
            .create_queue()
            .queue_name("failures")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        stack.send("{\"not\": \"an event\"}").await;
        q
    });
    let dir = tmp("failq");
    let mut env = stack.worker_env(free_port(), &tiny(), &dir);
    env.push(("FAILURE_QUEUE_URL".into(), failures.clone()));
    env.push(("EXTRACT_LABELS".into(), "false".into()));
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    let got = rt.block_on(stack.collect(&failures, 1, Duration::from_secs(30)));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.as_deref(), Some("{\"not\": \"an event\"}"));
    let reason = got[0].message_attributes.as_ref().unwrap()["clip-failure-reason"]
        .string_value
        .clone()
        .unwrap();
    assert!(reason.contains("not a Lakechain event"), "{reason}");
    assert_eq!(
        rt.block_on(stack.depth(&stack.input)),
        (0, 0),
        "deleted from the input at once"
    );
}

/// 64 messages waiting when the worker starts are embedded in forward passes of several images
/// each: the batch-size histogram says so (with batching off, or a batcher that hands out single
/// images, every pass holds one image and this fails).
#[test]
fn waiting_messages_are_embedded_in_batches() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(10));
    let n = 64;
    let ids = rt.block_on(send_photos(&stack, n));
    let dir = tmp("batches");
    let env = stack.worker_env(free_port(), &tiny(), &dir);
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    let out = output_ids(&rt.block_on(stack.collect(&stack.sink, n, Duration::from_secs(120))));
    assert_eq!(out.into_iter().collect::<HashSet<_>>(), ids);
    let passes = worker.metric("clip_worker_batch_size_count");
    let images = worker.metric("clip_worker_batch_size_sum");
    let single = worker.metric("clip_worker_batch_size_bucket{le=\"1.0\"}");
    assert_eq!(images, n as f64, "each image in one forward pass");
    assert!(
        single < passes,
        "every one of {passes} forward passes held a single image"
    );
    assert!(
        passes <= n as f64 / 2.0,
        "{n} waiting images took {passes} forward passes (batches of {:.1} on average)",
        images / passes
    );
}

#[test]
fn kill_9_mid_batch_loses_nothing() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(10));
    let n = 150;
    let ids = rt.block_on(send_photos(&stack, n));
    let dir = tmp("kill");
    let mut env = stack.worker_env(free_port(), &tiny(), &dir);
    env.extend([
        ("VISIBILITY_TIMEOUT".into(), "4".into()),
        ("BATCH_SIZE".into(), "8".into()),
    ]);
    let mut first = Worker::spawn(&env, &dir.join("first.log"));
    first.wait_ready(Duration::from_secs(60));
    // Let it get going, then kill it without warning while messages are in flight.
    let mut seen =
        output_ids(&rt.block_on(stack.collect(&stack.sink, 10, Duration::from_secs(60))));
    assert!(!seen.is_empty());
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    let (visible, in_flight) = rt.block_on(stack.depth(&stack.input));
    assert!(
        visible + in_flight > 0,
        "the kill came too late to test anything"
    );

    let mut second = Worker::spawn(&env, &dir.join("second.log"));
    second.wait_ready(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.iter().collect::<HashSet<_>>().len() < n && Instant::now() < deadline {
        seen.extend(output_ids(&rt.block_on(stack.collect(
            &stack.sink,
            n,
            Duration::from_secs(5),
        ))));
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique, ids,
        "every message ends with an output (duplicates allowed)"
    );
    assert_eq!(
        rt.block_on(stack.settled(&stack.input, Duration::from_secs(30))),
        (0, 0),
        "every message, duplicates included, is deleted from the input in the end"
    );
    // Duplicates point at the same vector file, which retries overwrite with identical content.
    let listed = rt
        .block_on(
            stack
                .c
                .s3
                .list_objects_v2()
                .bucket(&stack.cache_bucket)
                .send(),
        )
        .unwrap();
    assert_eq!(
        listed.key_count,
        Some(5),
        "one vector file per distinct image"
    );
}

#[test]
fn sigterm_finishes_or_releases_what_is_in_flight() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(10));
    rt.block_on(send_photos(&stack, 40));
    let dir = tmp("term");
    // The full ViT-B/32 shape: when the receivers stop, the batcher hands what it holds to the
    // inference thread, and that forward takes long enough to still run when the queue side is
    // done. The process must wait for it (exiting under a running libtorch was a segfault).
    let mut env = stack.worker_env(free_port(), &fixtures().join("models/vit-b-32"), &dir);
    // A long batch wait keeps images waiting in the batcher; no grace: what is unfinished at
    // SIGTERM must be released at once, not after the 60 s visibility timeout.
    env.extend([
        ("BATCH_SIZE".into(), "1000".into()),
        ("BATCH_WAIT_MS".into(), "60000".into()),
        ("SHUTDOWN_GRACE_SECONDS".into(), "0".into()),
        ("EXTRACT_LABELS".into(), "false".into()),
    ]);
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("clip_worker_in_flight_messages") < 20.0 {
        assert!(
            Instant::now() < deadline,
            "messages never got in flight:\n{}",
            worker.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    worker.signal(libc::SIGTERM);
    let (status, took) = worker.wait_exit(Duration::from_secs(30));
    let logs = worker.logs();
    assert_eq!(status.code(), Some(0), "exit {status}:\n{logs}");
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    // The forward in progress at shutdown ran to its end before the process exited: nothing
    // failed, nothing was logged after "stopped".
    assert!(!logs.contains("inference failed"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        logs.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.contains(r#""message":"stopped""#)),
        "{logs}"
    );
    let (visible, in_flight) = rt.block_on(stack.depth(&stack.input));
    assert_eq!(in_flight, 0, "nothing left invisible");
    assert_eq!(
        visible, 40,
        "every unfinished message is visible again at once"
    );
}

#[test]
fn a_thousand_messages() {
    let rt = rt();
    let stack = rt.block_on(Stack::create(5));
    let n = 1000;
    let dir = tmp("load");
    let mut env = stack.worker_env(free_port(), &tiny(), &dir);
    env.extend([
        ("RECEIVE_CONCURRENCY".into(), "4".into()),
        ("MAX_IN_FLIGHT".into(), "100".into()),
    ]);
    let mut worker = Worker::spawn(&env, &dir.join("worker.log"));
    worker.wait_ready(Duration::from_secs(60));
    // moto's ReceiveMessage scans the whole queue (0.4 s per call at a depth of 1,000; real SQS
    // does not), so the producer keeps the queue at most ~200 deep, as a pipeline upstream would,
    // while the collector drains the output: this measures the worker, not moto's scan.
    let started = Instant::now();
    let (ids, outputs) = rt.block_on(async {
        let producer = async {
            let mut ids = HashSet::new();
            for _ in 0..n / 20 {
                while stack.depth(&stack.input).await.0 > 20 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                ids.extend(send_photos(&stack, 20).await);
            }
            ids
        };
        let collector = async {
            let mut all = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(600);
            while output_ids(&all).into_iter().collect::<HashSet<_>>().len() < n
                && Instant::now() < deadline
            {
                all.extend(
                    stack
                        .collect(&stack.sink, 100, Duration::from_secs(2))
                        .await,
                );
            }
            all
        };
        tokio::join!(producer, collector)
    });
    let secs = started.elapsed().as_secs_f64();
    let unique: HashSet<String> = output_ids(&outputs).into_iter().collect();
    assert_eq!(unique, ids, "all {n} processed");
    // At-least-once: a duplicate (an SDK retry of a publish the emulator had accepted) is
    // allowed, and reported.
    println!("LOAD: {} duplicate outputs", outputs.len() - unique.len());
    let peak = worker.peak_rss_mib();
    let rate = n as f64 / secs;
    println!(
        "LOAD: {n} messages in {secs:.1}s = {rate:.1} messages/s, peak RSS {peak} MiB (tiny model, moto on loopback)"
    );
    std::fs::create_dir_all("../target/bench").ok();
    let report =
        json!({"messages": n, "seconds": secs, "messages_per_second": rate, "peak_rss_mib": peak});
    std::fs::write("../target/bench/load.json", report.to_string()).ok();
    // Memory does not grow with queue depth: in-flight work is bounded by MAX_IN_FLIGHT.
    assert!(peak < 1500, "peak RSS {peak} MiB");
}
