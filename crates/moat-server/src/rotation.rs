//! Certificates without cert-manager (`moat serve --rotate-certs`): one replica, holding a
//! `coordination.k8s.io/v1` Lease, keeps the CA and the serving certificate in moat's Secret and
//! renews them; every replica serves the files the kubelet projects from that Secret, reloaded
//! by [`crate::tls::CertStore`].
//!
//! A CA rotation never leaves the API server without trust in the certificate it is shown:
//!
//! 1. a new CA is staged in the Secret (`next-ca.crt`, `next-ca.key`) and added to the
//!    `caBundle` of both webhook configurations; the time the bundles were confirmed is recorded;
//! 2. only after [`RotationPolicy::propagation_delay`] (the API servers' watch of the webhook
//!    configurations) does a serving certificate signed by the new CA enter the Secret; the old
//!    CA moves to `previous-ca.crt` and stays in the bundles;
//! 3. after another delay (the kubelet's sync of the Secret volume into every replica, and the
//!    file reload) the old CA leaves the Secret and the bundles.
//!
//! The serving certificate alone is renewed when a third of its lifetime remains; it is signed
//! by a CA already in the bundles, so no delay is needed.
//!
//! Every write is a replace or a JSON patch guarded by the `resourceVersion` that was read, so
//! two replicas that both believe they hold the Lease (a paused process, skewed clocks) cannot
//! overwrite each other: the second write fails and is retried from fresh state on the next tick.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::certs::{self, Authority, CertError, Validity};

/// Secret keys. `tls.crt`, `tls.key` and `ca.crt` are what `moat install` writes and the
/// Deployment mounts; the others exist only with rotation on.
pub mod keys {
    pub const TLS_CERT: &str = "tls.crt";
    pub const TLS_KEY: &str = "tls.key";
    /// The CA that signs the serving certificate.
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    /// A CA waiting for the webhook configurations to trust it.
    pub const NEXT_CA_CERT: &str = "next-ca.crt";
    pub const NEXT_CA_KEY: &str = "next-ca.key";
    /// The CA replaced by the last rotation, trusted until every replica serves the new one.
    pub const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
}

/// Secret annotations recording when a step of a CA rotation happened (RFC 3339).
pub mod annotations {
    /// When the staged CA was confirmed in both webhook configurations' `caBundle`.
    pub const NEXT_CA_TRUSTED_SINCE: &str = "moat.dev/next-ca-trusted-since";
    /// When the serving certificate signed by a new CA entered the Secret.
    pub const CA_PROMOTED_AT: &str = "moat.dev/ca-promoted-at";
}

/// The time, injected so tests can run a year of rotations in seconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// Lifetimes and delays. Cross-field rules in [`RotationPolicy::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    pub ca_lifetime: Duration,
    pub serving_lifetime: Duration,
    /// How long a change to the trust bundle or the Secret is given to reach every reader: the
    /// API servers' view of the webhook configurations, and the kubelet's sync of the Secret
    /// volume (about a minute by default, plus its cache TTL) followed by moat's file reload.
    pub propagation_delay: Duration,
    /// A Lease not renewed for this long may be taken over by another replica.
    pub lease_duration: Duration,
    /// How often the controller looks at the Secret.
    pub check_interval: Duration,
}

/// Default CA lifetime.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Default serving certificate lifetime.
pub const DEFAULT_SERVING_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// Default propagation delay: ten kubelet sync periods.
pub const DEFAULT_PROPAGATION_DELAY: Duration = Duration::from_secs(10 * 60);
/// How long a kubelet may take to show a changed Secret in a volume: its sync period (60 s by
/// default) plus its cache's TTL. A propagation delay below it is allowed only with a warning.
pub const KUBELET_SECRET_SYNC: Duration = Duration::from_secs(90);
/// Default Lease duration.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(60);
/// Default interval between checks.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(20);

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            ca_lifetime: DEFAULT_CA_LIFETIME,
            serving_lifetime: DEFAULT_SERVING_LIFETIME,
            propagation_delay: DEFAULT_PROPAGATION_DELAY,
            lease_duration: DEFAULT_LEASE_DURATION,
            check_interval: DEFAULT_CHECK_INTERVAL,
        }
    }
}

