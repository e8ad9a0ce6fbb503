//! Registries of the test's own (a TLS server answering from a function of the request head),
//! for what a real distribution registry will not do: answers that are not what the protocol
//! says (each a denial naming the registry and what was wrong, never a hang) and the bearer
//! token dance of Docker Hub and GHCR.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

mod loopback_tls;
use loopback_tls::tls;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_core::image::ImageRef;
use moat_core::trust::ImageTrust;
use moat_registry::{Image, Resolver};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `response` (status line, headers and body) to every request; the registry's
/// `host:port` and the CA to trust.
async fn canned(response: Vec<u8>) -> (String, String) {
    serve(move |_, _| response.clone()).await
}

/// Answers each request with `answer(request head, own host:port)`, one request per
/// connection; the registry's `host:port` and the CA to trust.
async fn serve<F>(answer: F) -> (String, String)
where
    F: Fn(&str, &str) -> Vec<u8> + Send + Sync + 'static,
{
    serve_after(Duration::ZERO, answer).await
}

/// [`serve`], each answer sent `delay` after its request arrived (a registry across a network).
async fn serve_after<F>(delay: Duration, answer: F) -> (String, String)
where
    F: Fn(&str, &str) -> Vec<u8> + Send + Sync + 'static,
{
    let (ca, acceptor) = tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let answer = Arc::new(answer);
    let own = addr.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, answer, own) = (acceptor.clone(), answer.clone(), own.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = answer(&String::from_utf8_lossy(&head), &own);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let _ = tls.write_all(&response).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca)
}

