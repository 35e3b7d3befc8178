//! The only place that writes children: server-side apply with one field manager, controller
//! owner references on namespaced children, deletion of children the spec no longer wants.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::FIELD_MANAGER;

/// Field manager of the one-time creation of the Deployment at zero replicas: a different
/// manager from the applies, so dropping `replicas` from later applies leaves the count alone.
pub const CREATE_MANAGER: &str = "clip-operator-create";

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies a namespaced child owned by the processor.
pub async fn apply_owned<K>(
    client: &Client,
    namespace: &str,
    mut obj: K,
    owner: &OwnerReference,
) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    obj.meta_mut().owner_references = Some(vec![owner.clone()]);
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(&obj.name_any(), &apply_params(), &Patch::Apply(&obj))
        .await
}

/// Server-side applies a cluster-scoped child (tracked by labels; deleted by the finalizer).
pub async fn apply_cluster<K>(client: &Client, obj: K) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::all(client.clone());
    api.patch(&obj.name_any(), &apply_params(), &Patch::Apply(&obj))
        .await
}

/// The worker Deployment: created once at 0 replicas, then applied without `replicas`, so the
/// scaler's count (set through the scale subresource) is never reset by a reconcile. `exists`:
/// seen in the watch cache (no GET to find out).
pub async fn apply_deployment(
    client: &Client,
    namespace: &str,
    mut d: Deployment,
    owner: &OwnerReference,
    exists: bool,
) -> Result<Deployment, kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let name = d.name_any();
    d.metadata.owner_references = Some(vec![owner.clone()]);
    if !exists && api.get_opt(&name).await?.is_none() {
        let mut first = d.clone();
        if let Some(spec) = first.spec.as_mut() {
            spec.replicas = Some(0);
        }
        let pp = PostParams {
            field_manager: Some(CREATE_MANAGER.into()),
            ..Default::default()
        };
        match api.create(&pp, &first).await {
            Ok(created) => release_created_fields(&api, &created).await?,
            Err(kube::Error::Api(e)) if e.code == 409 => {} // created meanwhile
            Err(e) => return Err(e),
        }
    }
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas = None;
    }
    match api.patch(&name, &apply_params(), &Patch::Apply(&d)).await {
        // A Deployment created before the creation's fields were released (older operators)
        // keeps fields the apply no longer sets, and the merge can be invalid (an emptyDir and a
        // claim in one volume): release them and apply again.
        Err(kube::Error::Api(e)) if e.code == 422 => {
            release_created_fields(&api, &api.get(&name).await?).await?;
            api.patch(&name, &apply_params(), &Patch::Apply(&d)).await
        }
        other => other,
    }
}

/// The creation's field manager keeps only `spec.replicas`: every other field then belongs to
/// the applies alone, so a field a later apply leaves out (a cache volume that changes kind, a
/// toleration removed from the spec) is removed from the Deployment rather than kept forever by
/// the creation's ownership.
async fn release_created_fields(api: &Api<Deployment>, d: &Deployment) -> Result<(), kube::Error> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
    let only_replicas = serde_json::json!({"f:spec": {"f:replicas": {}}});
    let Some(mut entries) = d.metadata.managed_fields.clone() else {
        return Ok(());
    };
    let mut changed = false;
    for e in entries.iter_mut() {
        if e.manager.as_deref() == Some(CREATE_MANAGER)
            && e.fields_v1.as_ref().map(|f| &f.0) != Some(&only_replicas)
        {
            e.fields_v1 = Some(FieldsV1(only_replicas.clone()));
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let patch = serde_json::json!({"metadata": {"managedFields": entries}});
    api.patch(
        &d.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// Sets the Deployment's replicas through its scale subresource (as KEDA and the HPA do).
pub async fn scale(
    client: &Client,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<(), kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"spec": {"replicas": replicas}});
    api.patch_scale(
        name,
        &PatchParams {
            field_manager: Some(crate::scaler::runner::FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Applies a Job; a Job's pod template is immutable, so a changed one is deleted (and created
/// again by the next reconcile).
pub async fn apply_job<K>(
    client: &Client,
    namespace: &str,
    job: K,
    owner: &OwnerReference,
) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = job.name_any();
    match apply_owned(client, namespace, job, owner).await {
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("immutable") => {
            let api: Api<K> = Api::namespaced(client.clone(), namespace);
            api.delete(&name, &DeleteParams::background()).await?;
            Err(kube::Error::Api(e))
        }
        other => other,
    }
}

/// The children labelled for this processor (not being deleted), listed from the API. A kind
/// whose CRD is not installed has none.
pub async fn list_labelled<K>(api: &Api<K>, selector: &str) -> Result<Vec<String>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.list(&ListParams::default().labels(selector)).await {
        Ok(l) => Ok(l
            .items
            .into_iter()
            .filter(|o| o.meta().deletion_timestamp.is_none())
            .map(|o| o.name_any())
            .collect()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Deletes the children in `found` whose names are not in `keep`.
pub async fn delete_orphans<K>(
    api: &Api<K>,
    found: Vec<String>,
    keep: &[String],
) -> Result<Vec<String>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut deleted = Vec::new();
    for name in found {
        if !keep.contains(&name) {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => deleted.push(name),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(deleted)
}
