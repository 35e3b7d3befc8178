//! `clip-worker query` as a client sees it: the vectors equal `clip-worker embed`'s for the same
//! inputs, concurrent requests share forward passes, a full queue answers 429 with Retry-After,
//! and bad requests get OpenAI-shaped errors, never a crash.

mod common;
#[path = "common/local_aws.rs"]
mod local_aws;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::fixtures;
use local_aws::{Worker, free_port};
use serde_json::{Value, json};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("clip-query-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(name: &str, extra: &[(&str, &str)]) -> Worker {
    let dir = tmp(name);
    let mut env: Vec<(String, String)> = vec![
        ("HTTP_PORT".into(), free_port().to_string()),
        (
            "CLIP_WEIGHTS_DIR".into(),
            fixtures().join("models/tiny").display().to_string(),
        ),
        ("CACHE_DIR".into(), dir.join("cache").display().to_string()),
        ("CLIP_DEVICE".into(), "cpu".into()),
        ("LOG_FORMAT".into(), "json".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut w = Worker::spawn_command("query", &env, &dir.join("query.log"));
    w.wait_ready(Duration::from_secs(60));
    w
}

fn post(w: &Worker, body: &Value) -> (u16, String, Value) {
    let (status, head, text) = w
        .post("/v1/embeddings", body.to_string().as_bytes())
        .expect("no answer");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, head, v)
}

fn b64(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

/// `clip-worker embed` lines for the same inputs.
fn embed_cli(files: &[&Path], texts: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip-worker"));
    cmd.arg("embed")
        .arg("--weights")
        .arg(fixtures().join("models/tiny"))
        .args(["--device", "cpu"]);
    cmd.args(files);
    for t in texts {
        cmd.args(["--text", t]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn vectors_equal_the_embed_command_in_every_encoding() {
    let f = fixtures();
    let images = [
        f.join("images/chelsea-baseline.jpg"),
        f.join("images/astronaut.png"),
        f.join("images/coffee.gif"),
    ];
    // The third is over CLIP's 77 tokens: truncated, as CLIP's tokenizer does.
    let long = "a photo of a red car parked in front of a house ".repeat(12);
    let texts = ["a photo of a cat", "un chat", long.as_str()];
    let want = embed_cli(
        &images.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        &texts,
    );
    let w = start("equal", &[("BATCH_WAIT_MS", "50")]);

    // The same batches as the command: the images together, the texts together.
    let inputs: Vec<Value> = images.iter().map(|p| json!({"image": b64(p)})).collect();
    let (status, _, r) = post(&w, &json!({"model": "ViT-B/32", "input": inputs}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "list");
    assert_eq!(r["model"], "ViT-B/32");
    for (i, d) in r["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(
            d["embedding"], want[i]["embedding"],
            "image {i}: the endpoint's vector is the command's, bit for bit"
        );
    }
    let (status, _, r) = post(&w, &json!({"model": "ViT-B/32", "input": texts}));
    assert_eq!(status, 200, "{r}");
    for (i, d) in r["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            d["embedding"],
            want[images.len() + i]["embedding"],
            "text {i}"
        );
    }
    // Start and end tokens count; the long text is truncated to 77.
    let tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 77 && tokens < 77 + 20, "{tokens}");
    assert_eq!(r["usage"]["total_tokens"], tokens);

    // base64: little-endian float32 of the same numbers.
    let (_, _, r) = post(
        &w,
        &json!({"model": "ViT-B/32", "input": texts, "encoding_format": "base64"}),
    );
    for (i, d) in r["data"].as_array().unwrap().iter().enumerate() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d["embedding"].as_str().unwrap())
            .unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, floats(&want[images.len() + i]["embedding"]), "text {i}");
    }

    // Normalised on request: unit length, the same direction.
    let (_, _, r) = post(
        &w,
        &json!({"model": "ViT-B/32", "input": texts, "normalize": true}),
    );
    for (i, d) in r["data"].as_array().unwrap().iter().enumerate() {
        let v = floats(&d["embedding"]);
        let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let cos = common::cosine(&v, &floats(&want[images.len() + i]["embedding"]));
        assert!(cos > 0.99999, "{cos}");
    }

    let (status, body) = w.get("/v1/models").unwrap();
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "ViT-B/32");
}