fn http(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

async fn check(registry: &str, ca: &str) -> Result<moat_registry::Admitted, String> {
    let (trust, resolver) = resolver(ca, "");
    check_with(&resolver, &trust, &format!("{registry}/app:1")).await
}

fn resolver(ca: &str, extra: &str) -> (ImageTrust, Resolver) {
    let yaml = format!(
        "caCertificates: |\n{}unmatched: pin\n{extra}",
        ca.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let trust: ImageTrust = serde_yaml_ng::from_str(&yaml).unwrap();
    let resolver = Resolver::new(&trust, &mut Registry::default()).unwrap();
    (trust, resolver)
}

async fn check_with(
    resolver: &Resolver,
    trust: &ImageTrust,
    raw: &str,
) -> Result<moat_registry::Admitted, String> {
    let raw = raw.to_owned();
    let parsed: ImageRef = raw.parse().unwrap();
    let mut out = resolver
        .check(
            trust,
            "tenant",
            &[Image {
                raw: &raw,
                parsed: &parsed,
            }],
            Instant::now() + Duration::from_secs(5),
        )
        .await;
    out.remove(0)
}

#[tokio::test]
async fn a_manifest_that_is_not_json_is_a_denial() {
    let (registry, ca) = canned(http("200 OK", &[("content-length", "6".into())], b"<html>")).await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert_eq!(
        why,
        format!("registry {registry} sent an unusable answer for the manifest of app:1: not JSON")
    );
}

#[tokio::test]
async fn a_manifest_larger_than_the_bound_is_refused_before_it_is_read() {
    let (registry, ca) = canned(http(
        "200 OK",
        &[("content-length", (64 * 1024 * 1024).to_string())],
        b"{",
    ))
    .await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert_eq!(
        why,
        format!(
            "registry {registry} sent more than {} bytes for the manifest of app:1",
            moat_registry::limits::MAX_MANIFEST_BYTES
        )
    );
}

#[tokio::test]
async fn a_digest_header_that_does_not_match_the_bytes_is_a_denial() {
    let body = br#"{"schemaVersion":2}"#;
    let lie = moat_registry::Digest::of(b"something else").to_string();
    let (registry, ca) = canned(http(
        "200 OK",
        &[
            ("content-length", body.len().to_string()),
            ("docker-content-digest", lie),
        ],
        body,
    ))
    .await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert!(
        why.contains("Docker-Content-Digest header does not match"),
        "{why}"
    );
}

#[tokio::test]
async fn a_server_error_is_a_denial_with_its_status() {
    let (registry, ca) = canned(http(
        "503 Service Unavailable",
        &[("content-length", "0".into())],
        b"",
    ))
    .await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert_eq!(
        why,
        format!("registry {registry} answered HTTP 503 for the manifest of app:1")
    );
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_a_denial() {
    let (registry, _) = canned(http("200 OK", &[], b"")).await;
    let (other_ca, _) = tls();
    let why = check(&registry, &other_ca).await.unwrap_err();
    assert_eq!(
        why,
        format!("registry {registry}'s certificate is not trusted")
    );
}

/// Under `unmatched: pin` a tenant may name any host and read the denial: it says what kind of
/// failure it was, never the connection error or the names the peer's certificate holds.
#[tokio::test]
async fn a_denial_does_not_help_a_tenant_probe_the_network() {
    // A certificate for 127.0.0.1, reached as localhost: its names are not for the tenant.
    let (registry, ca) = canned(http("200 OK", &[], b"")).await;
    let port = registry.rsplit(':').next().unwrap();
    let misnamed = format!("localhost:{port}");
    let why = check(&misnamed, &ca).await.unwrap_err();
    assert_eq!(
        why,
        format!("registry {misnamed}'s certificate is not trusted")
    );
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let why = check(&closed, &ca).await.unwrap_err();
    assert_eq!(why, format!("registry {closed} is unreachable"));
    // Not TLS at all.
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = plain.accept().await {
            let _ = tcp.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        }
    });
    let why = check(&plain_addr, &ca).await.unwrap_err();
    assert_eq!(why, format!("registry {plain_addr} is unreachable"));
}

#[tokio::test]
async fn an_unknown_authentication_scheme_is_a_denial() {
    let (registry, ca) = canned(http(
        "401 Unauthorized",
        &[
            ("www-authenticate", "Negotiate".into()),
            ("content-length", "0".into()),
        ],
        b"",
    ))
    .await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert!(
        why.contains("authentication of a kind moat does not speak"),
        "{why}"
    );
}

#[tokio::test]
async fn a_token_service_that_is_not_https_gets_no_credentials() {
    let (registry, ca) = canned(http(
        "401 Unauthorized",
        &[
            (
                "www-authenticate",
                r#"Bearer realm="http://auth.invalid/token",service="reg""#.into(),
            ),
            ("content-length", "0".into()),
        ],
        b"",
    ))
    .await;
    let why = check(&registry, &ca).await.unwrap_err();
    assert!(why.contains("is not https"), "{why}");
}

#[tokio::test]
async fn a_bearer_token_is_got_with_the_login_and_reused_for_the_repository() {
    use base64::Engine as _;
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let login = base64::engine::general_purpose::STANDARD.encode("robot:s3cret");
    let basic = format!("authorization: Basic {login}");
    let tokens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = tokens.clone();
    let (registry, ca) = serve(move |head, own| {
        let head_lower = head.to_ascii_lowercase();
        if head.starts_with("GET /token?service=fake&scope=repository%3Ashop%2Fapi%3Apull ") {
            if !head_lower.contains(&basic.to_ascii_lowercase()) {
                return http("401 Unauthorized", &[("content-length", "0".into())], b"");
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = br#"{"token":"T0K3N","expires_in":300}"#;
            return http(
                "200 OK",
                &[("content-length", body.len().to_string())],
                body,
            );
        }
        if head_lower.contains("authorization: bearer t0k3n") {
            return http(
                "200 OK",
                &[("content-length", manifest.len().to_string())],
                manifest,
            );
        }
        let challenge = format!(
            r#"Bearer realm="https://{own}/token",service="fake",scope="repository:shop/api:pull""#
        );
        http(
            "401 Unauthorized",
            &[
                ("www-authenticate", challenge),
                ("content-length", "0".into()),
            ],
            b"",
        )
    })
    .await;
    let dir = std::env::temp_dir().join(format!("moat-bearer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let creds = dir.join("config.json");
    std::fs::write(
        &creds,
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{login}"}}}}}}"#),
    )
    .unwrap();
    let (trust, resolver) = resolver(&ca, &format!("credentialsFile: {}\n", creds.display()));
    for tag in ["1", "2", "3"] {
        let admitted = check_with(&resolver, &trust, &format!("{registry}/shop/api:{tag}"))
            .await
            .unwrap();
        assert_eq!(admitted.digest, moat_registry::Digest::of(manifest));
    }
    assert_eq!(
        tokens.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token for the repository"
    );
    assert_eq!(
        // No rule names this registry (`unmatched: pin`): its metrics say `other`.
        resolver
            .metrics()
            .calls("other", moat_registry::metrics::Call::token),
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A registry that accepts connections and never answers: its `host:port`.
async fn tarpit() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

/// `n` distinct references at `registry`, each with its parse.
fn distinct(registry: &str, n: usize) -> Vec<(String, ImageRef)> {
    (0..n)
        .map(|i| {
            let raw = format!("{registry}/app{i}:1");
            let parsed = raw.parse().unwrap();
            (raw, parsed)
        })
        .collect()
}

/// One review of one image in `namespace`, given `within`: the answer and how long it took.
async fn review(
    resolver: &Resolver,
    trust: &ImageTrust,
    namespace: &str,
    (raw, parsed): &(String, ImageRef),
    within: Duration,
) -> (Result<moat_registry::Admitted, String>, Duration) {
    let started = Instant::now();
    let mut out = resolver
        .check(
            trust,
            namespace,
            &[Image { raw, parsed }],
            Instant::now() + within,
        )
        .await;
    (out.remove(0), started.elapsed())
}

/// A tenant whose images come from a registry that never answers (its own, under
/// `unmatched: pin`) holds at most `MAX_WAITING_REVIEWS_PER_NAMESPACE` reviews waiting: the
/// next is denied at once with the reason, another namespace's reviews still reach their
/// registries, and once the waits end the tenant may try again.
#[tokio::test]
async fn one_namespace_cannot_hold_more_than_its_share_of_reviews_on_slow_registries() {
    use moat_registry::limits::MAX_WAITING_REVIEWS_PER_NAMESPACE;
    let slow = tarpit().await;
    let (fast, ca) = canned(http(
        "404 Not Found",
        &[("content-length", "0".into())],
        b"",
    ))
    .await;
    let (trust, resolver) = resolver(&ca, "");
    let images = distinct(&slow, MAX_WAITING_REVIEWS_PER_NAMESPACE + 1);
    let raw = format!("{fast}/shop/api:1");
    let shop = (raw.clone(), raw.parse::<ImageRef>().unwrap());
    let review = |namespace, image, within| review(&resolver, &trust, namespace, image, within);
    let (held, (refused, other)) = tokio::join!(
        futures_util::future::join_all(
            images[..MAX_WAITING_REVIEWS_PER_NAMESPACE]
                .iter()
                .map(|image| review("evil", image, Duration::from_secs(2)))
        ),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let refused = review(
                "evil",
                &images[MAX_WAITING_REVIEWS_PER_NAMESPACE],
                Duration::from_secs(2),
            )
            .await;
            let other = review("shop", &shop, Duration::from_secs(2)).await;
            (refused, other)
        }
    );
    for (answer, took) in &held {
        let why = answer.as_ref().unwrap_err();
        assert!(why.contains("did not answer"), "{why}");
        assert!(*took >= Duration::from_millis(1900), "{took:?}");
    }
    let (answer, took) = refused;
    let why = answer.unwrap_err();
    assert!(
        why.contains(&format!(
            "{MAX_WAITING_REVIEWS_PER_NAMESPACE} reviews of namespace evil are already waiting on registries"
        )),
        "{why}"
    );
    assert!(
        took < Duration::from_millis(500),
        "denied at once: {took:?}"
    );
    let (answer, _) = other;
    let why = answer.unwrap_err();
    assert!(
        !why.contains("already waiting"),
        "another namespace is not held: {why}"
    );
    assert!(why.contains(&fast), "{why}");

    // The waits are over: the tenant's next review is looked up again.
    let (answer, _) = review("evil", &images[0], Duration::from_millis(300)).await;
    let why = answer.unwrap_err();
    assert!(!why.contains("already waiting"), "{why}");
}

/// A review naming more distinct images than `MAX_IMAGES_PER_REVIEW` is refused whole, at once,
/// without a registry call (each lookup would be a future held until the deadline).
#[tokio::test]
async fn a_review_of_too_many_images_is_refused_without_a_registry_call() {
    use moat_registry::limits::MAX_IMAGES_PER_REVIEW;
    let slow = tarpit().await;
    let (_, ca) = canned(Vec::new()).await;
    let (trust, resolver) = resolver(&ca, "");
    let images = distinct(&slow, MAX_IMAGES_PER_REVIEW + 1);
    let asked: Vec<Image<'_>> = images
        .iter()
        .map(|(raw, parsed)| Image { raw, parsed })
        .collect();
    let started = Instant::now();
    let answers = resolver
        .check(
            &trust,
            "tenant",
            &asked,
            Instant::now() + Duration::from_secs(2),
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answers.len(), asked.len());
    for answer in answers {
        let why = answer.unwrap_err();
        assert!(
            why.contains(&format!(
                "names {} distinct images, more than the {MAX_IMAGES_PER_REVIEW}",
                MAX_IMAGES_PER_REVIEW + 1
            )),
            "{why}"
        );
    }
    // One fewer is looked up (and waits on the registry that never answers).
    let answers = resolver
        .check(
            &trust,
            "tenant",
            &asked[..MAX_IMAGES_PER_REVIEW],
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert!(answers[0].as_ref().unwrap_err().contains("did not answer"));
}

/// A keep-alive registry answering 404 to everything: its `host:port`, the CA to trust, and
/// how many connections are open to it.
async fn keep_alive() -> (String, String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (ca, acceptor) = tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let open = Arc::new(AtomicUsize::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, open) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                open.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    'requests: loop {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => break 'requests,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        head.clear();
                        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                        if tls.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, ca, open)
}

/// Connections to a registry a rule names are kept for the next lookup; those to registries
/// tenants name (`unmatched: pin`) close after each call, so tenants naming many hosts cannot
/// make moat hold a pool of idle connections per host.
#[tokio::test]
async fn idle_connections_are_kept_only_for_registries_a_rule_names() {
    use std::sync::atomic::Ordering;
    let (named, ca, named_open) = keep_alive().await;
    let (other, other_ca, other_open) = keep_alive().await;
    let (trust, resolver) = resolver(
        &format!("{ca}{other_ca}"),
        &format!("rules:\n  - repositories: [\"{named}\"]\n    signatures: \"off\"\n"),
    );
    for registry in [&named, &other] {
        let why = check_with(&resolver, &trust, &format!("{registry}/app:1"))
            .await
            .unwrap_err();
        assert!(why.contains("has no tag"), "{why}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while other_open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        other_open.load(Ordering::SeqCst),
        0,
        "closed after the call"
    );
    assert_eq!(
        named_open.load(Ordering::SeqCst),
        1,
        "kept for the next lookup"
    );
}

/// The path of a request head's request line (`GET /v2/… HTTP/1.1`).
fn request_path(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("")
}

fn not_found() -> Vec<u8> {
    http("404 Not Found", &[("content-length", "0".into())], b"")
}

fn ok_body(body: &[u8]) -> Vec<u8> {
    http(
        "200 OK",
        &[
            ("content-length", body.len().to_string()),
            (
                "docker-content-digest",
                moat_registry::Digest::of(body).to_string(),
            ),
        ],
        body,
    )
}

/// A P-256 key pair as cosign makes one: the signer and the public key's PEM.
fn cosign_key() -> (ring::signature::EcdsaKeyPair, String) {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(pair.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    (
        pair,
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n"),
    )
}

/// What a registry serves for `repository` (`shop/api`) at `registry`: `tags` distinct images,
/// tagged `fresh-<i>`, each signed by `key` as `cosign sign` stores it (manifest, `.sig`
/// manifest, payload blob), by request path.
fn signed_images(
    registry: &str,
    repository: &str,
    tags: usize,
    key: &ring::signature::EcdsaKeyPair,
) -> std::collections::HashMap<String, Vec<u8>> {
    use base64::Engine as _;
    let rng = ring::rand::SystemRandom::new();
    let mut paths = std::collections::HashMap::new();
    for i in 0..tags {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{:064x}","size":2}},"layers":[]}}"#,
            i + 1
        );
        let digest = moat_registry::Digest::of(manifest.as_bytes());
        let payload = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{registry}/{repository}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let signature = key.sign(&rng, payload.as_bytes()).unwrap();
        let payload_digest = moat_registry::Digest::of(payload.as_bytes());
        let sig_manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"{payload_digest}","size":{},"annotations":{{"dev.cosignproject.cosign/signature":"{}"}}}}]}}"#,
            payload.len(),
            base64::engine::general_purpose::STANDARD.encode(signature.as_ref())
        );
        let base = format!("/v2/{repository}");
        paths.insert(format!("{base}/manifests/fresh-{i}"), manifest.into_bytes());
        paths.insert(
            format!("{base}/manifests/{}", digest.signature_tag()),
            sig_manifest.into_bytes(),
        );
        paths.insert(
            format!("{base}/blobs/{payload_digest}"),
            payload.into_bytes(),
        );
    }
    paths
}

