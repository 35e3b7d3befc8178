//! Thin adapters over `aws-sdk-{s3,sqs,sns}`: the only code that talks to AWS. Every error is
//! classified once, here, as transient (throttling, 5xx, timeouts, network: retry later) or
//! permanent (missing object, access denied, bad request: retrying cannot help).

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, Message, MessageAttributeValue,
    MessageSystemAttributeName, QueueAttributeName,
};

use crate::event::S3Location;
use crate::service::ledger::Received;

/// How a failed call should be treated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// May succeed later (throttling, 5xx, timeouts, network).
    #[error("{0}")]
    Transient(String),
    /// Will not succeed with the same input.
    #[error("{0}")]
    Permanent(String),
}

impl Failure {
    pub fn is_permanent(&self) -> bool {
        matches!(self, Failure::Permanent(_))
    }
}

/// Error codes AWS uses for throttling, which come with 400 statuses.
const THROTTLING: [&str; 8] = [
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "RequestLimitExceeded",
    "KMSThrottlingException",
];

fn classify<E>(what: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            status >= 500
                || status == 429
                || se.err().code().is_some_and(|c| THROTTLING.contains(&c))
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true, // timeouts, dispatch (network) and response (truncated reply) failures
    };
    let msg = format!("{what}: {}", DisplayErrorContext(&e));
    if transient {
        Failure::Transient(msg)
    } else {
        Failure::Permanent(msg)
    }
}

/// The three clients, from the standard AWS configuration chain (environment, web identity /
/// IRSA, instance metadata) and the endpoint override (`AWS_ENDPOINT_URL` / `--aws-endpoint-url`).
#[derive(Clone)]
pub struct Aws {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
}

