//! Which namespaces the operator serves (`--namespaces`): all of them (one cluster-wide watch
//! per kind), or a list (one watch per namespace and kind, so the operator needs rights in
//! those namespaces only). The watches of a list feed one cache: each namespace's re-list
//! replaces that namespace's objects and no other's.

use std::collections::HashMap;
use std::fmt::Debug;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// The namespaces the operator serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Namespaces {
    /// Every namespace (cluster-wide watches and rights).
    #[default]
    All,
    /// These namespaces only.
    Only(Vec<String>),
}

impl Namespaces {
    /// From the flag's list: empty means all.
    pub fn from_list(names: &[String]) -> Self {
        let mut names: Vec<String> = names
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            Namespaces::All
        } else {
            Namespaces::Only(names)
        }
    }

    /// Whether objects of `namespace` are served.
    pub fn serves(&self, namespace: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Only(names) => names.iter().any(|n| n == namespace),
        }
    }
}

/// Watches a namespaced kind in `scope`, keeping `writer`'s cache, and yields the watch events
/// (after the cache has them). `modify` runs on each object first (e.g. to drop managed fields).
/// Errors are yielded as they come: the caller decides on backoff.
pub fn watch<K>(
    client: &Client,
    scope: &Namespaces,
    config: watcher::Config,
    mut writer: Writer<K>,
    modify: fn(&mut K),
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    match scope {
        Namespaces::All => watch_all(client, config, writer, modify),
        Namespaces::Only(names) => {
            let streams = names.iter().map(|ns| {
                let ns = ns.clone();
                watcher(Api::<K>::namespaced(client.clone(), &ns), config.clone())
                    .modify(modify)
                    .map(move |e| (ns.clone(), e))
                    .boxed()
            });
            let mut merged = Merged::default();
            futures::stream::select_all(streams)
                .map(move |(ns, event)| {
                    if let Ok(e) = &event {
                        merged.apply(&mut writer, &ns, e);
                    }
                    event
                })
                .boxed()
        }
    }
}

/// Watches a kind in every namespace (or a cluster-scoped kind), keeping `writer`'s cache.
pub fn watch_all<K>(
    client: &Client,
    config: watcher::Config,
    writer: Writer<K>,
    modify: fn(&mut K),
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(Api::<K>::all(client.clone()), config)
        .modify(modify)
        .reflect(writer)
        .boxed()
}

/// One cache fed by several namespaces' watches.
struct Merged<K> {
    /// Per namespace being re-listed: the objects listed so far.
    listing: HashMap<String, Vec<K>>,
}

impl<K> Default for Merged<K> {
    fn default() -> Self {
        Merged {
            listing: HashMap::new(),
        }
    }
}

impl<K> Merged<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    fn apply(&mut self, writer: &mut Writer<K>, ns: &str, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Init => {
                self.listing.insert(ns.to_string(), Vec::new());
            }
            watcher::Event::InitApply(obj) => {
                self.listing
                    .entry(ns.to_string())
                    .or_default()
                    .push(obj.clone());
            }
            watcher::Event::InitDone => {
                // The cache becomes: the other namespaces' objects, and this one's new list.
                let listed = self.listing.remove(ns).unwrap_or_default();
                let others: Vec<K> = writer
                    .as_reader()
                    .state()
                    .iter()
                    .filter(|o| o.namespace().as_deref() != Some(ns))
                    .map(|o| (**o).clone())
                    .collect();
                writer.apply_watcher_event(&watcher::Event::Init);
                for obj in others.into_iter().chain(listed) {
                    writer.apply_watcher_event(&watcher::Event::InitApply(obj));
                }
                writer.apply_watcher_event(&watcher::Event::InitDone);
            }
            other => writer.apply_watcher_event(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;

    fn cm(ns: &str, name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some(ns.into());
        c
    }

    fn names(store: &reflector::Store<ConfigMap>) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .map(|c| format!("{}/{}", c.namespace().unwrap(), c.name_any()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_namespace_relist_replaces_only_that_namespace() {
        use watcher::Event::*;
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let mut m = Merged::default();
        for (ns, e) in [
            ("a", Init),
            ("b", Init),
            ("a", InitApply(cm("a", "one"))),
            ("b", InitApply(cm("b", "two"))),
            ("a", InitDone),
        ] {
            m.apply(&mut writer, ns, &e);
        }
        assert_eq!(names(&reader), ["a/one"], "b is still listing");
        m.apply(&mut writer, "b", &InitDone);
        assert_eq!(names(&reader), ["a/one", "b/two"]);
        m.apply(&mut writer, "a", &Apply(cm("a", "three")));
        // b re-lists (after a desync) and "two" is gone: a's objects stay.
        m.apply(&mut writer, "b", &Init);
        m.apply(&mut writer, "b", &InitDone);
        assert_eq!(names(&reader), ["a/one", "a/three"]);
        m.apply(&mut writer, "a", &Delete(cm("a", "one")));
        assert_eq!(names(&reader), ["a/three"]);
    }

    #[test]
    fn an_empty_list_is_every_namespace() {
        assert_eq!(Namespaces::from_list(&[]), Namespaces::All);
        assert_eq!(Namespaces::from_list(&[" ".into()]), Namespaces::All);
        let only = Namespaces::from_list(&["b".into(), "a".into(), "a".into()]);
        assert_eq!(only, Namespaces::Only(vec!["a".into(), "b".into()]));
        assert!(only.serves("a") && !only.serves("c"));
    }
}