/// Issue #30's worst tenant: one namespace keeps 8 reviews of 256 tags that do not exist (new
/// ones each round, so no answer is cached) waiting at the registry another namespace's signed
/// images come from, which answers every call after 20 ms. Before, its 2,048 lookups queued
/// first come, first served behind the registry's 16 call slots, and another namespace's fresh
/// signed tag was denied 5 times in 5 ("did not answer within 2000 ms"). Now the tenant has
/// at most 64 lookups waiting and half the slots, the slots go to namespaces in turn, and the
/// other namespace's fresh tag is answered inside its registry budget every time; a cached one
/// at once, with no registry call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_flooding_missing_tags_does_not_starve_another_namespaces_signed_tags() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const FRESH: usize = 5;
    let (signer, public_key) = cosign_key();
    let content = Arc::new(std::sync::OnceLock::new());
    let (registry, ca) = serve_after(Duration::from_millis(20), {
        let content = content.clone();
        move |head, own| {
            let paths = content.get_or_init(|| signed_images(own, "shop/api", FRESH, &signer));
            match paths.get(request_path(head)) {
                Some(body) => ok_body(body),
                None => not_found(),
            }
        }
    })
    .await;
    let extra = format!(
        "rules:\n  - repositories: [{registry}/shop]\n    keys:\n      - name: release\n        publicKey: |\n{}  - repositories: [{registry}]\n    signatures: off\n",
        public_key
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect::<String>()
    );
    let (trust, resolver) = resolver(&ca, &extra);
    let (trust, resolver) = (Arc::new(trust), Arc::new(resolver));
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for review_no in 0..8 {
        let (trust, resolver, stop, registry) = (
            trust.clone(),
            resolver.clone(),
            stop.clone(),
            registry.clone(),
        );
        flood.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::SeqCst) {
                let images: Vec<(String, ImageRef)> = (0..256)
                    .map(|i| {
                        let raw = format!("{registry}/junk/x:miss-{review_no}-{round}-{i}");
                        let parsed = raw.parse().unwrap();
                        (raw, parsed)
                    })
                    .collect();
                let asked: Vec<Image<'_>> = images
                    .iter()
                    .map(|(raw, parsed)| Image { raw, parsed })
                    .collect();
                let deadline = Instant::now() + Duration::from_secs(2);
                let answers = resolver.check(&trust, "evil", &asked, deadline).await;
                assert!(answers.iter().all(Result::is_err));
                round += 1;
                // A review refused at once returns without a wait; the API server in front
                // sends the next after a round trip.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            round
        }));
    }
    // Let the flood fill its budget and the slots.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let budget = Duration::from_secs(2);
    let mut took = Vec::new();
    for i in 0..FRESH {
        let raw = format!("{registry}/shop/api:fresh-{i}");
        let image = (raw.clone(), raw.parse::<ImageRef>().unwrap());
        let (answer, elapsed) = review(&resolver, &trust, "shop", &image, budget).await;
        let admitted = answer.unwrap_or_else(|why| panic!("fresh-{i} under the flood: {why}"));
        assert_eq!(admitted.signed_by.as_deref(), Some("release"));
        took.push(elapsed);
    }
    // The same image again: from the cache, no registry call.
    let raw = format!("{registry}/shop/api:fresh-0");
    let image = (raw.clone(), raw.parse::<ImageRef>().unwrap());
    let requests = resolver.metrics().requests(&registry);
    let (answer, cached) = review(&resolver, &trust, "shop", &image, budget).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(resolver.metrics().requests(&registry), requests);
    stop.store(true, Ordering::SeqCst);
    let mut rounds = 0;
    for f in flood {
        rounds += f.await.unwrap();
    }
    let busy = resolver.metrics().failures(
        &registry,
        moat_registry::error::FailureReason::namespace_busy,
    );
    assert!(busy > 0, "the flood was held to its budget");
    eprintln!(
        "figure: fresh signed tag under the flood answered in {:?} (max {:?}); cached in {cached:?}; \
         flood: {rounds} rounds of 8x256 lookups, {busy} refused for the namespace budget",
        took,
        took.iter().max().unwrap()
    );
}

