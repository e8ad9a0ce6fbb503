//! What every request reads: the configuration in force (swapped on reload), the namespace
//! cache, the metrics, the request budget and slots, and the registry resolver (`images.trust`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use moat_core::config::Config;
use moat_core::image::ImageRef;
use moat_core::trust::{ImageTrust, ImageVerdict, ImageVerdicts};
use moat_listen::budget::RequestBudget;
use moat_listen::refusals::{ListenerRefusals, Refusals};
use moat_listen::slots::Slots;
use moat_registry::{Image, Resolver};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::limits::{
    BUDGET_LIMITS, MAX_BLOCKING_DECISIONS, REFUSAL_SUMMARY_INTERVAL, REGISTRY_BUDGET, SLOT_LIMITS,
};
use crate::metrics::Metrics;
use crate::namespaces::{self, NamespaceCache};

/// What every request reads: the current configuration (swapped on reload), the namespace
/// cache, metrics, and the request slots.
#[derive(Debug)]
pub struct AppState {
    config: RwLock<Arc<Config>>,
    namespaces: Option<NamespaceCache>,
    pub metrics: Metrics,
    /// Decision slots, taken once a body has arrived.
    pub slots: Slots,
    /// The memory every request holds, one budget for all.
    pub budget: Arc<RequestBudget>,
    /// The process's refusal counter, shared by its listeners.
    pub refusals: Refusals,
    /// The review port's refusals.
    pub review_refusals: Arc<ListenerRefusals>,
    /// Decisions on large bodies run on the blocking pool, this many at a time.
    blocking: Semaphore,
    /// Set at SIGTERM: readiness fails while the server drains.
    draining: std::sync::atomic::AtomicBool,
    /// The registry client and its cache, shared by every endpoint, when `images.trust` was
    /// configured at start; or why it could not start (every image is then refused).
    resolver: Option<Result<Arc<Resolver>, String>>,
}

impl AppState {
    /// State for `config`. `namespaces` must be given when [`namespaces::needed`] says so.
    pub fn new(
        config: Config,
        namespaces: Option<NamespaceCache>,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Metrics::register(registry);
        let resolver = config.images.trust.as_ref().map(|trust| {
            Resolver::new(trust, registry)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        let refusals = Refusals::register(
            registry.sub_registry_with_prefix("moat"),
            REFUSAL_SUMMARY_INTERVAL,
        );
        Self {
            config: RwLock::new(Arc::new(config)),
            namespaces,
            metrics,
            slots: Slots::new(SLOT_LIMITS),
            budget: RequestBudget::new(BUDGET_LIMITS),
            review_refusals: refusals.listener("reviews"),
            refusals,
            blocking: Semaphore::new(MAX_BLOCKING_DECISIONS),
            draining: std::sync::atomic::AtomicBool::new(false),
            resolver,
        }
    }

    /// Why the registry client could not start, if `images.trust` is configured and it could
    /// not (the server refuses to start then).
    pub fn image_trust_error(&self) -> Option<&str> {
        match &self.resolver {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// What the registries say about `images` (valid references) pulled in `namespace`: all
    /// at once, within [`REGISTRY_BUDGET`]. `None` when `images.trust` is not configured.
    pub async fn image_verdicts(
        &self,
        config: &Config,
        namespace: &str,
        images: &[&str],
    ) -> Option<ImageVerdicts> {
        let trust: &ImageTrust = config.images.trust.as_ref()?;
        let resolver = match &self.resolver {
            Some(Ok(r)) => r,
            other => {
                let why = match other {
                    Some(Err(e)) => format!("moat's registry client did not start: {e}"),
                    _ => "images.trust was turned on without a restart, so moat has no registry client".to_owned(),
                };
                return Some(
                    images
                        .iter()
                        .map(|raw| ((*raw).to_owned(), ImageVerdict::Refused(why.clone())))
                        .collect(),
                );
            }
        };
        let parsed: Vec<(&str, ImageRef)> = images
            .iter()
            .filter_map(|raw| Some((*raw, raw.parse().ok()?)))
            .collect();
        let asked: Vec<Image<'_>> = parsed
            .iter()
            .map(|(raw, parsed)| Image { raw, parsed })
            .collect();
        let deadline = std::time::Instant::now() + REGISTRY_BUDGET;
        let answers = resolver.check(trust, namespace, &asked, deadline).await;
        drop(asked);
        // Each reference with its parse, so the decision does not parse it again.
        let mut verdicts = ImageVerdicts::new();
        for ((raw, parsed), answer) in parsed.into_iter().zip(answers) {
            let verdict = match answer {
                Ok(a) => ImageVerdict::Admitted { pinned: a.pinned },
                Err(why) => ImageVerdict::Refused(why),
            };
            verdicts.insert(raw.to_owned(), verdict, Some(parsed));
        }
        Some(verdicts)
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
        if let Some(new) = &config.images.trust {
            // The registry client's TLS roots and credentials file are fixed at start; rules,
            // keys and TTLs take effect at once.
            let current = self.config();
            let old = current.images.trust.as_ref();
            if self.resolver.is_none()
                || old.is_none_or(|old| {
                    old.ca_certificates != new.ca_certificates
                        || old.credentials_file != new.credentials_file
                })
            {
                return Err("turning images.trust on, or changing its caCertificates or credentialsFile, needs a restart".to_owned());
            }
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

    /// Marks the server as shutting down: readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// What keeps the server from being ready, if anything.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            Some("shutting down")
        } else if self.namespaces.as_ref().is_some_and(|n| !n.synced()) {
            Some("namespace cache has not synced")
        } else {
            None
        }
    }

    /// A turn on the blocking pool for a large decision.
    pub async fn blocking_turn(&self) -> Option<SemaphorePermit<'_>> {
        self.blocking.acquire().await.ok()
    }
}
