//! What every request reads: the configuration in force (swapped on reload), the namespace
//! cache, the metrics and the request slots.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use moat_core::config::Config;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::limits::{MAX_BLOCKING_DECISIONS, MAX_CONCURRENT_REQUESTS, QUEUE_TIMEOUT};
use crate::metrics::Metrics;
use crate::namespaces::{self, NamespaceCache};

/// What every request reads: the current configuration (swapped on reload), the namespace
/// cache, metrics, and the request slots.
#[derive(Debug)]
pub struct AppState {
    config: RwLock<Arc<Config>>,
    namespaces: Option<NamespaceCache>,
    pub metrics: Metrics,
    slots: Semaphore,
    /// Decisions on large bodies run on the blocking pool, this many at a time.
    blocking: Semaphore,
}

impl AppState {
    /// State for `config`. `namespaces` must be given when [`namespaces::needed`] says so.
    pub fn new(
        config: Config,
        namespaces: Option<NamespaceCache>,
        registry: &mut Registry,
    ) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            namespaces,
            metrics: Metrics::register(registry),
            slots: Semaphore::new(MAX_CONCURRENT_REQUESTS),
            blocking: Semaphore::new(MAX_BLOCKING_DECISIONS),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the configuration. Refused when the new one reads namespace labels and no
    /// namespace cache runs (that needs a restart with API access).
    ///
    /// # Errors
    /// A message saying why the configuration cannot take effect.
    pub fn set_config(&self, config: Config) -> Result<(), String> {
        if namespaces::needed(&config) && self.namespaces.is_none() {
            return Err("the new configuration reads namespace labels, which needs a restart to start the namespace cache".to_owned());
        }
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// The labels of `namespace`, when the cache knows it.
    pub fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.as_ref()?.labels(namespace)
    }

    /// What keeps the server from being ready, if anything.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.namespaces.as_ref().is_some_and(|n| !n.synced()) {
            Some("namespace cache has not synced")
        } else {
            None
        }
    }

    /// A turn on the blocking pool for a large decision.
    pub async fn blocking_turn(&self) -> Option<SemaphorePermit<'_>> {
        self.blocking.acquire().await.ok()
    }

    /// A request slot, waited for up to [`QUEUE_TIMEOUT`]; `None` when none came free.
    pub async fn slot(&self) -> Option<SemaphorePermit<'_>> {
        tokio::time::timeout(QUEUE_TIMEOUT, self.slots.acquire())
            .await
            .ok()?
            .ok()
    }
}
