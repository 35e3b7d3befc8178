//! Reads queue depth for the builtin scaler (`sqs:GetQueueAttributes`, the only AWS permission
//! the operator needs). One client per region, created on first use, from the standard AWS
//! configuration chain (IRSA in the cluster; `AWS_ENDPOINT_URL` for emulators).

use std::collections::HashMap;

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::types::QueueAttributeName;
use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::runner::{QueueDepths, ScalerError};

/// Visible and in-flight message counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
}

/// Queue readers by region.
#[derive(Default)]
pub struct QueueReader {
    clients: Mutex<HashMap<String, aws_sdk_sqs::Client>>,
    /// Endpoint override (otherwise the SDK's own, which honours `AWS_ENDPOINT_URL`).
    endpoint: Option<String>,
    /// Fixed credentials, for emulators only.
    static_credentials: bool,
}

impl QueueReader {
    pub fn new(endpoint: Option<String>) -> Self {
        QueueReader {
            clients: Mutex::default(),
            endpoint,
            static_credentials: false,
        }
    }

    /// A reader for a local emulator (tests): its endpoint and dummy credentials.
    pub fn for_emulator(endpoint: &str) -> Self {
        QueueReader {
            clients: Mutex::default(),
            endpoint: Some(endpoint.into()),
            static_credentials: true,
        }
    }

    async fn client(&self, region: &str) -> aws_sdk_sqs::Client {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(region) {
            return c.clone();
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // A read is small: retried with backoff inside the call, and bounded, so one slow
            // queue cannot hold its processor's loop past a few polling intervals.
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(20))
                    .build(),
            )
            .region(aws_config::Region::new(region.to_string()));
        if let Some(e) = &self.endpoint {
            loader = loader.endpoint_url(e);
        }
        if self.static_credentials {
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "emulator",
            ));
        }
        let conf = loader.load().await;
        let c = aws_sdk_sqs::Client::new(&conf);
        clients.insert(region.to_string(), c.clone());
        c
    }

    /// `ApproximateNumberOfMessages` and `ApproximateNumberOfMessagesNotVisible`.
    pub async fn depth(&self, region: &str, queue_url: &str) -> Result<QueueDepth, String> {
        let out = self
            .client(region)
            .await
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "GetQueueAttributes {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })?;
        let attrs = out.attributes.unwrap_or_default();
        let count = |k: QueueAttributeName| -> Result<u64, String> {
            attrs
                .get(&k)
                .ok_or_else(|| format!("GetQueueAttributes {queue_url}: no {k} in the reply"))?
                .parse()
                .map_err(|e| format!("GetQueueAttributes {queue_url}: {k}: {e}"))
        };
        Ok(QueueDepth {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages)?,
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
        })
    }
}

impl QueueDepths for QueueReader {
    fn depth<'a>(
        &'a self,
        region: &'a str,
        queue_url: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, ScalerError>> {
        Box::pin(async move {
            QueueReader::depth(self, region, queue_url)
                .await
                .map_err(ScalerError::Queue)
        })
    }
}
