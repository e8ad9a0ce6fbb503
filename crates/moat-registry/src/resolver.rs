//! What the webhook asks: for each image of a review, the digest the registry serves for its
//! tag and, when a rule requires it, a verified signature over that digest; all images at once,
//! within one deadline, through the one cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use moat_core::image::ImageRef;
use moat_core::trust::{ImageTrust, SignaturePolicy, TrustRule, Unmatched};
use prometheus_client::registry::Registry;

use crate::cache::{BoundedCache, Flights};
use crate::client::{Client, MANIFEST_ACCEPT, Repo, SetupError};
use crate::cosign::{self, Claims};
use crate::digest::Digest;
use crate::error::{FailureReason, RegistryError};
use crate::limits::{
    CACHE_SHARE_DIVISOR, FAILURE_TTL, MAX_CACHE_BYTES, MAX_CACHE_ENTRIES, MAX_IMAGES_PER_REVIEW,
    MAX_MANIFEST_BYTES, MAX_RESERVED_LOOKUPS_PER_NAMESPACE, MAX_SIGNATURE_PAYLOAD_BYTES,
    MAX_SIGNATURES_PER_IMAGE, MAX_WAITING_LOOKUPS, MAX_WAITING_LOOKUPS_PER_NAMESPACE,
    MAX_WAITING_REVIEWS_PER_NAMESPACE, RESERVED_LOOKUPS, VERIFIED_TTL,
};
use crate::metrics::{CacheKind, Call, RegistryMetrics};

/// The metric label of images no rule names.
const OTHER_REGISTRY_LABEL: &str = "other";

/// The signature manifest is a plain image manifest (OCI or Docker).
const SIGNATURE_MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// What the signatures of one digest say under one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by the named key, over this digest (and repository).
    Verified { key: String },
    /// Why not.
    Rejected(String),
}

/// What the cache holds: all kinds of answer share one bound.
#[derive(Debug, Clone)]
enum Cached {
    Digest(Digest),
    Verdict(Verdict),
    /// A lookup that failed, answered so again for [`FAILURE_TTL`]
    /// ([`RegistryError::is_cacheable`]).
    Failed(RegistryError),
    /// A whole image admitted under the rule identified by `rule` (see [`rule_identity`]),
    /// keyed by the canonical reference (every spelling of one image shares the entry; the
    /// pinned reference is made from the pod's own spelling): a warm review's one lookup per
    /// image.
    Admitted {
        digest: Digest,
        signed_by: Option<String>,
        rule: u64,
    },
}

/// What a failure costs in the cache beyond its key.
fn failure_bytes(e: &RegistryError) -> usize {
    std::mem::size_of::<RegistryError>() + e.to_string().len() + e.detail().map_or(0, str::len)
}

/// An image moat admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The digest the pod will run.
    pub digest: Digest,
    /// The reference to write in the pod: the original with `@<digest>` appended, or the
    /// original itself when it already named a digest.
    pub pinned: String,
    /// The key whose signature was verified, when the rule requires one.
    pub signed_by: Option<String>,
}

/// One image to check: the reference as the pod wrote it, parsed.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    pub raw: &'a str,
    pub parsed: &'a ImageRef,
}

/// The shared resolver: registry client, cache and lookups in flight.
#[derive(Debug)]
pub struct Resolver {
    client: Client,
    cache: BoundedCache<Cached>,
    tag_flights: Flights<Result<(Digest, bool), RegistryError>>,
    verdict_flights: Flights<Result<(Verdict, bool), RegistryError>>,
    /// Reviews waiting on registries, by namespace ([`MAX_WAITING_REVIEWS_PER_NAMESPACE`]); a
    /// namespace leaves the map when its last review is answered, so it holds no more entries
    /// than there are reviews in flight.
    waiting: Mutex<HashMap<String, usize>>,
    /// Lookups waiting on registries ([`MAX_WAITING_LOOKUPS_PER_NAMESPACE`],
    /// [`MAX_WAITING_LOOKUPS`]).
    lookups: LookupBudget,
    metrics: RegistryMetrics,
}

/// Lookups waiting on registries: in all, and by namespace (a namespace leaves the map with
/// its last lookup). The last [`RESERVED_LOOKUPS`] go only to namespaces with fewer than
/// [`MAX_RESERVED_LOOKUPS_PER_NAMESPACE`] waiting, so namespaces at their share cannot take
/// the whole budget from the others.
#[derive(Debug, Default)]
struct LookupBudget {
    state: Mutex<(usize, HashMap<String, usize>)>,
}

