//! The registry client: HTTPS GETs of the distribution API (`/v2/<repo>/manifests/<ref>`,
//! `/v2/<repo>/blobs/<digest>`) with the authentication dance of [`crate::auth`], bounded
//! bodies and redirects for blobs. Only `https`: a registry's answer decides what runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use moat_core::image::DEFAULT_DOMAIN;
use moat_core::trust::PemCertificates;

use crate::auth::{Challenge, Credentials, CredentialsError, DockerConfig};
use crate::error::RegistryError;
use crate::limits::{
    IDLE_CONNECTION_TIMEOUT, MAX_CALLS_IN_FLIGHT, MAX_CALLS_IN_FLIGHT_PER_NAMESPACE,
    MAX_CALLS_IN_FLIGHT_PER_REGISTRY, MAX_CALLS_PER_REGISTRY_PER_NAMESPACE, MAX_CHALLENGE_BYTES,
    MAX_IDLE_CONNECTIONS_PER_HOST, MAX_REDIRECTS, MAX_RESPONSE_HEAD_BYTES, MAX_TOKEN_BYTES,
    MAX_TOKEN_RESPONSE_BYTES, MAX_TOKEN_TTL, TOKEN_EXPIRY_MARGIN,
};
use crate::metrics::{Call, RegistryMetrics};
use crate::slots::FairSlots;
use crate::tokens::TokenStore;

/// Manifest media types moat reads, in the order it prefers them: an index (multi-platform) is
/// pinned as such, the kubelet picks its platform.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The host serving a registry's API: Docker Hub's references say `docker.io`, its API is
/// elsewhere.
pub fn api_host(registry: &str) -> &str {
    if registry == DEFAULT_DOMAIN {
        "registry-1.docker.io"
    } else {
        registry
    }
}

/// Why the client cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error("images.trust.caCertificates: certificate {index} is not a usable CA: {reason}")]
    Ca { index: usize, reason: String },
    #[error("no TLS root: the system has none and images.trust.caCertificates names none")]
    NoRoots,
    #[error("images.trust.credentialsFile: {0}")]
    Credentials(#[from] CredentialsError),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// One repository of one registry, as a call addresses it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Repo<'a> {
    /// As image references name it (`docker.io`, `reg:5000`): credentials are looked up by it.
    pub registry: &'a str,
    /// The metric label (see [`crate::metrics`]).
    pub label: &'a str,
    /// The path inside the registry (`library/busybox`).
    pub path: &'a str,
    /// The namespace of the review that asks: call slots are shared out by it.
    pub namespace: &'a str,
    /// Whether idle connections to it are kept for the next lookup: for the registries rules
    /// name. The others are named by tenants (`unmatched: pin`), and a pool per host they name
    /// would hold descriptors without bound, so their connections close after each call.
    pub pooled: bool,
}

/// A body read from a registry, and the one header moat reads beside it (the rest are not
/// kept).
#[derive(Debug)]
pub(crate) struct Fetched {
    pub body: Bytes,
    /// `Docker-Content-Digest`, when present: `Some(None)` when it is not text.
    pub content_digest: Option<Option<String>>,
}

type Https = HttpsConnector<HttpConnector>;

/// The HTTP client, shared by every lookup: its connection pool, the credentials file and the
/// authorisation headers got so far.
#[derive(Debug)]
pub(crate) struct Client {
    http: HyperClient<Https, Empty<Bytes>>,
    /// The same, keeping no idle connection (see [`Repo::pooled`]).
    unpooled: HyperClient<Https, Empty<Bytes>>,
    credentials: Option<Credentials>,
    /// `Authorization` values got so far, bounded in entries and bytes.
    authorizations: TokenStore,
    /// Calls in flight, all registries ([`MAX_CALLS_IN_FLIGHT`]), shared out by namespace.
    in_flight: Arc<FairSlots>,
    /// Calls in flight per registry label ([`MAX_CALLS_IN_FLIGHT_PER_REGISTRY`]), shared out
    /// by namespace; labels are the registries rules name and `other`, a set the operator
    /// bounds.
    per_registry: Mutex<HashMap<String, Arc<FairSlots>>>,
    metrics: RegistryMetrics,
}