impl RotationPolicy {
    /// Checks that renewals finish long before expiry.
    ///
    /// # Errors
    /// [`RotationError::Policy`] naming the rule broken.
    pub fn validate(&self) -> Result<(), RotationError> {
        let Self {
            ca_lifetime,
            serving_lifetime,
            propagation_delay,
            lease_duration,
            check_interval,
        } = self;
        // A CA rotation takes two delays and a few checks; it starts when a third of the CA's
        // lifetime remains and must end with room to spare.
        let rotation = *propagation_delay * 2 + *check_interval * 4 + *lease_duration;
        if *ca_lifetime / 3 <= rotation * 2 {
            return Err(RotationError::Policy(format!(
                "a third of the CA lifetime ({}s) must exceed twice a rotation ({}s: two \
                 propagation delays, four check intervals and a lease)",
                (*ca_lifetime / 3).as_secs(),
                rotation.as_secs()
            )));
        }
        if *serving_lifetime / 3 <= *check_interval * 4 + *lease_duration + *propagation_delay {
            return Err(RotationError::Policy(
                "a third of the serving certificate lifetime must exceed a propagation delay, \
                 four check intervals and a lease"
                    .to_owned(),
            ));
        }
        if propagation_delay.is_zero() {
            return Err(RotationError::Policy(
                "the propagation delay cannot be 0: a CA would leave the trust bundle before every \
                 API server and replica has moved to its successor"
                    .to_owned(),
            ));
        }
        if serving_lifetime > ca_lifetime {
            return Err(RotationError::Policy(
                "the serving certificate cannot outlive its CA".to_owned(),
            ));
        }
        if *lease_duration < *check_interval * 2 {
            return Err(RotationError::Policy(
                "the lease must last at least two check intervals, or the holder loses it between \
                 renewals"
                    .to_owned(),
            ));
        }
        if *ca_lifetime > 20 * 365 * DAY {
            return Err(RotationError::Policy(
                "a CA lifetime over 20 years".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Where the rotation controller reads and writes.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Namespace of the Secret and the Lease; `None`: the client's default (in a pod: its own).
    pub namespace: Option<String>,
    /// The TLS Secret the Deployment mounts.
    pub secret: String,
    /// The Lease; one per Secret.
    pub lease: String,
    /// Name of both webhook configurations (mutating and validating).
    pub webhook_configuration: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    /// DNS names (or IP addresses) of the serving certificate.
    pub dns_names: Vec<String>,
    pub policy: RotationPolicy,
}

/// The Lease that elects the writer for `secret` (one per Secret), in the Secret's namespace.
pub fn lease_name(secret: &str) -> String {
    format!("{secret}-rotation")
}

/// Why a check did not complete; the next check starts again from what the API holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error("rotation policy: {0}")]
    Policy(String),
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{kind} {name} not found")]
    NoWebhookConfiguration { kind: String, name: String },
    #[error("certificates: {0}")]
    Certs(#[from] CertError),
}

/// What one check did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Another replica holds the Lease: nothing was read or written.
    Follower,
    /// A first CA and serving certificate, in a Secret moat created (or found empty): nothing
    /// was trusted or served before, so there is no delay to wait.
    Bootstrapped,
    /// A copy of the Secret (and its keys) in kubectl's last-applied annotation, or a
    /// `caBundle` in that of a webhook configuration, was removed: a later `kubectl apply` of
    /// the install's output can then neither leave a key behind nor take the bundle away.
    ApplyRecordCleaned,
    /// A new CA is in the Secret, not yet trusted.
    CaStaged,
    /// A webhook configuration's `caBundle` now holds every CA in the Secret.
    BundlePatched,
    /// Both bundles confirmed to hold the staged CA; its delay starts.
    CaTrusted,
    /// A serving certificate signed by the new CA is in the Secret; the old CA is "previous".
    CaPromoted,
    /// A serving certificate from the same CA replaced one close to expiry.
    ServingRenewed,
    /// The previous CA left the Secret (and, in the same check, the bundles).
    PreviousCaRemoved,
}

impl Action {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Follower => "follower",
            Self::Bootstrapped => "bootstrapped",
            Self::ApplyRecordCleaned => "apply_record_cleaned",
            Self::CaStaged => "ca_staged",
            Self::BundlePatched => "bundle_patched",
            Self::CaTrusted => "ca_trusted",
            Self::CaPromoted => "ca_promoted",
            Self::ServingRenewed => "serving_renewed",
            Self::PreviousCaRemoved => "previous_ca_removed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// The controller's instruments: what it did (`Follower` not counted: every check of every
/// other replica) and how many checks failed.
#[derive(Debug, Clone, Default)]
struct RotationMetrics {
    actions: Family<ActionLabels, Counter>,
    failed_checks: Counter,
}

/// The rotation controller.
#[derive(Debug, Clone)]
pub struct Rotator {
    secrets: Api<Secret>,
    leases: Api<Lease>,
    mutating: Api<MutatingWebhookConfiguration>,
    validating: Api<ValidatingWebhookConfiguration>,
    options: RotationOptions,
    clock: Arc<dyn Clock>,
    metrics: RotationMetrics,
    /// What this replica serves, reported at every check ([`Rotator::with_served`]).
    served: Option<Arc<crate::tls::CertStore>>,
}

/// The label that marks a replica's serving report, with the rotation Lease's name as value.
pub const SERVING_REPORT_LABEL: &str = "moat.dev/serving-report";
/// The annotation of a serving report that holds the certificate the replica serves (PEM).
pub const SERVING_CERTIFICATE_ANNOTATION: &str = "moat.dev/serving-certificate";

/// Where `kubectl apply` (client-side) records what it applied, to compute deletions next time.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The Secret moat creates when none exists: `kubernetes.io/tls`, labelled as moat's.
fn blank_secret(name: &str) -> Secret {
    let mut secret = Secret {
        type_: Some("kubernetes.io/tls".to_owned()),
        ..Secret::default()
    };
    secret.metadata.name = Some(name.to_owned());
    secret.metadata.labels = Some(BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "moat".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "moat".to_owned()),
    ]));
    secret
}

/// `record` (a last-applied annotation) without any webhook's `caBundle`; `None` when it has
/// none (or is not JSON, which kubectl would not have written).
fn without_ca_bundles(record: &str) -> Option<String> {
    let mut applied: serde_json::Value = serde_json::from_str(record).ok()?;
    let mut removed = false;
    for webhook in applied["webhooks"].as_array_mut()? {
        if let Some(client) = webhook
            .get_mut("clientConfig")
            .and_then(|c| c.as_object_mut())
        {
            removed |= client.remove("caBundle").is_some();
        }
    }
    removed.then(|| applied.to_string())
}

/// The Lease in which replica `identity` reports what it serves, for rotation Lease `lease`.
pub fn serving_report_name(lease: &str, identity: &str) -> String {
    format!("{lease}-served-{identity}")
}

/// The Secret's contents, as the controller reasons about them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Material {
    ca_cert: Option<String>,
    ca_key: Option<String>,
    next: Option<Authority>,
    next_trusted_since: Option<SystemTime>,
    previous: Option<String>,
    promoted_at: Option<SystemTime>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.trim().is_empty())
}