impl Aws {
    pub async fn from_env(region: Option<String>, endpoint_url: Option<String>) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // Retries with exponential backoff and jitter for transient failures, inside one call.
            .retry_config(RetryConfig::standard().with_max_attempts(4))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // Long polls wait up to 20 s; anything past a minute is a dead connection.
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(r) = region.filter(|r| !r.is_empty()) {
            loader = loader.region(aws_config::Region::new(r));
        }
        if let Some(url) = endpoint_url.filter(|u| !u.is_empty()) {
            loader = loader.endpoint_url(url);
        }
        let conf = loader.load().await;
        // Path-style addressing works against every S3 endpoint, emulators included.
        let s3_conf = aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build();
        Aws {
            s3: aws_sdk_s3::Client::from_conf(s3_conf),
            sqs: aws_sdk_sqs::Client::new(&conf),
            sns: aws_sdk_sns::Client::new(&conf),
        }
    }

    /// Downloads an object, refusing it when it is larger than `max_bytes` (checked from the
    /// length header, then while reading). Returns the bytes and the object's ETag.
    pub async fn get_object(
        &self,
        loc: &S3Location,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, Option<String>), Failure> {
        let mut bytes = Vec::new();
        let etag = self
            .get_object_chunks(loc, max_bytes, |chunk| {
                bytes.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok((bytes, etag))
    }

    /// Streams an object through `on_chunk` (large files never sit in memory whole), with the
    /// same size limit. Returns the object's ETag.
    pub async fn get_object_chunks(
        &self,
        loc: &S3Location,
        max_bytes: u64,
        mut on_chunk: impl FnMut(&[u8]) -> Result<(), Failure>,
    ) -> Result<Option<String>, Failure> {
        let what = format!("GetObject s3://{}/{}", loc.bucket, loc.key);
        let resp = self
            .s3
            .get_object()
            .bucket(&loc.bucket)
            .key(&loc.key)
            .send()
            .await
            .map_err(|e| classify(&what, e))?;
        let too_big = |n: u64| {
            Failure::Permanent(format!(
                "{what}: the object is {n} bytes, over the limit of {max_bytes} (--max-image-bytes)"
            ))
        };
        if let Some(len) = resp
            .content_length()
            .filter(|&l| l > 0 && l as u64 > max_bytes)
        {
            return Err(too_big(len as u64));
        }
        let etag = resp.e_tag().map(|t| t.trim_matches('"').to_string());
        let mut body = resp.body;
        let mut total = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| Failure::Transient(format!("{what}: reading the body: {e}")))?
        {
            total += chunk.len() as u64;
            if total > max_bytes {
                return Err(too_big(total));
            }
            on_chunk(&chunk)?;
        }
        Ok(etag)
    }

    /// Writes a vector file (`application/json`).
    pub async fn put_json(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), Failure> {
        let what = format!("PutObject s3://{bucket}/{key}");
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(body.into())
            .send()
            .await
            .map_err(|e| classify(&what, e))?;
        Ok(())
    }

    /// Publishes an event to the output topic.
    pub async fn publish(&self, topic: &str, message: String) -> Result<(), Failure> {
        let what = format!("Publish {topic}");
        self.sns
            .publish()
            .topic_arn(topic)
            .message(message)
            .send()
            .await
            .map_err(|e| classify(&what, e))?;
        Ok(())
    }

    /// One long poll for up to `max` messages, hidden for `visibility` seconds.
    pub async fn receive(
        &self,
        queue: &str,
        max: i32,
        wait: i32,
        visibility: i32,
    ) -> Result<Vec<Received>, Failure> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(max.clamp(1, 10))
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(|e| classify("ReceiveMessage", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(received)
            .collect())
    }

    pub async fn delete(&self, queue: &str, receipt: &str) -> Result<(), Failure> {
        self.sqs
            .delete_message()
            .queue_url(queue)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| classify("DeleteMessage", e))?;
        Ok(())
    }

    /// Sets one message's visibility timeout (0 makes it visible again at once).
    pub async fn set_visibility(
        &self,
        queue: &str,
        receipt: &str,
        seconds: i32,
    ) -> Result<(), Failure> {
        self.sqs
            .change_message_visibility()
            .queue_url(queue)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| classify("ChangeMessageVisibility", e))?;
        Ok(())
    }

    /// Extends the visibility of many messages (batches of 10). Returns how many failed.
    pub async fn extend_visibility(&self, queue: &str, receipts: &[String], seconds: i32) -> usize {
        let mut failed = 0;
        for chunk in receipts.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            match self
                .sqs
                .change_message_visibility_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => failed += out.failed.len(),
                Err(e) => {
                    tracing::warn!(
                        "visibility heartbeat failed: {}",
                        classify("ChangeMessageVisibilityBatch", e)
                    );
                    failed += chunk.len();
                }
            }
        }
        failed
    }

    /// Sends a message that cannot succeed to the failure destination, with the reason and the
    /// source queue as message attributes.
    pub async fn send_failure(
        &self,
        queue: &str,
        body: &str,
        reason: &str,
        source: &str,
    ) -> Result<(), Failure> {
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(truncate(v, 1024))
                .build()
                .ok()
        };
        self.sqs
            .send_message()
            .queue_url(queue)
            .message_body(body)
            .set_message_attributes(Some(
                [
                    ("clip-failure-reason", attr(reason)),
                    ("clip-source-queue", attr(source)),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect(),
            ))
            .send()
            .await
            .map_err(|e| classify("SendMessage (failure queue)", e))?;
        Ok(())
    }

    /// Whether the queue has a redrive policy (a dead-letter queue), and its `maxReceiveCount`.
    pub async fn redrive_max_receives(&self, queue: &str) -> Result<Option<u32>, Failure> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| classify("GetQueueAttributes", e))?;
        let policy = out
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy).cloned());
        Ok(policy.and_then(|p| {
            let v: serde_json::Value = serde_json::from_str(&p).ok()?;
            let n = &v["maxReceiveCount"];
            n.as_u64()
                .or_else(|| n.as_str()?.parse().ok())
                .map(|n| n as u32)
        }))
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The SDK's message as the ledger's domain type.
fn received(m: Message) -> Received {
    let attr = |a: MessageSystemAttributeName| m.attributes.as_ref().and_then(|x| x.get(&a));
    let receive_count = attr(MessageSystemAttributeName::ApproximateReceiveCount)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let sent_ms = attr(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse().ok());
    Received {
        receipt: m.receipt_handle.unwrap_or_default(),
        message_id: m.message_id.unwrap_or_default(),
        body: m.body.unwrap_or_default(),
        receive_count,
        sent_ms,
    }
}