impl Client {
    pub(crate) fn new(
        cas: Option<&PemCertificates>,
        credentials_file: Option<&str>,
        metrics: RegistryMetrics,
    ) -> Result<Self, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let mut configured = 0;
        for (index, der) in cas
            .map(PemCertificates::ders)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| SetupError::Ca {
                    index,
                    reason: e.to_string(),
                })?;
            configured += 1;
        }
        if added + configured == 0 {
            return Err(SetupError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        // The read buffer bounds a response's head (status, headers) and each body chunk read.
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS_PER_HOST)
            .http1_max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .build(https.clone());
        let unpooled = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .build(https);
        let credentials = credentials_file.map(Credentials::open).transpose()?;
        Ok(Self {
            http,
            unpooled,
            credentials,
            authorizations: TokenStore::default(),
            in_flight: FairSlots::new(MAX_CALLS_IN_FLIGHT, MAX_CALLS_IN_FLIGHT_PER_NAMESPACE),
            per_registry: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// GETs `/v2/<repo>/<path>` (`manifests/<ref>`, `blobs/<digest>`): `None` on 404.
    pub(crate) async fn get(
        &self,
        repo: Repo<'_>,
        path: &str,
        accept: Option<&str>,
        limit: usize,
        what: &str,
        call: Call,
    ) -> Result<Option<Fetched>, RegistryError> {
        let registry = self
            .per_registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(repo.label.to_owned())
            .or_insert_with(|| {
                FairSlots::new(
                    MAX_CALLS_IN_FLIGHT_PER_REGISTRY,
                    MAX_CALLS_PER_REGISTRY_PER_NAMESPACE,
                )
            })
            .clone();
        // The waits end at the review's deadline, when this future is dropped.
        let asked = Instant::now();
        let _registry_turn = registry.acquire(repo.namespace).await;
        let _turn = self.in_flight.acquire(repo.namespace).await;
        self.metrics.slot_wait(repo.label, asked.elapsed());
        let started = Instant::now();
        let result = self.get_inner(repo, path, accept, limit, what).await;
        self.metrics.call(repo.label, call, started.elapsed());
        result
    }

    async fn get_inner(
        &self,
        repo: Repo<'_>,
        path: &str,
        accept: Option<&str>,
        limit: usize,
        what: &str,
    ) -> Result<Option<Fetched>, RegistryError> {
        let reg = repo.registry;
        let url = format!("https://{}/v2/{}/{path}", api_host(reg), repo.path);
        let mut uri: Uri = url.parse().map_err(|_| RegistryError::Garbage {
            registry: reg.to_owned(),
            what: what.to_owned(),
            reason: "the reference does not make a valid URL".to_owned(),
        })?;
        let origin = uri.authority().cloned();
        let scope = format!("repository:{}:pull", repo.path);
        let (logins, generation) = self.credentials.as_ref().map_or_else(
            || (Arc::new(DockerConfig::default()), 0),
            Credentials::current,
        );
        let key = (reg.to_owned(), scope.clone(), generation);
        let mut authorization = self.authorizations.get(&key, Instant::now());
        let mut response = self
            .send(repo, &uri, accept, authorization.as_deref())
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .filter(|v| v.len() <= MAX_CHALLENGE_BYTES)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse)
                .ok_or_else(|| RegistryError::Auth {
                    registry: reg.to_owned(),
                    what: what.to_owned(),
                    reason: format!(
                        "it asks for authentication of a kind moat does not speak, or in a \
                         challenge of more than {MAX_CHALLENGE_BYTES} bytes"
                    ),
                })?;
            let login = logins.login(reg);
            let (value, ttl) = match challenge {
                Challenge::Basic => {
                    let login = login.ok_or_else(|| RegistryError::Auth {
                        registry: reg.to_owned(),
                        what: what.to_owned(),
                        reason: "it asks for credentials and the credentials file has none for it"
                            .to_owned(),
                    })?;
                    (login.basic_header(), MAX_TOKEN_TTL)
                }
                Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                } => {
                    let scope = asked.unwrap_or(scope);
                    self.token(repo, what, &realm, service.as_deref(), &scope, login)
                        .await?
                }
            };
            let value: Arc<str> = value.into();
            self.authorizations
                .insert(key.clone(), value.clone(), ttl, Instant::now());
            authorization = Some(value);
            response = self
                .send(repo, &uri, accept, authorization.as_deref())
                .await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                self.authorizations.remove(&key);
                return Err(RegistryError::Auth {
                    registry: reg.to_owned(),
                    what: what.to_owned(),
                    reason: if login.is_some() {
                        "the configured credentials were refused".to_owned()
                    } else {
                        "anonymous access was refused and no credentials are configured for it"
                            .to_owned()
                    },
                });
            }
        }
        let mut redirects = 0;
        while response.status().is_redirection() {
            redirects += 1;
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| resolve_location(&uri, l));
            let Some(next) = location.filter(|_| redirects <= MAX_REDIRECTS) else {
                return Err(RegistryError::Garbage {
                    registry: reg.to_owned(),
                    what: what.to_owned(),
                    reason: "a redirect without a usable https location, or too many".to_owned(),
                });
            };
            uri = next;
            // Credentials stay with the registry they are for.
            let auth = if uri.authority() == origin.as_ref() {
                authorization.as_deref()
            } else {
                None
            };
            response = self.send(repo, &uri, accept, auth).await?;
        }
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::FORBIDDEN => {
                return Err(RegistryError::Auth {
                    registry: reg.to_owned(),
                    what: what.to_owned(),
                    reason: "HTTP 403".to_owned(),
                });
            }
            s => {
                return Err(RegistryError::Status {
                    registry: reg.to_owned(),
                    status: s.as_u16(),
                    what: what.to_owned(),
                });
            }
        }
        let content_digest = response
            .headers()
            .get("docker-content-digest")
            .map(|v| v.to_str().ok().map(str::to_owned));
        let declared = declared_length(response.headers());
        let body = read_limited(reg, what, response.into_body(), declared, limit).await?;
        Ok(Some(Fetched {
            body,
            content_digest,
        }))
    }

    async fn send(
        &self,
        repo: Repo<'_>,
        uri: &Uri,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<http::Response<hyper::body::Incoming>, RegistryError> {
        let mut req = Request::get(uri.clone()).header(header::USER_AGENT, "moat");
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let registry = repo.registry;
        let req = req
            .body(Empty::new())
            .map_err(|e| RegistryError::Unreachable {
                registry: registry.to_owned(),
                detail: format!("the request cannot be made: {e}"),
            })?;
        let http = if repo.pooled {
            &self.http
        } else {
            &self.unpooled
        };
        self.metrics.request(repo.label);
        http.request(req)
            .await
            .map_err(|e| connection_error(registry, &e))
    }

    /// A bearer token from `realm`, and how long to keep it.
    async fn token(
        &self,
        repo: Repo<'_>,
        what: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        login: Option<&crate::auth::Login>,
    ) -> Result<(String, Duration), RegistryError> {
        let reg = repo.registry;
        let auth_err = |reason: String| RegistryError::Auth {
            registry: reg.to_owned(),
            what: what.to_owned(),
            reason,
        };
        if !realm.starts_with("https://") {
            return Err(auth_err(
                "its token service is not https, and credentials go only over TLS".to_owned(),
            ));
        }
        let mut url = realm.to_owned();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", service), ("scope", Some(scope))] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(k);
                url.push('=');
                url.push_str(&query_escape(v));
                sep = '&';
            }
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| auth_err("its token service is not a URL".to_owned()))?;
        let started = Instant::now();
        let basic = login.map(crate::auth::Login::basic_header);
        let response = self.send(repo, &uri, None, basic.as_deref()).await;
        let result = async {
            let response = response?;
            if response.status() != StatusCode::OK {
                return Err(auth_err(format!(
                    "its token service answered HTTP {}",
                    response.status().as_u16()
                )));
            }
            let declared = declared_length(response.headers());
            let body = read_limited(
                reg,
                "token",
                response.into_body(),
                declared,
                MAX_TOKEN_RESPONSE_BYTES,
            )
            .await?;
            #[derive(serde::Deserialize)]
            struct TokenAnswer {
                #[serde(default)]
                token: Option<String>,
                #[serde(default)]
                access_token: Option<String>,
                #[serde(default)]
                expires_in: Option<u64>,
            }
            let answer: TokenAnswer = serde_json::from_slice(&body)
                .map_err(|_| auth_err("its token service sent no JSON token".to_owned()))?;
            let token = answer
                .token
                .or(answer.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| auth_err("its token service sent no token".to_owned()))?;
            if token.len() > MAX_TOKEN_BYTES {
                return Err(auth_err(format!(
                    "its token service sent a token of more than {MAX_TOKEN_BYTES} bytes"
                )));
            }
            // Distribution's default when the answer names none.
            let ttl = Duration::from_secs(answer.expires_in.unwrap_or(60))
                .min(MAX_TOKEN_TTL)
                .saturating_sub(TOKEN_EXPIRY_MARGIN);
            Ok((format!("Bearer {token}"), ttl))
        }
        .await;
        self.metrics
            .call(repo.label, Call::token, started.elapsed());
        result
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body of at most `limit` bytes; a `Content-Length` over it is refused before reading.
async fn read_limited(
    registry: &str,
    what: &str,
    body: hyper::body::Incoming,
    declared: Option<u64>,
    limit: usize,
) -> Result<Bytes, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        registry: registry.to_owned(),
        what: what.to_owned(),
        limit,
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(RegistryError::Unreachable {
            registry: registry.to_owned(),
            detail: format!("the connection broke while reading {what}: {e}"),
        }),
    }
}