/// One lookup's place in the [`LookupBudget`], given back when dropped.
struct Lookup<'a> {
    budget: &'a LookupBudget,
    namespace: &'a str,
}

/// Why a lookup got no place.
enum NoPlace {
    Namespace,
    Everyone,
}

impl LookupBudget {
    fn take<'a>(&'a self, namespace: &'a str) -> Result<Lookup<'a>, NoPlace> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_namespace) = &mut *state;
        if *total >= MAX_WAITING_LOOKUPS {
            return Err(NoPlace::Everyone);
        }
        let held = by_namespace.get(namespace).copied().unwrap_or(0);
        if held >= MAX_WAITING_LOOKUPS_PER_NAMESPACE {
            return Err(NoPlace::Namespace);
        }
        if *total >= MAX_WAITING_LOOKUPS - RESERVED_LOOKUPS
            && held >= MAX_RESERVED_LOOKUPS_PER_NAMESPACE
        {
            return Err(NoPlace::Everyone);
        }
        *by_namespace.entry(namespace.to_owned()).or_insert(0) += 1;
        *total += 1;
        Ok(Lookup {
            budget: self,
            namespace,
        })
    }
}

impl Drop for Lookup<'_> {
    fn drop(&mut self) {
        let mut state = self
            .budget
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_namespace) = &mut *state;
        *total = total.saturating_sub(1);
        if let Some(n) = by_namespace.get_mut(self.namespace) {
            *n -= 1;
            if *n == 0 {
                by_namespace.remove(self.namespace);
            }
        }
    }
}

/// One review's place among its namespace's reviews waiting on registries.
struct Waiting<'a> {
    map: &'a Mutex<HashMap<String, usize>>,
    namespace: &'a str,
}

impl<'a> Waiting<'a> {
    /// A place, unless `namespace` has every place taken.
    fn enter(map: &'a Mutex<HashMap<String, usize>>, namespace: &'a str) -> Option<Self> {
        let mut waiting = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = waiting.entry(namespace.to_owned()).or_insert(0);
        if *n >= MAX_WAITING_REVIEWS_PER_NAMESPACE {
            return None;
        }
        *n += 1;
        Some(Self { map, namespace })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = waiting.get_mut(self.namespace) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(self.namespace);
            }
        }
    }
}

impl Resolver {
    /// A resolver with `trust`'s CA certificates and credentials file; rules, keys and TTLs are
    /// read from the configuration passed to each [`Resolver::check`], so a reload changes
    /// them without a restart.
    ///
    /// # Errors
    /// A CA that is not usable, no TLS roots at all, a credentials file that cannot be read.
    pub fn new(trust: &ImageTrust, registry: &mut Registry) -> Result<Self, SetupError> {
        let metrics = RegistryMetrics::register(registry);
        Ok(Self {
            client: Client::new(
                trust.ca_certificates.as_ref(),
                trust.credentials_file.as_deref(),
                metrics.clone(),
            )?,
            cache: BoundedCache::new(MAX_CACHE_ENTRIES, MAX_CACHE_BYTES, CACHE_SHARE_DIVISOR),
            tag_flights: Flights::default(),
            verdict_flights: Flights::default(),
            waiting: Mutex::new(HashMap::new()),
            lookups: LookupBudget::default(),
            metrics,
        })
    }

    /// The instruments (tests and benchmarks read the counters).
    pub fn metrics(&self) -> &RegistryMetrics {
        &self.metrics
    }

    /// Entries and bytes the cache holds.
    pub fn cache_size(&self) -> (usize, usize) {
        self.cache.size()
    }

    /// Entries and bytes of the cache charged to `namespace`'s lookups.
    pub fn cache_share(&self, namespace: &str) -> (usize, usize) {
        self.cache.owned_by(namespace)
    }