#[test]
fn concurrent_requests_share_forward_passes() {
    let w = start("batch", &[("BATCH_WAIT_MS", "100"), ("BATCH_SIZE", "64")]);
    let n = 32;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let w = &w;
                s.spawn(move || {
                    post(
                        w,
                        &json!({"model": "ViT-B/32", "input": format!("query number {i}")}),
                    )
                })
            })
            .collect();
        for h in handles {
            let (status, _, r) = h.join().unwrap();
            assert_eq!(status, 200, "{r}");
            assert_eq!(r["data"].as_array().unwrap().len(), 1);
        }
    });
    let inputs = w.metric("clip_query_batch_size_sum{kind=\"text\"}");
    let forwards = w.metric("clip_query_batch_size_count{kind=\"text\"}");
    assert_eq!(inputs, n as f64);
    assert!(
        forwards < n as f64 / 2.0,
        "{n} concurrent single-text requests took {forwards} forward passes"
    );
    assert_eq!(
        w.metric("clip_query_requests_total{code=\"200\"}"),
        n as f64
    );
    assert_eq!(w.metric("clip_query_queue_depth"), 0.0);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // Two inputs wait in the batcher for 3 s; the queue holds two.
    let w = start(
        "full",
        &[
            ("BATCH_WAIT_MS", "3000"),
            ("BATCH_SIZE", "8"),
            ("QUERY_MAX_QUEUE", "2"),
            ("QUERY_MAX_INPUTS", "2"),
        ],
    );
    std::thread::scope(|s| {
        let first = s.spawn(|| post(&w, &json!({"model": "ViT-B/32", "input": ["a", "b"]})));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while w.metric("clip_query_queue_depth") < 2.0 {
            assert!(std::time::Instant::now() < deadline, "never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (status, head, r) = post(&w, &json!({"model": "ViT-B/32", "input": "c"}));
        assert_eq!(status, 429, "{r}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert_eq!(r["error"]["type"], "rate_limit_error");
        let (status, _, r) = first.join().unwrap();
        assert_eq!(status, 200, "the queued request still completes: {r}");
    });
    let (status, _, _) = post(&w, &json!({"model": "ViT-B/32", "input": "c"}));
    assert_eq!(status, 200, "room again once answered");
}

#[test]
fn bad_requests_get_openai_errors_and_never_a_crash() {
    let w = start(
        "bad",
        &[
            ("QUERY_MAX_INPUTS", "4"),
            ("QUERY_MAX_BODY_BYTES", "4000000"),
        ],
    );
    let f = fixtures();
    let check = |status: u16, body: &[u8], param: Option<&str>, says: &str| {
        let (got, _, text) = w.post("/v1/embeddings", body).expect("no answer");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(got, status, "{}: {v}", String::from_utf8_lossy(body));
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{msg:?} should say {says:?}");
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    };
    check(400, b"{not json", None, "not valid JSON");
    check(400, b"", None, "not valid JSON");
    check(
        400,
        br#"{"input":"a"}"#,
        Some("model"),
        "`model` is required",
    );
    check(
        404,
        br#"{"model":"text-embedding-3-small","input":"a"}"#,
        Some("model"),
        "serves ViT-B/32",
    );
    check(
        400,
        br#"{"model":"ViT-B/32","input":[[1,2]]}"#,
        Some("input[0]"),
        "token id",
    );
    check(
        400,
        br#"{"model":"ViT-B/32","input":["a","b","c","d","e"]}"#,
        Some("input"),
        "QUERY_MAX_INPUTS",
    );
    check(
        400,
        br#"{"model":"ViT-B/32","input":"a","dimensions":128}"#,
        Some("dimensions"),
        "cannot be shortened",
    );
    check(
        400,
        br#"{"model":"ViT-B/32","input":[{"image_url":"http://169.254.169.254/"}]}"#,
        Some("input[0]"),
        "not fetched",
    );
    // A corrupt image: the error the queue worker and `embed` give for the same bytes.
    let truncated = b64(&f.join("bad/truncated.jpg"));
    let body = json!({"model": "ViT-B/32", "input": ["fine", {"image": truncated}]}).to_string();
    check(
        400,
        body.as_bytes(),
        Some("input[1]"),
        "truncated or corrupt",
    );
    let body = json!({"model": "ViT-B/32", "input": [{"image": "aGVsbG8gd29ybGQ="}]}).to_string();
    check(
        400,
        body.as_bytes(),
        Some("input[0]"),
        "not a supported image",
    );
    // Over the body limit, from the declared length, before reading it.
    let (status, _, text) = w
        .raw(b"POST /v1/embeddings HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 9000000\r\n\r\n")
        .expect("no answer");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("QUERY_MAX_BODY_BYTES"), "{text}");

    // Still alive and serving, and nothing panicked.
    let (status, _, r) = post(&w, &json!({"model": "vit-b-32", "input": "still here"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(w.get("/healthz").unwrap().0, 200);
    assert!(!w.logs().contains("panicked"), "{}", w.logs());
    assert!(w.metric("clip_query_requests_total{code=\"400\"}") >= 9.0);
}

#[test]
fn sigterm_stops_cleanly() {
    let mut w = start("term", &[]);
    let (status, _, _) = post(&w, &json!({"model": "ViT-B/32", "input": "x"}));
    assert_eq!(status, 200);
    w.signal(libc::SIGTERM);
    let (status, took) = w.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", w.logs());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(w.logs().contains("stopped"), "{}", w.logs());
}
