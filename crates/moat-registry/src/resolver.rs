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
    MAX_CACHE_BYTES, MAX_CACHE_ENTRIES, MAX_IMAGES_PER_REVIEW, MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_PAYLOAD_BYTES, MAX_SIGNATURES_PER_IMAGE, MAX_WAITING_REVIEWS_PER_NAMESPACE,
    VERIFIED_TTL,
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
    /// A whole image admitted under the rule identified by `rule` (see [`rule_identity`]),
    /// keyed by the reference as written: a warm review's one lookup per image.
    Admitted {
        admitted: Admitted,
        rule: u64,
    },
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
    tag_flights: Flights<Result<Digest, RegistryError>>,
    verdict_flights: Flights<Result<Verdict, RegistryError>>,
    /// Reviews waiting on registries, by namespace ([`MAX_WAITING_REVIEWS_PER_NAMESPACE`]); a
    /// namespace leaves the map when its last review is answered, so it holds no more entries
    /// than there are reviews in flight.
    waiting: Mutex<HashMap<String, usize>>,
    metrics: RegistryMetrics,
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
            cache: BoundedCache::new(MAX_CACHE_ENTRIES, MAX_CACHE_BYTES),
            tag_flights: Flights::default(),
            verdict_flights: Flights::default(),
            waiting: Mutex::new(HashMap::new()),
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
            .map(|image| self.warm(&mut identities, namespace, *image, now).map(Ok))
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
                let label = match trust.rule_for(images[i].parsed, namespace) {
                    Some(_) => images[i].parsed.domain(),
                    None => OTHER_REGISTRY_LABEL,
                };
                self.metrics.failure(label, FailureReason::namespace_busy);
                answers[i] = Some(Err(why.clone()));
            }
            return answers.into_iter().flatten().collect();
        };
        let looked_up = join_all(
            cold.iter()
                .map(|&i| self.check_one(trust, namespace, images[i], deadline, budget)),
        )
        .await;
        for (i, answer) in cold.into_iter().zip(looked_up) {
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
        match self.cache.get(image.raw, now) {
            Some(Cached::Admitted { admitted, rule }) if rule == identity => {
                self.metrics.hit(CacheKind::image);
                Some(admitted)
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
            pooled: rule.is_some(),
        };
        let ttl = Duration::from_secs(u64::from(trust.tag_ttl_seconds));
        let work = async {
            let digest = match parsed.digest() {
                // Pinned already (by the pod's author, or by moat on the first call when the
                // API server reinvokes the webhook): not resolved again.
                Some(d) => d
                    .parse::<Digest>()
                    .map_err(|_| format!("moat verifies sha256 digests only, not '{d}'"))?,
                None => self
                    .resolve_tag(repo, parsed, ttl)
                    .await
                    .map_err(|e| e.to_string())?,
            };
            let signed_by = match rule {
                Some(r) if r.signatures == SignaturePolicy::Required => {
                    match self
                        .verify(repo, parsed, &digest, r, ttl)
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        Verdict::Verified { key } => Some(key),
                        Verdict::Rejected(why) => return Err(format!("{digest} {why}")),
                    }
                }
                _ => None,
            };
            let pinned = if parsed.digest().is_some() {
                image.raw.to_owned()
            } else {
                format!("{}@{digest}", image.raw)
            };
            let admitted = Admitted {
                digest,
                pinned,
                signed_by,
            };
            if let Some(identity) = identity(trust, matched) {
                // Kept as long as its shortest-lived part: the tag's digest, or the verdict.
                let ttl = if parsed.digest().is_some() {
                    VERIFIED_TTL
                } else {
                    ttl.min(VERIFIED_TTL)
                };
                self.cache.insert(
                    image.raw.to_owned(),
                    Cached::Admitted {
                        admitted: admitted.clone(),
                        rule: identity,
                    },
                    admitted.pinned.len() + 96,
                    ttl,
                    Instant::now(),
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

    /// The digest `image`'s tag names now (or within the tag TTL).
    async fn resolve_tag(
        &self,
        repo: Repo<'_>,
        image: &ImageRef,
        ttl: Duration,
    ) -> Result<Digest, RegistryError> {
        let tag = image.tag().unwrap_or("latest");
        let key = format!("t {}:{tag}", image.repository());
        if let Some(Cached::Digest(d)) = self.cache.get(&key, Instant::now()) {
            self.metrics.hit(CacheKind::tag);
            return Ok(d);
        }
        self.metrics.miss(CacheKind::tag);
        self.tag_flights
            .run(&key, || async {
                if let Some(Cached::Digest(d)) = self.cache.get(&key, Instant::now()) {
                    return Ok(d);
                }
                let result = self.fetch_tag(repo, tag).await;
                match &result {
                    Ok(d) => self.cache.insert(
                        key.clone(),
                        Cached::Digest(d.clone()),
                        64,
                        ttl,
                        Instant::now(),
                    ),
                    Err(e) => self.metrics.failure(repo.label, e.reason()),
                }
                result
            })
            .await
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
        if let Some(header) = fetched.headers.get("docker-content-digest") {
            let said = header.to_str().ok().and_then(|h| h.parse::<Digest>().ok());
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

    /// Whether `digest` carries a signature `rule` accepts.
    async fn verify(
        &self,
        repo: Repo<'_>,
        image: &ImageRef,
        digest: &Digest,
        rule: &TrustRule,
        negative_ttl: Duration,
    ) -> Result<Verdict, RegistryError> {
        let key = format!("v {} {digest} {:016x}", image.repository(), rule_keys(rule));
        if let Some(Cached::Verdict(v)) = self.cache.get(&key, Instant::now()) {
            self.metrics.hit(CacheKind::signature);
            return Ok(v);
        }
        self.metrics.miss(CacheKind::signature);
        self.verdict_flights
            .run(&key, || async {
                if let Some(Cached::Verdict(v)) = self.cache.get(&key, Instant::now()) {
                    return Ok(v);
                }
                let result = self.fetch_verdict(repo, image, digest, rule).await;
                match &result {
                    Ok(v) => {
                        let (ttl, bytes) = match v {
                            Verdict::Verified { key } => (VERIFIED_TTL, key.len()),
                            Verdict::Rejected(why) => (negative_ttl, why.len()),
                        };
                        self.cache.insert(
                            key.clone(),
                            Cached::Verdict(v.clone()),
                            bytes,
                            ttl,
                            Instant::now(),
                        );
                    }
                    Err(e) => self.metrics.failure(repo.label, e.reason()),
                }
                result
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
