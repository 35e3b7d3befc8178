//! The scaler's cluster side on the Kubernetes API: replicas from the controller's Deployment
//! cache (no request per tick), `deployments/scale` and the status fields under the scaler's own
//! field manager, Events through the controller's recorder.

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use serde_json::json;

use super::runner::{FIELD_MANAGER, ScaleTarget, ScalerError, ScalerStatus};
use crate::crd::ClipProcessor;
use crate::reconcile::status::describe_kube;

pub struct KubeTarget {
    client: Client,
    /// The controller's cache of worker Deployments; without it (or before it has the object)
    /// the Deployment is read from the API.
    deployments: Option<Store<Deployment>>,
    recorder: Recorder,
}

impl KubeTarget {
    pub fn new(client: Client, deployments: Option<Store<Deployment>>, recorder: Recorder) -> Self {
        KubeTarget {
            client,
            deployments,
            recorder,
        }
    }
}

/// Server-side applies `status` (the scaler's fields; `{}` removes them) under the scaler's field
/// manager.
pub async fn apply_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<ClipProcessor> = Api::namespaced(client.clone(), namespace);
    let body = json!({
        "apiVersion": ClipProcessor::api_version(&()),
        "kind": ClipProcessor::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

fn replicas_of(d: &Deployment) -> i32 {
    // The API server defaults an unset count to 1.
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

impl ScaleTarget for KubeTarget {
    fn replicas<'a>(
        &'a self,
        namespace: &'a str,
        deployment: &'a str,
    ) -> BoxFuture<'a, Result<Option<i32>, ScalerError>> {
        Box::pin(async move {
            if let Some(d) = self
                .deployments
                .as_ref()
                .and_then(|s| s.get(&ObjectRef::new(deployment).within(namespace)))
            {
                return Ok(Some(replicas_of(&d)));
            }
            Api::<Deployment>::namespaced(self.client.clone(), namespace)
                .get_opt(deployment)
                .await
                .map(|d| d.as_ref().map(replicas_of))
                .map_err(|e| ScalerError::Deployment(describe_kube(&e)))
        })
    }

    fn scale<'a>(
        &'a self,
        namespace: &'a str,
        deployment: &'a str,
        replicas: i32,
    ) -> BoxFuture<'a, Result<(), ScalerError>> {
        Box::pin(async move {
            crate::reconcile::apply::scale(&self.client, namespace, deployment, replicas)
                .await
                .map_err(|e| ScalerError::Scale(describe_kube(&e)))
        })
    }

    fn write_status<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        status: &'a ScalerStatus,
    ) -> BoxFuture<'a, Result<(), ScalerError>> {
        Box::pin(async move {
            let status = serde_json::to_value(status)
                .map_err(|e| ScalerError::Status(format!("cannot encode status: {e}")))?;
            apply_status(&self.client, namespace, name, status)
                .await
                .map_err(|e| ScalerError::Status(describe_kube(&e)))
        })
    }

    fn event<'a>(
        &'a self,
        processor: &'a ObjectReference,
        reason: &'a str,
        note: String,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ev = Event {
                type_: EventType::Normal,
                reason: reason.into(),
                note: Some(note),
                action: "Scale".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, processor).await {
                tracing::debug!("cannot publish an event: {e}");
            }
        })
    }
}