/// A tag that does not exist is asked once, then answered from the cache for
/// `FAILURE_TTL`; refused credentials are asked again every time (a reload may fix them).
#[tokio::test]
async fn a_missing_tag_is_asked_once_within_the_failure_ttl_and_a_refusal_every_time() {
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (registry, ca) = serve({
        let requests = requests.clone();
        move |head, _| {
            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if request_path(head).starts_with("/v2/locked/") {
                http(
                    "401 Unauthorized",
                    &[
                        ("www-authenticate", r#"Basic realm="r""#.into()),
                        ("content-length", "0".into()),
                    ],
                    b"",
                )
            } else {
                not_found()
            }
        }
    })
    .await;
    let (trust, resolver) = resolver(&ca, "");
    let count = || requests.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        let why = check_with(&resolver, &trust, &format!("{registry}/app:missing"))
            .await
            .unwrap_err();
        assert_eq!(
            why,
            format!("registry {registry} has no tag 'missing' in app")
        );
    }
    assert_eq!(count(), 1, "one call for three lookups of a missing tag");
    for n in 1..=3 {
        let why = check_with(&resolver, &trust, &format!("{registry}/locked/app:1"))
            .await
            .unwrap_err();
        assert!(why.contains("refused access"), "{why}");
        assert_eq!(count(), 1 + n, "a refusal is not cached");
    }
}