fn time(annotations: &BTreeMap<String, String>, key: &str) -> Option<SystemTime> {
    annotations
        .get(key)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(SystemTime::from)
}

fn stamp(t: SystemTime) -> Option<Timestamp> {
    Timestamp::try_from(t).ok()
}

impl Material {
    fn read(secret: &Secret) -> Self {
        let (no_data, no_notes) = (BTreeMap::new(), BTreeMap::new());
        let data = secret.data.as_ref().unwrap_or(&no_data);
        let notes = secret.metadata.annotations.as_ref().unwrap_or(&no_notes);
        let next = match (
            text(data, keys::NEXT_CA_CERT),
            text(data, keys::NEXT_CA_KEY),
        ) {
            (Some(cert_pem), Some(key_pem)) => Some(Authority { cert_pem, key_pem }),
            _ => None,
        };
        Self {
            ca_cert: text(data, keys::CA_CERT),
            ca_key: text(data, keys::CA_KEY),
            next_trusted_since: next
                .as_ref()
                .and_then(|_| time(notes, annotations::NEXT_CA_TRUSTED_SINCE)),
            next,
            previous: text(data, keys::PREVIOUS_CA_CERT),
            promoted_at: time(notes, annotations::CA_PROMOTED_AT),
            tls_cert: text(data, keys::TLS_CERT),
            tls_key: text(data, keys::TLS_KEY),
        }
    }