    /// Checks every image at once; each answer is the image admitted, or why not (a message
    /// naming the registry and the reason). Returns by `deadline` whatever registries do.
    pub async fn check(
        &self,
        trust: &ImageTrust,
        namespace: &str,
        images: &[Image<'_>],
        deadline: Instant,
    ) -> Vec<Result<Admitted, String>> {
        if images.len() > MAX_IMAGES_PER_REVIEW {
            let why = format!(
                "not looked up: the pod names {} distinct images, more than the \
                 {MAX_IMAGES_PER_REVIEW} moat resolves for one review",
                images.len()
            );
            return images.iter().map(|_| Err(why.clone())).collect();
        }
        let now = Instant::now();
        let budget = deadline.saturating_duration_since(now);
        // The warm path first, with no future, timer or allocation per image but the answer:
        // most reviews end here.
        let mut identities = Identities::new(trust);
        let mut answers: Vec<Option<Result<Admitted, String>>> = images
            .iter()
            .map(|image| {
                self.warm(&mut identities, namespace, *image, now)
                    .map(Ok)
                    .or_else(|| offline(trust, namespace, *image))
            })
            .collect();
        if answers.iter().all(Option::is_some) {
            return answers.into_iter().flatten().collect();
        }
        let cold: Vec<usize> = (0..images.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let Some(_waiting) = Waiting::enter(&self.waiting, namespace) else {
            let why = format!(
                "not looked up: {MAX_WAITING_REVIEWS_PER_NAMESPACE} reviews of namespace {namespace} \
                 are already waiting on registries, the most moat lets one namespace hold; retry"
            );
            for &i in &cold {
                let label = label_of(trust, images[i], namespace);
                self.metrics.failure(label, FailureReason::namespace_busy);
                answers[i] = Some(Err(why.clone()));
            }
            return answers.into_iter().flatten().collect();
        };
        let mut placed = Vec::with_capacity(cold.len());
        for &i in &cold {
            match self.lookups.take(namespace) {
                Ok(place) => placed.push((i, place)),
                Err(why) => {
                    let (reason, message) = match why {
                        NoPlace::Namespace => (
                            FailureReason::namespace_busy,
                            format!(
                                "not looked up: namespace {namespace} already has \
                                 {MAX_WAITING_LOOKUPS_PER_NAMESPACE} image lookups waiting on \
                                 registries, the most moat lets one namespace hold; retry"
                            ),
                        ),
                        NoPlace::Everyone => (
                            FailureReason::busy,
                            format!(
                                "not looked up: moat already has {MAX_WAITING_LOOKUPS} image \
                                 lookups waiting on registries; retry"
                            ),
                        ),
                    };
                    self.metrics
                        .failure(label_of(trust, images[i], namespace), reason);
                    answers[i] = Some(Err(message));
                }
            }
        }
        let looked_up = join_all(
            placed
                .iter()
                .map(|(i, _place)| self.check_one(trust, namespace, images[*i], deadline, budget)),
        )
        .await;
        for ((i, _place), answer) in placed.into_iter().zip(looked_up) {
            answers[i] = Some(answer);
        }
        answers.into_iter().flatten().collect()
    }

    /// The image as admitted earlier under the same rule, if the cache still has it.
    fn warm(
        &self,
        identities: &mut Identities<'_>,
        namespace: &str,
        image: Image<'_>,
        now: Instant,
    ) -> Option<Admitted> {
        let trust = identities.trust;
        let identity = identities.of(trust.rule_for(image.parsed, namespace))?;
        match self.cache.get(&admitted_key(image.parsed), now) {
            Some(Cached::Admitted {
                digest,
                signed_by,
                rule,
            }) if rule == identity => {
                self.metrics.hit(CacheKind::image);
                Some(Admitted {
                    pinned: pinned(image, &digest),
                    digest,
                    signed_by,
                })
            }
            _ => None,
        }
    }

    async fn check_one(
        &self,
        trust: &ImageTrust,
        namespace: &str,
        image: Image<'_>,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Admitted, String> {
        let parsed = image.parsed;
        let matched = trust.rule_for(parsed, namespace);
        let rule = matched.map(|(_, r)| r);
        let label = match (rule, trust.unmatched) {
            (Some(_), _) => parsed.domain(),
            (None, Unmatched::Pin) => OTHER_REGISTRY_LABEL,
            (None, Unmatched::Deny) => {
                return Err(format!(
                    "no rule of images.trust names {}, so it cannot be verified",
                    parsed.repository()
                ));
            }
        };
        let repo = Repo {
            registry: parsed.domain(),
            label,
            path: parsed.path(),
            namespace,
            pooled: rule.is_some(),
        };
        let ttl = Duration::from_secs(u64::from(trust.tag_ttl_seconds));
        let work = async {
            // Whether a registry answered this lookup now (a call, or one in flight joined):
            // an admission that needed none is cheap to decide again and gets no cache entry,
            // so references that need no lookup cannot fill the cache.
            let mut called = false;
            let digest = match parsed.digest() {
                // Pinned already (by the pod's author, or by moat on the first call when the
                // API server reinvokes the webhook): not resolved again.
                Some(d) => d
                    .parse::<Digest>()
                    .map_err(|_| format!("moat verifies sha256 digests only, not '{d}'"))?,
                None => {
                    let (digest, fresh) = self
                        .resolve_tag(repo, parsed, ttl)
                        .await
                        .map_err(|e| e.to_string())?;
                    called |= fresh;
                    digest
                }
            };
            let signed_by = match rule {
                Some(r) if r.signatures == SignaturePolicy::Required => {
                    let (verdict, fresh) = self
                        .verify(repo, parsed, &digest, r, ttl)
                        .await
                        .map_err(|e| e.to_string())?;
                    called |= fresh;
                    match verdict {
                        Verdict::Verified { key } => Some(key),
                        Verdict::Rejected(why) => return Err(format!("{digest} {why}")),
                    }
                }
                _ => None,
            };
            let admitted = Admitted {
                pinned: pinned(image, &digest),
                digest,
                signed_by,
            };
            if called && let Some(identity) = identity(trust, matched) {
                // Kept as long as its shortest-lived part: the tag's digest, or the verdict.
                let ttl = if parsed.digest().is_some() {
                    VERIFIED_TTL
                } else {
                    ttl.min(VERIFIED_TTL)
                };
                let key = admitted_key(parsed);
                let bytes = admitted.signed_by.as_ref().map_or(0, String::len) + 96;
                self.cache.insert(
                    &key,
                    Cached::Admitted {
                        digest: admitted.digest.clone(),
                        signed_by: admitted.signed_by.clone(),
                        rule: identity,
                    },
                    bytes,
                    ttl,
                    Instant::now(),
                    namespace,
                );
            }
            Ok(admitted)
        };
        match tokio::time::timeout_at(deadline.into(), work).await {
            Ok(answer) => answer,
            Err(_) => {
                self.metrics.failure(label, FailureReason::timeout);
                Err(RegistryError::Timeout {
                    registry: parsed.domain().to_owned(),
                    budget_ms: (budget.as_micros() + 500) / 1000,
                }
                .to_string())
            }
        }
    }

    /// The digest `image`'s tag names now (or within the tag TTL), and whether a registry was
    /// asked for it now (not the cache).
    async fn resolve_tag(
        &self,
        repo: Repo<'_>,
        image: &ImageRef,
        ttl: Duration,
    ) -> Result<(Digest, bool), RegistryError> {
        let tag = image.tag().unwrap_or("latest");
        let key = format!("t {}:{tag}", image.repository());
        match self.cache.get(&key, Instant::now()) {
            Some(Cached::Digest(d)) => {
                self.metrics.hit(CacheKind::tag);
                return Ok((d, false));
            }
            Some(Cached::Failed(e)) => {
                self.metrics.hit(CacheKind::tag);
                return Err(e);
            }
            _ => {}
        }
        self.metrics.miss(CacheKind::tag);
        self.tag_flights
            .run(&key, || async {
                match self.cache.get(&key, Instant::now()) {
                    Some(Cached::Digest(d)) => return Ok((d, false)),
                    Some(Cached::Failed(e)) => return Err(e),
                    _ => {}
                }
                let result = self.fetch_tag(repo, tag).await;
                match &result {
                    Ok(d) => self.cache.insert(
                        &key,
                        Cached::Digest(d.clone()),
                        64,
                        ttl,
                        Instant::now(),
                        repo.namespace,
                    ),
                    Err(e) => self.failed(repo, &key, e),
                }
                result.map(|d| (d, true))
            })
            .await
    }

    /// Counts, logs and (briefly, when [`RegistryError::is_cacheable`]) keeps a failure.
    fn failed(&self, repo: Repo<'_>, key: &str, e: &RegistryError) {
        self.metrics.failure(repo.label, e.reason());
        if let Some(detail) = e.detail() {
            // The detail the denial leaves out. Registries no rule names are the tenants' own,
            // their failures theirs to see in their pods' events: not above debug.
            if repo.label == OTHER_REGISTRY_LABEL {
                tracing::debug!(registry = repo.registry, namespace = repo.namespace, error = %e, detail, "registry lookup failed");
            } else {
                tracing::warn!(registry = repo.registry, namespace = repo.namespace, error = %e, detail, "registry lookup failed");
            }
        }
        if e.is_cacheable() {
            self.cache.insert(
                key,
                Cached::Failed(e.clone()),
                failure_bytes(e),
                FAILURE_TTL,
                Instant::now(),
                repo.namespace,
            );
        }
    }

    async fn fetch_tag(&self, repo: Repo<'_>, tag: &str) -> Result<Digest, RegistryError> {
        let what = format!("the manifest of {}:{tag}", repo.path);
        let garbage = |reason: &str| RegistryError::Garbage {
            registry: repo.registry.to_owned(),
            what: what.clone(),
            reason: reason.to_owned(),
        };
        let fetched = self
            .client
            .get(
                repo,
                &format!("manifests/{tag}"),
                Some(MANIFEST_ACCEPT),
                MAX_MANIFEST_BYTES,
                &what,
                Call::manifest,
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                registry: repo.registry.to_owned(),
                what: format!("tag '{tag}' in {}", repo.path),
            })?;
        // The digest is of the bytes received, not taken from the registry's word for it.
        let digest = Digest::of(&fetched.body);
        if let Some(header) = &fetched.content_digest {
            let said = header.as_deref().and_then(|h| h.parse::<Digest>().ok());
            if said.as_ref() != Some(&digest) {
                return Err(garbage(
                    "its Docker-Content-Digest header does not match the manifest it sent",
                ));
            }
        }
        #[derive(serde::Deserialize)]
        struct Versioned {
            #[serde(rename = "schemaVersion")]
            schema_version: u32,
        }
        match serde_json::from_slice::<Versioned>(&fetched.body) {
            Ok(v) if v.schema_version == 2 => Ok(digest),
            Ok(_) => Err(garbage("not a schema 2 manifest")),
            Err(_) => Err(garbage("not JSON")),
        }
    }

    /// Whether `digest` carries a signature `rule` accepts, and whether a registry was asked
    /// now (not the cache).
    async fn verify(
        &self,
        repo: Repo<'_>,
        image: &ImageRef,
        digest: &Digest,
        rule: &TrustRule,
        negative_ttl: Duration,
    ) -> Result<(Verdict, bool), RegistryError> {
        let key = format!("v {} {digest} {:016x}", image.repository(), rule_keys(rule));
        match self.cache.get(&key, Instant::now()) {
            Some(Cached::Verdict(v)) => {
                self.metrics.hit(CacheKind::signature);
                return Ok((v, false));
            }
            Some(Cached::Failed(e)) => {
                self.metrics.hit(CacheKind::signature);
                return Err(e);
            }
            _ => {}
        }
        self.metrics.miss(CacheKind::signature);
        self.verdict_flights
            .run(&key, || async {
                match self.cache.get(&key, Instant::now()) {
                    Some(Cached::Verdict(v)) => return Ok((v, false)),
                    Some(Cached::Failed(e)) => return Err(e),
                    _ => {}
                }
                let result = self.fetch_verdict(repo, image, digest, rule).await;
                match &result {
                    Ok(v) => {
                        let (ttl, bytes) = match v {
                            Verdict::Verified { key } => (VERIFIED_TTL, key.len()),
                            Verdict::Rejected(why) => (negative_ttl, why.len()),
                        };
                        self.cache.insert(
                            &key,
                            Cached::Verdict(v.clone()),
                            bytes,
                            ttl,
                            Instant::now(),
                            repo.namespace,
                        );
                    }
                    Err(e) => self.failed(repo, &key, e),
                }
                result.map(|v| (v, true))
            })
            .await
    }

    async fn fetch_verdict(
        &self,
        repo: Repo<'_>,
        image: &ImageRef,
        digest: &Digest,
        rule: &TrustRule,
    ) -> Result<Verdict, RegistryError> {
        let tag = digest.signature_tag();
        let what = format!("the signatures of {digest}");
        let Some(fetched) = self
            .client
            .get(
                repo,
                &format!("manifests/{tag}"),
                Some(SIGNATURE_MANIFEST_ACCEPT),
                MAX_MANIFEST_BYTES,
                &what,
                Call::signatures,
            )
            .await?
        else {
            return Ok(Verdict::Rejected(format!(
                "is not signed: registry {} has no {tag}",
                repo.registry
            )));
        };
        let layers =
            cosign::signature_layers(&fetched.body).map_err(|reason| RegistryError::Garbage {
                registry: repo.registry.to_owned(),
                what: what.clone(),
                reason,
            })?;
        let considered: Vec<_> = layers
            .into_iter()
            .filter(|l| l.signature.is_some() && l.size <= MAX_SIGNATURE_PAYLOAD_BYTES as u64)
            .take(MAX_SIGNATURES_PER_IMAGE)
            .collect();
        let payloads = join_all(considered.iter().map(|l| async move {
            let what = format!("signature payload {}", l.payload);
            let blob = self
                .client
                .get(
                    repo,
                    &format!("blobs/{}", l.payload),
                    None,
                    MAX_SIGNATURE_PAYLOAD_BYTES,
                    &what,
                    Call::payload,
                )
                .await?
                .ok_or_else(|| RegistryError::NotFound {
                    registry: repo.registry.to_owned(),
                    what: what.clone(),
                })?;
            if Digest::of(&blob.body) != l.payload {
                return Err(RegistryError::Garbage {
                    registry: repo.registry.to_owned(),
                    what,
                    reason: "its bytes do not match its digest".to_owned(),
                });
            }
            Ok(blob.body)
        }))
        .await;
        let mut mismatch: Option<String> = None;
        let mut first_error: Option<RegistryError> = None;
        for (layer, payload) in considered.iter().zip(payloads) {
            let payload = match payload {
                Ok(p) => p,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let Some(signature) = &layer.signature else {
                continue;
            };
            for key in &rule.keys {
                if !cosign::verifies(key, &payload, signature) {
                    continue;
                }
                match cosign::check_claims(&payload, digest, image, rule.require_same_repository) {
                    Claims::Match => {
                        return Ok(Verdict::Verified {
                            key: key.name.clone(),
                        });
                    }
                    Claims::Mismatch(why) => {
                        mismatch.get_or_insert(format!(
                            "has a signature by trusted key '{}' that does not cover it: {why}",
                            key.name
                        ));
                    }
                }
            }
        }
        if let Some(e) = first_error {
            // A signature that could not be read might have been the good one.
            return Err(e);
        }
        let keys: Vec<&str> = rule.keys.iter().map(|k| k.name.as_str()).collect();
        Ok(Verdict::Rejected(mismatch.unwrap_or_else(|| {
            format!(
                "has {} signature(s), none by a trusted key ({})",
                considered.len(),
                keys.join(", ")
            )
        })))
    }
}

/// The answer for `image` when it needs no registry: refused for want of a rule, or already
/// naming a digest that no signature check applies to. It takes no place among the lookups
/// waiting and leaves no cache entry.
fn offline(
    trust: &ImageTrust,
    namespace: &str,
    image: Image<'_>,
) -> Option<Result<Admitted, String>> {
    let rule = trust.rule_for(image.parsed, namespace).map(|(_, r)| r);
    if rule.is_none() && trust.unmatched == Unmatched::Deny {
        return Some(Err(format!(
            "no rule of images.trust names {}, so it cannot be verified",
            image.parsed.repository()
        )));
    }
    if rule.is_some_and(|r| r.signatures == SignaturePolicy::Required) {
        return None;
    }
    let d = image.parsed.digest()?;
    Some(match d.parse::<Digest>() {
        Ok(digest) => Ok(Admitted {
            pinned: image.raw.to_owned(),
            digest,
            signed_by: None,
        }),
        Err(_) => Err(format!("moat verifies sha256 digests only, not '{d}'")),
    })
}

/// The metric label of `image`'s registry: the registry a rule names, or `other`.
fn label_of<'i>(trust: &ImageTrust, image: Image<'i>, namespace: &str) -> &'i str {
    match trust.rule_for(image.parsed, namespace) {
        Some(_) => image.parsed.domain(),
        None => OTHER_REGISTRY_LABEL,
    }
}

