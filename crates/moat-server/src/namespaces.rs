//! Namespace labels for the class binding, from a watched cache of the Kubernetes API (metadata
//! only), never a request per review. Started only when the configuration reads namespace
//! labels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use moat_core::config::Config;

/// Whether a configuration reads namespace labels: a class bound by a namespace label or selector.
pub fn needed(config: &Config) -> bool {
    let iso = &config.isolation;
    iso.namespace_class_label.is_some()
        || iso.classes.iter().any(|c| c.namespace_selector.is_some())
}

/// A watched view of every namespace's labels.
#[derive(Debug, Clone)]
pub struct NamespaceCache {
    store: Store<PartialObjectMeta<Namespace>>,
    synced: Arc<AtomicBool>,
}

impl NamespaceCache {
    /// Starts watching namespaces with `client`; the returned cache fills in the background and
    /// reports [`NamespaceCache::synced`] once the first list arrived. Watch errors are logged and
    /// retried with backoff by the watcher.
    pub fn start(client: kube::Client) -> Self {
        let (store, writer) = reflector::store();
        // Metadata only: labels are all moat reads, and specs and managed fields would cost memory.
        let api = kube::Api::<PartialObjectMeta<Namespace>>::all(client);
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "namespace watch failed; retrying");
                }
            }
        });
        let synced = Arc::new(AtomicBool::new(false));
        let (s, flag) = (store.clone(), synced.clone());
        tokio::spawn(async move {
            if s.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Release);
                tracing::info!(namespaces = s.state().len(), "namespace cache synced");
            }
        });
        Self { store, synced }
    }

    /// Whether the first full list has arrived.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The labels of `namespace`, if it is known.
    pub fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        let ns = self.store.get(&ObjectRef::new(namespace))?;
        Some(ns.metadata.labels.clone().unwrap_or_default())
    }
}