    /// `secret` with this material in place of what it held (other keys and annotations kept).
    fn write(&self, mut secret: Secret) -> Secret {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        let mut set = |key: &str, value: Option<&String>| match value {
            Some(v) => {
                data.insert(key.to_owned(), ByteString(v.clone().into_bytes()));
            }
            None => {
                data.remove(key);
            }
        };
        set(keys::CA_CERT, self.ca_cert.as_ref());
        set(keys::CA_KEY, self.ca_key.as_ref());
        set(keys::NEXT_CA_CERT, self.next.as_ref().map(|a| &a.cert_pem));
        set(keys::NEXT_CA_KEY, self.next.as_ref().map(|a| &a.key_pem));
        set(keys::PREVIOUS_CA_CERT, self.previous.as_ref());
        set(keys::TLS_CERT, self.tls_cert.as_ref());
        set(keys::TLS_KEY, self.tls_key.as_ref());
        let notes = secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new);
        // An apply of an older install's Secret left its keys in kubectl's record of it.
        notes.remove(LAST_APPLIED);
        let mut note = |key: &str, value: Option<SystemTime>| match value.and_then(stamp) {
            Some(t) => {
                notes.insert(key.to_owned(), t.to_string());
            }
            None => {
                notes.remove(key);
            }
        };
        note(
            annotations::NEXT_CA_TRUSTED_SINCE,
            self.next_trusted_since.filter(|_| self.next.is_some()),
        );
        note(annotations::CA_PROMOTED_AT, self.promoted_at);
        secret
    }

    /// No CA in any role and no serving certificate: a Secret moat just created.
    fn is_blank(&self) -> bool {
        self.ca_cert.is_none()
            && self.next.is_none()
            && self.previous.is_none()
            && self.tls_cert.is_none()
    }

    fn current_ca(&self) -> Option<Authority> {
        Some(Authority {
            cert_pem: self.ca_cert.clone()?,
            key_pem: self.ca_key.clone()?,
        })
    }

    /// The CA needs replacing: missing, without its key (a Secret from an install without
    /// rotation), unreadable, or with a third of its lifetime left.
    fn ca_due(&self, now: SystemTime) -> bool {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(_)) => Validity::of(cert).map_or(true, |v| v.due_for_renewal(now)),
            _ => true,
        }
    }

    /// The serving certificate needs replacing: missing, unreadable, not from the current CA,
    /// or with a third of its lifetime left.
    fn serving_due(&self, now: SystemTime) -> bool {
        let (Some(cert), Some(_), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.ca_cert) else {
            return true;
        };
        !certs::signed_by(cert, ca) || Validity::of(cert).map_or(true, |v| v.due_for_renewal(now))
    }

    /// Every CA the API server must trust now, current first.
    fn bundle(&self) -> String {
        let mut pems: Vec<&str> = Vec::new();
        pems.extend(self.ca_cert.as_deref());
        pems.extend(self.next.as_ref().map(|a| a.cert_pem.as_str()));
        pems.extend(self.previous.as_deref());
        let mut out = String::new();
        for pem in pems {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }

    /// Advances the rotation by what is due at `now`; the actions taken, in order.
    /// `moved`: no live replica reports serving a certificate from the previous CA.
    fn advance(
        &mut self,
        now: SystemTime,
        options: &RotationOptions,
        moved: bool,
    ) -> Result<Vec<Action>, CertError> {
        let policy = &options.policy;
        let mut done = Vec::new();
        if self.is_blank() {
            // Nothing is trusted or served yet, so nothing can be broken by serving at once.
            let ca = certs::new_ca(now, policy.ca_lifetime)?;
            let (cert, key) = certs::issue(&ca, &options.dns_names, now, policy.serving_lifetime)?;
            self.ca_cert = Some(ca.cert_pem);
            self.ca_key = Some(ca.key_pem);
            self.tls_cert = Some(cert);
            self.tls_key = Some(key);
            done.push(Action::Bootstrapped);
            return Ok(done);
        }
        if self.next.is_none() && self.ca_due(now) {
            self.next = Some(certs::new_ca(now, policy.ca_lifetime)?);
            self.next_trusted_since = None;
            done.push(Action::CaStaged);
        }
        let promote = self
            .next_trusted_since
            .is_some_and(|since| now >= since + policy.propagation_delay);
        if let Some(next) = self.next.take_if(|_| promote) {
            let (cert, key) =
                certs::issue(&next, &options.dns_names, now, policy.serving_lifetime)?;
            // A CA without its key (installed before rotation) is still trusted until every
            // replica serves the new certificate.
            self.previous = self.ca_cert.take();
            self.ca_cert = Some(next.cert_pem);
            self.ca_key = Some(next.key_pem);
            self.tls_cert = Some(cert);
            self.tls_key = Some(key);
            self.next_trusted_since = None;
            self.promoted_at = Some(now);
            done.push(Action::CaPromoted);
        } else if let Some(ca) = self.current_ca().filter(|_| self.serving_due(now)) {
            let (cert, key) = certs::issue(&ca, &options.dns_names, now, policy.serving_lifetime)?;
            self.tls_cert = Some(cert);
            self.tls_key = Some(key);
            done.push(Action::ServingRenewed);
        }
        let retire = self
            .promoted_at
            .is_none_or(|at| now >= at + policy.propagation_delay);
        if self.previous.is_some() && retire && moved && !done.contains(&Action::CaPromoted) {
            self.previous = None;
            done.push(Action::PreviousCaRemoved);
        }
        Ok(done)
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

impl Rotator {
    /// A controller for `options`, reading time from `clock`, its instruments registered in
    /// `registry` (`moat_cert_rotation_actions_total{action}`,
    /// `moat_cert_rotation_failed_checks_total`).
    ///
    /// # Errors
    /// [`RotationError::Policy`] when the policy is inconsistent, [`CertError`] when a DNS name
    /// is not one.
    pub fn new(
        client: kube::Client,
        options: RotationOptions,
        clock: Arc<dyn Clock>,
        registry: &mut Registry,
    ) -> Result<Self, RotationError> {
        options.policy.validate()?;
        // Checked now rather than at the first renewal, months later.
        certs::check_names(&options.dns_names)?;
        let ns = options
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Self {
            secrets: Api::namespaced(client.clone(), &ns),
            leases: Api::namespaced(client.clone(), &ns),
            mutating: Api::all(client.clone()),
            validating: Api::all(client),
            options,
            clock,
            metrics: RotationMetrics::register(registry),
            served: None,
        })
    }

    /// Checks every [`RotationPolicy::check_interval`] until `stop` turns true, then releases
    /// the Lease if this replica holds it, so another takes over at its next check instead of
    /// after the Lease expires. Failures are logged and retried at the next check.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.options.policy.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = moat_listen::stopped(&mut stop) => {
                    match self.release().await {
                        Ok(true) => tracing::info!(lease = %self.options.lease, "released the certificate rotation Lease"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "could not release the certificate rotation Lease; another replica takes over when it expires"),
                    }
                    return;
                }
            }
            match self.check().await {
                Ok(actions) => {
                    for action in actions.iter().filter(|a| **a != Action::Follower) {
                        tracing::info!(?action, secret = %self.options.secret, "certificate rotation");
                    }
                }
                Err(e) => {
                    self.metrics.failed_checks.inc();
                    tracing::warn!(error = %e, "certificate rotation check failed; retrying");
                }
            }
        }
    }

    /// Reports, at every check, the certificate `store` serves, so the leader retires an old CA
    /// only once every live replica serves a certificate from its successor (the propagation
    /// delay alone trusts every kubelet to have synced the Secret in time).
    #[must_use]
    pub fn with_served(mut self, store: Arc<crate::tls::CertStore>) -> Self {
        self.served = Some(store);
        self
    }

    /// Writes this replica's serving report: a Lease named for it, renewed at every check, with
    /// the certificate it serves.
    async fn report(&self, now: SystemTime) -> Result<(), RotationError> {
        let Some(pem) = self.served.as_ref().and_then(|s| s.leaf_pem()) else {
            return Ok(());
        };
        let name = serving_report_name(&self.options.lease, &self.options.identity);
        let seconds =
            i32::try_from(self.options.policy.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let at = stamp(now).map(MicroTime);
        let mut lease = self.leases.get_opt(&name).await?.unwrap_or_default();
        let fresh = lease.metadata.resource_version.is_none();
        lease.metadata.name = Some(name.clone());
        lease
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(SERVING_REPORT_LABEL.to_owned(), self.options.lease.clone());
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(SERVING_CERTIFICATE_ANNOTATION.to_owned(), pem);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.options.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = at;
        let written = if fresh {
            self.leases.create(&PostParams::default(), &lease).await
        } else {
            self.leases
                .replace(&name, &PostParams::default(), &lease)
                .await
        };
        match written {
            Ok(_) => Ok(()),
            // Another write raced this one; the next check reports again.
            Err(e) if conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Serves the Secret's pair while this replica's volume has not caught up with a Secret
    /// moat created (a first install): the kubelet syncs it within a minute or two, the API now.
    fn fill(&self, material: &Material) {
        let (Some(store), Some(cert), Some(key)) =
            (&self.served, &material.tls_cert, &material.tls_key)
        else {
            return;
        };
        match store.fill_if_empty(cert, key) {
            Ok(true) => tracing::info!(
                secret = %self.options.secret,
                "serving the certificate read from the Secret until its volume is synced"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "the Secret's serving pair does not load"),
        }
    }

    /// Whether a live replica still serves a certificate from `ca` (by its serving report).
    async fn still_served(&self, ca: &str, now: SystemTime) -> Result<bool, RotationError> {
        let params = kube::api::ListParams::default()
            .labels(&format!("{SERVING_REPORT_LABEL}={}", self.options.lease));
        let reports = self.leases.list(&params).await?;
        Ok(reports.items.iter().any(|lease| {
            let Some(spec) = &lease.spec else {
                return false;
            };
            let live = spec.renew_time.as_ref().is_some_and(|t| {
                let lasts = Duration::from_secs(
                    u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
                );
                now < SystemTime::from(t.0) + lasts
            });
            live && lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVING_CERTIFICATE_ANNOTATION))
                .is_some_and(|pem| certs::signed_by(pem, ca))
        }))
    }

    /// One check: hold the Lease, advance the rotation, publish the trust bundle.
    ///
    /// # Errors
    /// [`RotationError`]; nothing is half-applied that the next check cannot finish.
    pub async fn check(&self) -> Result<Vec<Action>, RotationError> {
        let now = self.clock.now();
        if let Err(e) = self.report(now).await {
            // Without its report the leader falls back to the propagation delay alone.
            tracing::warn!(error = %e, "could not report the serving certificate");
        }
        if !self.lead(now).await? {
            if self.served.as_ref().is_some_and(|s| s.is_empty())
                && let Some(secret) = self.secrets.get_opt(&self.options.secret).await?
            {
                self.fill(&Material::read(&secret));
            }
            return Ok(vec![Action::Follower]);
        }
        let name = &self.options.secret;
        let found = self.secrets.get_opt(name).await?;
        let created = found.is_none();
        let mut secret = found.unwrap_or_else(|| blank_secret(name));
        let recorded = secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(LAST_APPLIED));
        let read = Material::read(&secret);
        let mut material = read.clone();
        let moved = match &material.previous {
            Some(previous) => !self.still_served(previous, now).await?,
            None => true,
        };
        let mut done = material.advance(now, &self.options, moved)?;
        if recorded {
            done.push(Action::ApplyRecordCleaned);
        }
        if created {
            // Two leaders at once (a paused process) cannot both create it: the second fails.
            secret = self
                .secrets
                .create(&PostParams::default(), &material.write(secret))
                .await?;
        } else if material != read || recorded {
            secret = self
                .secrets
                .replace(name, &PostParams::default(), &material.write(secret))
                .await?;
        }
        self.fill(&material);
        // Published from the Secret just written: a bundle never trusts less than the Secret's
        // serving certificate needs.
        let bundle = material.bundle();
        if self
            .publish::<MutatingWebhookConfiguration>(&self.mutating, &bundle)
            .await?
        {
            done.push(Action::BundlePatched);
        }
        if self
            .publish::<ValidatingWebhookConfiguration>(&self.validating, &bundle)
            .await?
        {
            done.push(Action::BundlePatched);
        }
        if material.next.is_some() && material.next_trusted_since.is_none() {
            material.next_trusted_since = Some(now);
            self.secrets
                .replace(name, &PostParams::default(), &material.write(secret))
                .await?;
            done.push(Action::CaTrusted);
        }
        for action in &done {
            self.metrics
                .actions
                .get_or_create(&ActionLabels {
                    action: action.as_str(),
                })
                .inc();
        }
        Ok(done)
    }

    /// Sets every webhook's `caBundle` in configuration `K` to `bundle`; `Ok(true)` if anything
    /// changed. The patch is guarded by the `resourceVersion` read, so the webhook indices it
    /// names are the ones seen.
    async fn publish<K>(&self, api: &Api<K>, bundle: &str) -> Result<bool, RotationError>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let name = &self.options.webhook_configuration;
        let object = match api.get(name).await {
            Ok(o) => o,
            Err(e) if not_found(&e) => {
                return Err(RotationError::NoWebhookConfiguration {
                    kind: K::kind(&()).into_owned(),
                    name: name.clone(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let value = serde_json::to_value(&object).map_err(kube::Error::SerdeError)?;
        let wanted = base64_encode(bundle.as_bytes());
        let webhooks = value["webhooks"].as_array().cloned().unwrap_or_default();
        let mut ops = vec![
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": value["metadata"]["resourceVersion"]}),
        ];
        for (i, webhook) in webhooks.iter().enumerate() {
            if webhook["clientConfig"]["caBundle"].as_str() != Some(wanted.as_str()) {
                ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": wanted}));
            }
        }
        // An older install's output carried the bundle; kubectl recorded it, and would delete
        // it from the live object when a newer output (without it) is applied. moat owns it.
        if let Some(cleaned) = value["metadata"]["annotations"][LAST_APPLIED]
            .as_str()
            .and_then(without_ca_bundles)
        {
            ops.push(json!({"op": "replace", "path": "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration", "value": cleaned}));
        }
        if ops.len() == 1 {
            return Ok(false);
        }
        let patch: json_patch::Patch =
            serde_json::from_value(json!(ops)).map_err(kube::Error::SerdeError)?;
        api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await?;
        Ok(true)
    }

    /// Gives the Lease up if this replica holds it: `Ok(true)` when it did.
    ///
    /// # Errors
    /// [`RotationError`] when the API cannot be reached.
    pub async fn release(&self) -> Result<bool, RotationError> {
        let Some(mut lease) = self.leases.get_opt(&self.options.lease).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.options.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        match self
            .leases
            .replace(&self.options.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Acquires or renews the Lease; `Ok(false)` while another live holder has it.
    async fn lead(&self, now: SystemTime) -> Result<bool, RotationError> {
        let RotationOptions {
            lease: name,
            identity,
            policy,
            ..
        } = &self.options;
        let seconds = i32::try_from(policy.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let at = stamp(now).map(MicroTime);
        let Some(mut lease) = self.leases.get_opt(name).await? else {
            let mut lease = Lease::default();
            lease.metadata.name = Some(name.clone());
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: at.clone(),
                renew_time: at,
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            });
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let held = spec.holder_identity.as_deref() == Some(identity.as_str());
        if !held {
            let last = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| SystemTime::from(t.0));
            let lasts = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(seconds)).unwrap_or(0),
            );
            let expired =
                spec.holder_identity.is_none() || last.is_none_or(|last| now >= last + lasts);
            if !expired {
                return Ok(false);
            }
            spec.holder_identity = Some(identity.clone());
            spec.acquire_time = at.clone();
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = at;
        spec.lease_duration_seconds = Some(seconds);
        match self
            .leases
            .replace(name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl RotationMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "moat_cert_rotation_actions",
            "Steps of certificate rotation this replica took",
            m.actions.clone(),
        );
        registry.register(
            "moat_cert_rotation_failed_checks",
            "Rotation checks that failed (retried at the next check)",
            m.failed_checks.clone(),
        );
        m
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(policy: RotationPolicy) -> RotationOptions {
        RotationOptions {
            namespace: None,
            secret: "moat-tls".to_owned(),
            lease: "moat-tls".to_owned(),
            webhook_configuration: "moat".to_owned(),
            identity: "moat-0".to_owned(),
            dns_names: vec!["moat.moat-system.svc".to_owned()],
            policy,
        }
    }

    #[test]
    fn the_default_policy_is_valid() {
        RotationPolicy::default().validate().unwrap();
    }

    #[test]
    fn rejects_policies_that_cannot_finish_a_rotation_before_expiry() {
        let base = RotationPolicy::default();
        let cases = [
            (
                "ca_lifetime_shorter_than_two_rotations",
                RotationPolicy {
                    ca_lifetime: Duration::from_secs(3600),
                    serving_lifetime: Duration::from_secs(3600),
                    ..base.clone()
                },
            ),
            (
                "serving_lifetime_shorter_than_a_delay",
                RotationPolicy {
                    serving_lifetime: Duration::from_secs(600),
                    ..base.clone()
                },
            ),
            (
                "serving_outlives_ca",
                RotationPolicy {
                    serving_lifetime: base.ca_lifetime * 2,
                    ..base.clone()
                },
            ),
            (
                "no_propagation_delay",
                RotationPolicy {
                    propagation_delay: Duration::ZERO,
                    ..base.clone()
                },
            ),
            (
                "lease_shorter_than_two_checks",
                RotationPolicy {
                    lease_duration: base.check_interval,
                    ..base.clone()
                },
            ),
        ];
        for (name, policy) in cases {
            assert!(
                matches!(policy.validate(), Err(RotationError::Policy(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn a_ca_rotation_trusts_before_it_signs_and_retires_after_a_delay() {
        let o = options(RotationPolicy::default());
        let delay = o.policy.propagation_delay;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut m = Material::default();
        // From nothing (a Secret moat just created): a CA and a serving certificate at once,
        // since nothing was trusted or served before.
        assert_eq!(m.advance(t0, &o, true).unwrap(), [Action::Bootstrapped]);
        assert!(certs::signed_by(
            m.tls_cert.as_deref().unwrap(),
            m.ca_cert.as_deref().unwrap()
        ));
        assert!(m.advance(t0 + delay, &o, true).unwrap().is_empty());
        // A CA without its key (a --static-certs install): a new CA is staged, and nothing
        // signs with it until it is trusted, however long that takes.
        m.ca_key = None;
        assert_eq!(m.advance(t0, &o, true).unwrap(), [Action::CaStaged]);
        assert!(m.advance(t0 + delay * 10, &o, true).unwrap().is_empty());
        m.next_trusted_since = Some(t0 + delay * 10);
        assert!(m.advance(t0 + delay * 10, &o, true).unwrap().is_empty());
        let t1 = t0 + delay * 11;
        assert_eq!(m.advance(t1, &o, true).unwrap(), [Action::CaPromoted]);
        assert!(certs::signed_by(
            m.tls_cert.as_deref().unwrap(),
            m.ca_cert.as_deref().unwrap()
        ));
        assert!(m.next.is_none() && m.previous.is_some());
        // Retired a delay later, every replica having moved.
        assert_eq!(
            m.advance(t1 + delay, &o, true).unwrap(),
            [Action::PreviousCaRemoved]
        );
        let first_ca = m.ca_cert.clone();

        // Two thirds into the CA's life: staged again; the old CA stays current meanwhile.
        let t2 = t1 + o.policy.ca_lifetime * 2 / 3 + DAY;
        let actions = m.advance(t2, &o, true).unwrap();
        assert!(actions.contains(&Action::CaStaged), "{actions:?}");
        assert_eq!(m.ca_cert, first_ca);
        assert_eq!(m.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        m.next_trusted_since = Some(t2);
        assert_eq!(
            m.advance(t2 + delay, &o, true).unwrap(),
            [Action::CaPromoted]
        );
        assert_eq!(m.previous, first_ca);
        assert_eq!(m.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        // The old CA is kept for a delay after the new serving certificate was written, and
        // then for as long as a live replica still serves a certificate from it.
        assert!(
            m.advance(t2 + delay + delay / 2, &o, true)
                .unwrap()
                .is_empty()
        );
        assert!(
            m.advance(t2 + delay * 3, &o, false).unwrap().is_empty(),
            "a replica still serves the old CA's certificate"
        );
        assert_eq!(
            m.advance(t2 + delay * 3, &o, true).unwrap(),
            [Action::PreviousCaRemoved]
        );
        assert_eq!(m.bundle().matches("BEGIN CERTIFICATE").count(), 1);
    }

    #[test]
    fn a_secret_without_a_ca_key_starts_a_ca_rotation() {
        let o = options(RotationPolicy::default());
        let g = certs::generate(&o.dns_names).unwrap();
        let mut m = Material {
            ca_cert: Some(g.ca_cert_pem),
            tls_cert: Some(g.cert_pem.clone()),
            tls_key: Some(g.key_pem),
            ..Material::default()
        };
        assert_eq!(
            m.advance(SystemTime::now(), &o, true).unwrap(),
            [Action::CaStaged]
        );
        assert_eq!(m.tls_cert.as_deref(), Some(g.cert_pem.as_str()));
    }

    #[test]
    fn material_survives_a_round_trip_through_the_secret() {
        let o = options(RotationPolicy::default());
        let mut m = Material::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        m.advance(now, &o, true).unwrap();
        m.ca_key = None;
        m.advance(now, &o, true).unwrap();
        m.next_trusted_since = Some(now);
        assert!(m.next.is_some());
        let mut secret = Secret::default();
        secret.metadata.annotations = Some(BTreeMap::from([
            ("keep".to_owned(), "me".to_owned()),
            (LAST_APPLIED.to_owned(), "{\"stringData\":{}}".to_owned()),
        ]));
        let secret = m.write(secret);
        assert_eq!(Material::read(&secret), m);
        let notes = secret.metadata.annotations.unwrap();
        assert_eq!(notes["keep"], "me");
        assert!(
            !notes.contains_key(LAST_APPLIED),
            "kubectl's copy of the keys goes"
        );
    }
}
