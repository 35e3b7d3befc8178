//! Reads queue depth for the builtin scaler (`sqs:GetQueueAttributes`, the only AWS permission
//! the operator needs). One client per region, created on first use, from the standard AWS
//! configuration chain (IRSA in the cluster; `AWS_ENDPOINT_URL` for emulators).

use std::collections::HashMap;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::types::QueueAttributeName;
use tokio::sync::Mutex;

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
