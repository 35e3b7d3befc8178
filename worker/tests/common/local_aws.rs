//! A real S3/SQS/SNS on loopback (moto's server, from the project's `.venv`), the resources a
//! Lakechain middleware has (input queue with a dead-letter queue, cache bucket, output topic with
//! an SQS subscription using raw delivery), and a `clip-worker serve` process pointed at them.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::{Value, json};

pub use clip_test_support::{Moto, free_port};

/// SDK clients for the test's own calls.
pub struct Clients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
}

pub async fn clients(moto: &Moto) -> Clients {
    let conf = moto.sdk_config().await;
    let s3 = aws_sdk_s3::config::Builder::from(&conf)
        .force_path_style(true)
        .build();
    Clients {
        s3: aws_sdk_s3::Client::from_conf(s3),
        sqs: aws_sdk_sqs::Client::new(&conf),
        sns: aws_sdk_sns::Client::new(&conf),
    }
}

/// The AWS side of one Lakechain middleware.
pub struct Stack {
    pub moto: Moto,
    pub c: Clients,
    pub docs_bucket: String,
    pub cache_bucket: String,
    pub input: String,
    pub dlq: String,
    pub topic: String,
    pub sink: String,
}

impl Stack {
    /// `max_receives`: the input queue's redrive `maxReceiveCount`.
    pub async fn create(max_receives: u32) -> Stack {
        let moto = Moto::start();
        let c = clients(&moto).await;
        let (docs_bucket, cache_bucket) = ("documents".to_string(), "cache".to_string());
        for b in [&docs_bucket, &cache_bucket] {
            c.s3.create_bucket().bucket(b).send().await.unwrap();
        }
        let dlq = c
            .sqs
            .create_queue()
            .queue_name("input-dlq")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let dlq_arn = queue_arn(&c, &dlq).await;
        let redrive =
            json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives}).to_string();
        let input = c
            .sqs
            .create_queue()
            .queue_name("input")
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let topic = c
            .sns
            .create_topic()
            .name("clip-output")
            .send()
            .await
            .unwrap()
            .topic_arn
            .unwrap();
        let sink = c
            .sqs
            .create_queue()
            .queue_name("sink")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        c.sns
            .subscribe()
            .topic_arn(&topic)
            .protocol("sqs")
            .endpoint(queue_arn(&c, &sink).await)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .unwrap();
        Stack {
            moto,
            c,
            docs_bucket,
            cache_bucket,
            input,
            dlq,
            topic,
            sink,
        }
    }

    /// Uploads `path` as `key`; returns the ETag S3 gave it (unquoted).
    pub async fn upload(&self, key: &str, path: &Path) -> String {
        let body = std::fs::read(path).unwrap();
        let out = self
            .c
            .s3
            .put_object()
            .bucket(&self.docs_bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
        out.e_tag.unwrap().trim_matches('"').to_string()
    }

    pub async fn send(&self, body: &str) {
        self.c
            .sqs
            .send_message()
            .queue_url(&self.input)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    pub async fn send_many(&self, bodies: &[String]) {
        for chunk in bodies.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(b)
                        .build()
                        .unwrap()
                })
                .collect();
            self.c
                .sqs
                .send_message_batch()
                .queue_url(&self.input)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
        }
    }

    /// Receives from `queue` until `n` messages arrived (deleting them) or `timeout` passes.
    pub async fn collect(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<aws_sdk_sqs::types::Message> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            let out = self
                .c
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .send()
                .await
                .unwrap();
            for m in out.messages.unwrap_or_default() {
                self.c
                    .sqs
                    .delete_message()
                    .queue_url(queue)
                    .receipt_handle(m.receipt_handle.clone().unwrap())
                    .send()
                    .await
                    .unwrap();
                got.push(m);
            }
        }
        got
    }

    /// (visible, in flight) of a queue.
    pub async fn depth(&self, queue: &str) -> (u64, u64) {
        let a = self
            .c
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap();
        let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
        (
            n(QueueAttributeName::ApproximateNumberOfMessages),
            n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Waits until the queue holds nothing, visible or in flight, and returns its last depth.
    /// Where a worker still runs, a redelivered duplicate can be in its hands for a moment
    /// after the last new output appeared; what matters is that it is deleted in the end.
    pub async fn settled(&self, queue: &str, timeout: std::time::Duration) -> (u64, u64) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let d = self.depth(queue).await;
            if d == (0, 0) || std::time::Instant::now() >= deadline {
                return d;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    pub async fn object(&self, bucket: &str, key: &str) -> (Vec<u8>, Option<String>) {
        let out = self
            .c
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("s3://{bucket}/{key}: {e:?}"));
        let ct = out.content_type.clone();
        (out.body.collect().await.unwrap().into_bytes().to_vec(), ct)
    }

    /// A Lakechain `document-created` event for an object in the documents bucket.
    pub fn event(&self, key: &str, mime: &str, etag: Option<&str>) -> Value {
        let url = format!("s3://{}/{}", self.docs_bucket, encode(key));
        let mut doc = json!({"url": url, "type": mime, "size": 1});
        if let Some(e) = etag {
            doc["etag"] = json!(e);
        }
        json!({
            "specversion": "1.0",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": "document-created",
            "time": "2026-11-27T10:00:00.000Z",
            "data": {
                "chainId": uuid::Uuid::new_v4().to_string(),
                "source": doc.clone(),
                "document": doc,
                "metadata": {},
                "callStack": ["s3-event-trigger"]
            }
        })
    }

    /// The environment `clip-worker serve` needs to work against this stack.
    pub fn worker_env(
        &self,
        http_port: u16,
        weights: &Path,
        cache_dir: &Path,
    ) -> Vec<(String, String)> {
        [
            ("INPUT_QUEUE_URL", self.input.clone()),
            ("SNS_TARGET_TOPIC", self.topic.clone()),
            ("LAKECHAIN_CACHE_STORAGE", self.cache_bucket.clone()),
            ("CACHE_DIR", cache_dir.display().to_string()),
            ("CLIP_WEIGHTS_DIR", weights.display().to_string()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.moto.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("HTTP_PORT", http_port.to_string()),
            ("LOG_FORMAT", "json".into()),
            ("PROGRESS_INTERVAL_SECONDS", "5".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

async fn queue_arn(c: &Clients, url: &str) -> String {
    c.sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone()
}

/// Percent-encodes each key segment as Lakechain does.
pub fn encode(key: &str) -> String {
    key.split('/')
        .map(|s| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A running `clip-worker serve`, killed on drop; its JSON logs are kept for assertions.
pub struct Worker {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Worker {
    pub fn spawn(env: &[(String, String)], log: &Path) -> Worker {
        Worker::spawn_command("serve", env, log)
    }

    /// `clip-worker <command>` with exactly `env` (which names `HTTP_PORT`), stderr to `log`.
    pub fn spawn_command(command: &str, env: &[(String, String)], log: &Path) -> Worker {
        let http_port = env
            .iter()
            .find(|(k, _)| k == "HTTP_PORT")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clip-worker"))
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn clip-worker {command}: {e}"));
        Worker {
            child,
            http_port,
            log: log.to_path_buf(),
        }
    }

    /// GET a path on the worker's HTTP port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let (status, _, body) = self.get_with_headers(path)?;
        Some((status, body))
    }

    /// Status, header block (lower-cased) and body of `GET path`.
    pub fn get_with_headers(&self, path: &str) -> Option<(u16, String, String)> {
        self.raw(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
    }

    /// `POST path` with a JSON body: (status, header block lower-cased, body).
    pub fn post(&self, path: &str, body: &[u8]) -> Option<(u16, String, String)> {
        let mut req = format!(
            "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.raw(&req)
    }

    /// Sends `request` as is on a new connection and reads the answer to its end.
    pub fn raw(&self, request: &[u8]) -> Option<(u16, String, String)> {
        let buf = clip_test_support::http_exchange(self.http_port, request)?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
        Some((status, head.to_ascii_lowercase(), body.to_string()))
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The value of a Prometheus sample (first line starting with `prefix`).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit; returns the status (its `Display` names a killing signal) and how long it
    /// took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (s, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("worker did not exit within {timeout:?}:\n{}", self.logs());
    }

    /// Peak resident memory so far, in MiB (from /proc).
    pub fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Parsed JSON log lines.
    pub fn log_lines(&self) -> Vec<Value> {
        BufReader::new(std::fs::File::open(&self.log).unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `n` events for copies of fixture photos; returns the event ids.
pub async fn send_photos(stack: &Stack, n: usize) -> HashSet<String> {
    let f = super::common::fixtures().join("images");
    let files = [
        "chelsea-baseline.jpg",
        "astronaut.png",
        "coffee.gif",
        "hopper-lossy.webp",
        "motorcycle.bmp",
    ];
    let mimes = [
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "image/bmp",
    ];
    let mut etags = Vec::new();
    for file in files {
        etags.push(stack.upload(&format!("p/{file}"), &f.join(file)).await);
    }
    let mut ids = HashSet::new();
    let mut bodies = Vec::new();
    for i in 0..n {
        let j = i % files.len();
        let ev = stack.event(&format!("p/{}", files[j]), mimes[j], Some(&etags[j]));
        ids.insert(ev["id"].as_str().unwrap().to_string());
        bodies.push(ev.to_string());
    }
    stack.send_many(&bodies).await;
    ids
}

pub fn output_ids(outputs: &[aws_sdk_sqs::types::Message]) -> Vec<String> {
    outputs
        .iter()
        .map(|m| {
            serde_json::from_str::<Value>(m.body.as_deref().unwrap()).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