/// Issue #30's cache flush: references that need no registry call (a digest under `pin`)
/// leave no entry, and a namespace whose lookups do call fills at most its share, so another
/// namespace's entry stays warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_cannot_flush_another_namespaces_cache_entries() {
    use moat_registry::limits::{CACHE_SHARE_DIVISOR, MAX_CACHE_ENTRIES};
    let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (registry, ca) = serve({
        let requests = requests.clone();
        move |_, _| {
            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ok_body(manifest)
        }
    })
    .await;
    let (trust, resolver) = resolver(
        &ca,
        &format!("rules: [{{repositories: [{registry}], signatures: off}}]\n"),
    );
    let quiet = format!("{registry}/quiet/app:1");
    check_with(&resolver, &trust, &quiet).await.unwrap();
    let before = resolver.cache_size().0;
    // No call, no entry: 1,000 digests at a registry that does not even listen.
    let digests: Vec<(String, ImageRef)> = (0..1000)
        .map(|i| {
            let raw = format!("127.0.0.1:9/x@sha256:{i:064x}");
            let parsed = raw.parse().unwrap();
            (raw, parsed)
        })
        .collect();
    for chunk in digests.chunks(200) {
        let asked: Vec<Image<'_>> = chunk
            .iter()
            .map(|(raw, parsed)| Image { raw, parsed })
            .collect();
        let answers = resolver
            .check(
                &trust,
                "evil",
                &asked,
                Instant::now() + Duration::from_secs(5),
            )
            .await;
        assert!(answers.iter().all(Result::is_ok));
    }
    assert_eq!(
        resolver.cache_size().0,
        before,
        "no registry call, no cache entry"
    );
    // Lookups that call: the namespace's share at most.
    let share = MAX_CACHE_ENTRIES / CACHE_SHARE_DIVISOR;
    for round in 0..24 {
        let images: Vec<(String, ImageRef)> = (0..64)
            .map(|i| {
                let raw = format!("{registry}/flood/app:{round}-{i}");
                let parsed = raw.parse().unwrap();
                (raw, parsed)
            })
            .collect();
        let asked: Vec<Image<'_>> = images
            .iter()
            .map(|(raw, parsed)| Image { raw, parsed })
            .collect();
        let answers = resolver
            .check(
                &trust,
                "evil",
                &asked,
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        assert!(
            answers.iter().all(Result::is_ok),
            "{:?}",
            answers.iter().find(|a| a.is_err())
        );
        assert!(resolver.cache_share("evil").0 <= share);
    }
    // 1,536 images, two entries each: over the share, which held.
    assert!(
        resolver.cache_share("evil").0 > share - 4,
        "{:?}",
        resolver.cache_share("evil")
    );
    let calls = requests.load(std::sync::atomic::Ordering::SeqCst);
    check_with(&resolver, &trust, &quiet).await.unwrap();
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::SeqCst),
        calls,
        "the quiet namespace's entry is still warm"
    );
}