/// The rustls error behind `e`: it travels inside io::Errors (one per layer), whose `source`
/// skips what they wrap.
fn tls_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut e = e;
    for _ in 0..8 {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        e = inner;
    }
    None
}

/// A failed connection as a denial: a certificate that does not verify is told apart (the
/// operator's fix is a CA, not a network path); the cause itself goes to the detail, for the
/// log.
fn connection_error(registry: &str, e: &(dyn std::error::Error + 'static)) -> RegistryError {
    let mut certificate = false;
    let mut cause: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(tls) = tls_error(cause) {
            certificate |= matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        match cause.source() {
            Some(next) => cause = next,
            None => break,
        }
    }
    let detail = cause.to_string();
    if certificate {
        RegistryError::Untrusted {
            registry: registry.to_owned(),
            detail,
        }
    } else {
        RegistryError::Unreachable {
            registry: registry.to_owned(),
            detail,
        }
    }
}

/// A `Location` header against the URI it answered: absolute `https` URLs and absolute paths.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("https://") {
        return location.parse().ok();
    }
    if location.starts_with('/') && !location.starts_with("//") {
        let authority = base.authority()?;
        return format!("https://{authority}{location}").parse().ok();
    }
    None
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_is_served_from_its_api_host() {
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("localhost:5000"), "localhost:5000");
    }

    #[test]
    fn escapes_scope_values() {
        assert_eq!(
            query_escape("repository:shop/api:pull"),
            "repository%3Ashop%2Fapi%3Apull"
        );
    }

    #[test]
    fn follows_only_https_and_absolute_path_redirects() {
        let base: Uri = "https://reg:5000/v2/a/blobs/x".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "/v2/b").unwrap().to_string(),
            "https://reg:5000/v2/b"
        );
        assert!(resolve_location(&base, "https://s3.example/o?sig=1").is_some());
        assert!(resolve_location(&base, "http://s3.example/o").is_none());
        assert!(resolve_location(&base, "//evil/x").is_none());
        assert!(resolve_location(&base, "relative").is_none());
    }
}