/// The cache key of a whole admitted image: the canonical reference, so every spelling of one
/// image (`Reg.Example/a:1`, `reg.example:443/a:1`) is one entry.
fn admitted_key(image: &ImageRef) -> String {
    format!("a {image}")
}

/// The reference the pod runs: its own spelling, with the digest appended unless it already
/// names one.
fn pinned(image: Image<'_>, digest: &Digest) -> String {
    if image.parsed.digest().is_some() {
        image.raw.to_owned()
    } else {
        format!("{}@{digest}", image.raw)
    }
}

/// Identifies what a verdict depends on in a rule (its keys and the repository check), so a
/// configuration reload that changes them is not answered from the cache. A 64-bit hash of
/// operator-written keys: no tenant chooses what it is computed over.
fn rule_keys(rule: &TrustRule) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for k in &rule.keys {
        k.name.hash(&mut h);
        k.public_key.raw().hash(&mut h);
    }
    rule.require_same_repository.hash(&mut h);
    h.finish()
}

/// The [`rule_identity`] of the rule that applies, or of `unmatched: pin`; `None` when the
/// image is refused without a lookup.
fn identity(trust: &ImageTrust, matched: Option<(usize, &TrustRule)>) -> Option<u64> {
    match (matched, trust.unmatched) {
        (Some((index, rule)), _) => Some(rule_identity(index, rule)),
        (None, Unmatched::Pin) => Some(u64::MAX),
        (None, Unmatched::Deny) => None,
    }
}

/// Identifies what a whole admitted image depends on: which rule (by position) and what its
/// verdict depends on, and whether it asks for signatures at all.
fn rule_identity(index: usize, rule: &TrustRule) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    index.hash(&mut h);
    rule_keys(rule).hash(&mut h);
    (rule.signatures == SignaturePolicy::Required).hash(&mut h);
    h.finish()
}

/// [`identity`]s worked out once per review: the images of a review mostly share a rule.
struct Identities<'t> {
    trust: &'t ImageTrust,
    by_rule: Vec<Option<u64>>,
}

impl<'t> Identities<'t> {
    fn new(trust: &'t ImageTrust) -> Self {
        Self {
            trust,
            by_rule: vec![None; trust.rules.len()],
        }
    }

    fn of(&mut self, matched: Option<(usize, &TrustRule)>) -> Option<u64> {
        match matched {
            Some((index, rule)) => match self.by_rule.get_mut(index) {
                Some(known) => Some(*known.get_or_insert_with(|| rule_identity(index, rule))),
                None => identity(self.trust, matched),
            },
            None => identity(self.trust, None),
        }
    }
}

/// A resolver shared by every endpoint.
pub type SharedResolver = Arc<Resolver>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_at_their_share_leave_room_for_the_others() {
        let budget = LookupBudget::default();
        let names: Vec<String> = (0..40).map(|i| format!("ns{i}")).collect();
        let mut held = Vec::new();
        // Flooding namespaces take all they may: 12 at 64 (768), then the reserve lets each
        // take only a few more.
        for name in &names[..20] {
            while let Ok(place) = budget.take(name) {
                held.push(place);
            }
        }
        let at_share = (MAX_WAITING_LOOKUPS - RESERVED_LOOKUPS) / MAX_WAITING_LOOKUPS_PER_NAMESPACE;
        assert_eq!(
            held.len(),
            MAX_WAITING_LOOKUPS - RESERVED_LOOKUPS
                + (20 - at_share) * MAX_RESERVED_LOOKUPS_PER_NAMESPACE
        );
        // A quiet namespace still gets its pod's images looked up.
        for _ in 0..MAX_RESERVED_LOOKUPS_PER_NAMESPACE {
            held.push(
                budget
                    .take("quiet")
                    .unwrap_or_else(|_| panic!("no place for quiet")),
            );
        }
        assert!(matches!(budget.take("quiet"), Err(NoPlace::Everyone)));
        assert!(matches!(budget.take(&names[0]), Err(NoPlace::Namespace)));
        // The total holds whatever the namespaces.
        for name in &names[20..] {
            while let Ok(place) = budget.take(name) {
                held.push(place);
            }
        }
        assert!(held.len() <= MAX_WAITING_LOOKUPS);
        drop(held);
        let state = budget
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert_eq!(state.0, 0);
        assert!(state.1.is_empty());
    }
}
