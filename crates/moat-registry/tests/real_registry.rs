//! moat's resolver against real registries (distribution, as Debian's docker-registry), images
//! pushed with skopeo and signed with cosign. `scripts/test.sh` installs them, starts the
//! registries (`scripts/start-test-registry.sh`) and runs these with `--ignored`; without the
//! registries each test fails, naming what is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use moat_core::image::ImageRef;
use moat_core::trust::ImageTrust;
use moat_registry::metrics::{CacheKind, Call};
use moat_registry::{Image, Resolver};
use prometheus_client::registry::Registry;

/// The deadline the tests give a review: the server's budget.
const BUDGET: Duration = Duration::from_secs(2);
const COSIGN_PASSWORD: &str = "moat-test";

struct Env {
    registry: String,
    auth_registry: String,
    user: String,
    password: String,
    ca: String,
    cert_dir: String,
}

fn env() -> Env {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run scripts/start-test-registry.sh and source its env file")
        })
    };
    Env {
        registry: var("MOAT_TEST_REGISTRY"),
        auth_registry: var("MOAT_TEST_REGISTRY_AUTH"),
        user: var("MOAT_TEST_REGISTRY_USER"),
        password: var("MOAT_TEST_REGISTRY_PASSWORD"),
        ca: std::fs::read_to_string(var("MOAT_TEST_REGISTRY_CA")).unwrap(),
        cert_dir: var("MOAT_TEST_REGISTRY_CERT_DIR"),
    }
}

/// A directory of the test's own, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moat-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    moat_registry::Digest::of(bytes).hex().to_owned()
}

/// An OCI layout at `dir` holding one image tagged `v`, distinct per `variant` (a label in its
/// configuration), with one empty layer.
fn write_layout(dir: &Path, variant: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    // 1,024 zero bytes: an empty tar archive.
    let (layer, layer_len) = put(&[0u8; 1024]);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
        "config": {"Labels": {"moat.test/variant": variant}},
    });
    let (config, config_len) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_len}],
    });
    let (manifest, manifest_len) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
                       "size": manifest_len, "annotations": {"org.opencontainers.image.ref.name": "v"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The skopeo command that pushes `variant` to `dest` (`host:port/repo:tag`); its digest lands
/// in `digest_file`.
fn push_command(
    env: &Env,
    scratch: &Scratch,
    variant: &str,
    dest: &str,
    login: Option<(&str, &str)>,
) -> (Command, PathBuf) {
    let layout = scratch.path(&format!("layout-{variant}"));
    write_layout(&layout, variant);
    let digest_file = scratch.path(&format!("digest-{variant}"));
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--quiet",
        "--dest-cert-dir",
        &env.cert_dir,
        "--digestfile",
    ])
    .arg(&digest_file);
    if let Some((u, p)) = login {
        cmd.args(["--dest-creds", &format!("{u}:{p}")]);
    }
    cmd.arg(format!("oci:{}:v", layout.display()))
        .arg(format!("docker://{dest}"));
    (cmd, digest_file)
}

/// Pushes `variant` to `dest`; the digest the registry serves for it.
fn push(env: &Env, scratch: &Scratch, variant: &str, dest: &str) -> String {
    push_with(env, scratch, variant, dest, None)
}

fn push_with(
    env: &Env,
    scratch: &Scratch,
    variant: &str,
    dest: &str,
    login: Option<(&str, &str)>,
) -> String {
    let (mut cmd, digest_file) = push_command(env, scratch, variant, dest, login);
    run(&mut cmd);
    std::fs::read_to_string(digest_file)
        .unwrap()
        .trim()
        .to_owned()
}

/// `cosign generate-key-pair` in `dir/name`: the private key's path and the public key's PEM.
fn key_pair(scratch: &Scratch, name: &str) -> (PathBuf, String) {
    let dir = scratch.path(&format!("key-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("cosign")
        .arg("generate-key-pair")
        .current_dir(&dir)
        .env("COSIGN_PASSWORD", COSIGN_PASSWORD));
    let public = std::fs::read_to_string(dir.join("cosign.pub")).unwrap();
    (dir.join("cosign.key"), public)
}

/// `cosign sign --key` without a transparency log upload (nothing outside is reachable).
fn sign(env: &Env, scratch: &Scratch, key: &Path, reference: &str) {
    let ca = scratch.path("ca.pem");
    std::fs::write(&ca, &env.ca).unwrap();
    let docker_config = scratch.path("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = base64_encode(format!("{}:{}", env.user, env.password).as_bytes());
    std::fs::write(
        docker_config.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            env.auth_registry
        ),
    )
    .unwrap();
    run(Command::new("cosign")
        .args(["sign", "--tlog-upload=false", "--yes", "--key"])
        .arg(key)
        .arg(reference)
        .env("COSIGN_PASSWORD", COSIGN_PASSWORD)
        .env("SSL_CERT_FILE", &ca)
        .env("DOCKER_CONFIG", &docker_config));
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn indent(pem: &str, by: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}

/// A trust section for `repos` with the test CA, `signatures: required` by `keys` (name, PEM),
/// or `off` when `keys` is empty.
fn trust(env: &Env, repos: &[&str], keys: &[(&str, &str)], extra: &str) -> ImageTrust {
    let mut yaml = format!("caCertificates: |\n{}", indent(&env.ca, 2));
    yaml.push_str(extra);
    yaml.push_str("rules:\n");
    yaml.push_str(&format!("  - repositories: {repos:?}\n"));
    if keys.is_empty() {
        yaml.push_str("    signatures: off\n");
    } else {
        yaml.push_str("    keys:\n");
        for (name, pem) in keys {
            yaml.push_str(&format!("      - name: {name}\n        publicKey: |\n"));
            yaml.push_str(&indent(pem, 10));
        }
    }
    let t: ImageTrust = serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    t.check("images.trust").unwrap();
    t
}

async fn check_one(
    resolver: &Resolver,
    trust: &ImageTrust,
    raw: &str,
) -> Result<moat_registry::Admitted, String> {
    let parsed: ImageRef = raw.parse().unwrap();
    let started = Instant::now();
    let mut out = resolver
        .check(
            trust,
            "tenant",
            &[Image {
                raw,
                parsed: &parsed,
            }],
            Instant::now() + BUDGET,
        )
        .await;
    eprintln!("{raw}: {:?} in {:?}", out[0], started.elapsed());
    out.remove(0)
}

fn resolver(trust: &ImageTrust) -> Resolver {
    Resolver::new(trust, &mut Registry::default()).unwrap()
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_unsigned_image_is_denied() {
    let env = env();
    let scratch = Scratch::new("unsigned");
    let (_, public) = key_pair(&scratch, "release");
    let image = format!("{}/unsigned/app:1", env.registry);
    push(&env, &scratch, "unsigned", &image);
    let trust = trust(&env, &[&env.registry], &[("release", &public)], "");
    let why = check_one(&resolver(&trust), &trust, &image)
        .await
        .unwrap_err();
    assert!(why.contains("is not signed"), "{why}");
    assert!(why.contains(&env.registry), "{why}");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_image_signed_by_a_trusted_key_is_admitted_pinned_to_the_digest_served() {
    let env = env();
    let scratch = Scratch::new("trusted");
    let (key, public) = key_pair(&scratch, "release");
    let image = format!("{}/trusted/app:1.4", env.registry);
    let digest = push(&env, &scratch, "trusted", &image);
    sign(
        &env,
        &scratch,
        &key,
        &format!("{}/trusted/app@{digest}", env.registry),
    );
    let trust = trust(&env, &[&env.registry], &[("release", &public)], "");
    let admitted = check_one(&resolver(&trust), &trust, &image).await.unwrap();
    assert_eq!(admitted.digest.to_string(), digest);
    assert_eq!(admitted.pinned, format!("{image}@{digest}"));
    assert_eq!(admitted.signed_by.as_deref(), Some("release"));
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_image_signed_by_another_key_is_denied() {
    let env = env();
    let scratch = Scratch::new("other-key");
    let (_, trusted) = key_pair(&scratch, "release");
    let (other, _) = key_pair(&scratch, "intruder");
    let image = format!("{}/other-key/app:1", env.registry);
    let digest = push(&env, &scratch, "other-key", &image);
    sign(
        &env,
        &scratch,
        &other,
        &format!("{}/other-key/app@{digest}", env.registry),
    );
    let trust = trust(&env, &[&env.registry], &[("release", &trusted)], "");
    let why = check_one(&resolver(&trust), &trust, &image)
        .await
        .unwrap_err();
    assert!(why.contains("none by a trusted key (release)"), "{why}");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_signature_over_another_digest_is_denied() {
    let env = env();
    let scratch = Scratch::new("replay");
    let (key, public) = key_pair(&scratch, "release");
    let repo = format!("{}/replay/app", env.registry);
    let signed = push(&env, &scratch, "replay-signed", &format!("{repo}:good"));
    let target = push(&env, &scratch, "replay-target", &format!("{repo}:bad"));
    sign(&env, &scratch, &key, &format!("{repo}@{signed}"));
    // The good image's signature, copied to where the bad image's would be.
    let tag = |d: &str| format!("{}.sig", d.replace(':', "-"));
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-cert-dir",
        &env.cert_dir,
        "--dest-cert-dir",
        &env.cert_dir,
        &format!("docker://{repo}:{}", tag(&signed)),
        &format!("docker://{repo}:{}", tag(&target)),
    ]));
    let trust = trust(&env, &[&env.registry], &[("release", &public)], "");
    let why = check_one(&resolver(&trust), &trust, &format!("{repo}:bad"))
        .await
        .unwrap_err();
    assert!(
        why.contains("does not cover it: it signs another digest"),
        "{why}"
    );
    assert!(why.contains(&signed), "{why}");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_moved_tag_reaches_new_pods_and_the_admitted_pod_keeps_its_digest() {
    let env = env();
    let scratch = Scratch::new("moved");
    let (key, public) = key_pair(&scratch, "release");
    let repo = format!("{}/moved/app", env.registry);
    let image = format!("{repo}:1");
    let first = push(&env, &scratch, "moved-1", &image);
    sign(&env, &scratch, &key, &format!("{repo}@{first}"));
    // tagTtlSeconds 0: every new pod sees the tag as it is now.
    let trust = trust(
        &env,
        &[&env.registry],
        &[("release", &public)],
        "tagTtlSeconds: 0\n",
    );
    let resolver = resolver(&trust);
    let admitted = check_one(&resolver, &trust, &image).await.unwrap();
    assert_eq!(admitted.digest.to_string(), first);

    let second = push(&env, &scratch, "moved-2", &image);
    assert_ne!(first, second);
    sign(&env, &scratch, &key, &format!("{repo}@{second}"));
    let new_pod = check_one(&resolver, &trust, &image).await.unwrap();
    assert_eq!(new_pod.digest.to_string(), second);

    // The pod admitted first names its digest (as the reinvoked webhook and /validate see it):
    // not resolved again, still verified, still the old digest.
    let manifests = resolver.metrics().calls(&env.registry, Call::manifest);
    let again = check_one(&resolver, &trust, &admitted.pinned)
        .await
        .unwrap();
    assert_eq!(again.digest.to_string(), first);
    assert_eq!(again.pinned, admitted.pinned);
    assert_eq!(
        resolver.metrics().calls(&env.registry, Call::manifest),
        manifests
    );
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_stopped_registry_is_a_denial_naming_it() {
    let env = env();
    // A port nothing listens on: the registry is down.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = format!("127.0.0.1:{port}");
    let trust = trust(&env, &[&registry], &[], "");
    let why = check_one(&resolver(&trust), &trust, &format!("{registry}/app:1"))
        .await
        .unwrap_err();
    assert!(
        why.contains(&format!("registry {registry} is unreachable")),
        "{why}"
    );
    assert!(why.to_lowercase().contains("refused"), "{why}");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_registry_that_never_answers_is_a_denial_at_the_deadline() {
    let env = env();
    // Accepts connections and never says a word (not even the TLS handshake).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let registry = listener.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(4) {
            held.push(conn);
        }
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let trust = trust(&env, &[&registry], &[], "");
    let why = check_one(&resolver(&trust), &trust, &format!("{registry}/app:1"))
        .await
        .unwrap_err();
    // The deadline is the review's (the message rounds what was left of it to the ms).
    assert!(
        why.starts_with(&format!("registry {registry} did not answer within ")),
        "{why}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn two_hundred_images_in_concurrent_reviews_are_each_resolved_once() {
    const IMAGES: usize = 200;
    const REVIEWS: usize = 8;
    let env = env();
    let scratch = Scratch::new("many");
    let mut expected = Vec::new();
    // Twenty repositories of ten tags, each a distinct image, pushed eight at a time.
    for chunk in (0..IMAGES).collect::<Vec<_>>().chunks(8) {
        let running: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let variant = format!("many-{i}");
                let dest = format!("{}/many/app{}:t{i}", env.registry, i % 20);
                let (mut cmd, digest_file) = push_command(&env, &scratch, &variant, &dest, None);
                (i, dest, cmd.spawn().unwrap(), digest_file)
            })
            .collect();
        for (i, dest, mut child, digest_file) in running {
            assert!(child.wait().unwrap().success(), "push {i}");
            expected.push((dest, std::fs::read_to_string(digest_file).unwrap()));
        }
    }
    let trust = trust(&env, &[&env.registry], &[], "");
    let resolver = std::sync::Arc::new(resolver(&trust));
    let parsed: Vec<ImageRef> = expected.iter().map(|(r, _)| r.parse().unwrap()).collect();
    let started = Instant::now();
    let mut reviews = Vec::new();
    for n in 0..REVIEWS {
        let (resolver, trust, expected, parsed) = (
            resolver.clone(),
            trust.clone(),
            expected.clone(),
            parsed.clone(),
        );
        reviews.push(tokio::spawn(async move {
            // Each review names every image, in an order of its own.
            let mut order: Vec<usize> = (0..IMAGES).collect();
            order.rotate_left(n * IMAGES / REVIEWS);
            let images: Vec<Image<'_>> = order
                .iter()
                .map(|&i| Image {
                    raw: &expected[i].0,
                    parsed: &parsed[i],
                })
                .collect();
            let answers = resolver
                .check(
                    &trust,
                    "tenant",
                    &images,
                    Instant::now() + Duration::from_secs(20),
                )
                .await;
            for (&i, answer) in order.iter().zip(answers) {
                let admitted = answer.unwrap_or_else(|e| panic!("{}: {e}", expected[i].0));
                assert_eq!(admitted.digest.to_string(), expected[i].1.trim());
            }
        }));
    }
    for r in reviews {
        r.await.unwrap();
    }
    let m = resolver.metrics();
    println!(
        "{REVIEWS} concurrent reviews of {IMAGES} distinct images, cold: {:?}; manifest calls {}, cache hits {}, misses {}",
        started.elapsed(),
        m.calls(&env.registry, Call::manifest),
        m.hits(CacheKind::tag),
        m.misses(CacheKind::tag),
    );
    assert_eq!(m.calls(&env.registry, Call::manifest), IMAGES as u64);
    let digests: std::collections::HashSet<_> = expected.iter().map(|(_, d)| d).collect();
    assert_eq!(digests.len(), IMAGES, "the images are distinct");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn rotated_credentials_are_used_without_a_restart() {
    let env = env();
    let scratch = Scratch::new("rotated");
    let (key, public) = key_pair(&scratch, "release");
    let login = Some((env.user.as_str(), env.password.as_str()));
    let repo = format!("{}/rotated/app", env.auth_registry);
    let digest = push_with(&env, &scratch, "rotated", &format!("{repo}:1"), login);
    sign(&env, &scratch, &key, &format!("{repo}@{digest}"));

    let creds = scratch.path("dockerconfigjson");
    let write_creds = |password: &str| {
        // Written beside and renamed into place, as the kubelet updates a Secret volume.
        let next = scratch.path("dockerconfigjson.next");
        let auth = base64_encode(format!("{}:{password}", env.user).as_bytes());
        std::fs::write(
            &next,
            format!(
                r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
                env.auth_registry
            ),
        )
        .unwrap();
        std::fs::rename(&next, &creds).unwrap();
    };
    write_creds("an-old-password");
    let extra = format!("credentialsFile: {}\n", creds.display());
    let trust = trust(&env, &[&env.auth_registry], &[("release", &public)], &extra);
    let resolver = resolver(&trust);
    let why = check_one(&resolver, &trust, &format!("{repo}:1"))
        .await
        .unwrap_err();
    assert!(
        why.contains("the configured credentials were refused"),
        "{why}"
    );
    assert!(!why.contains("an-old-password"), "{why}");

    write_creds(&env.password);
    let admitted = check_one(&resolver, &trust, &format!("{repo}:1"))
        .await
        .unwrap();
    assert_eq!(admitted.digest.to_string(), digest);
    assert_eq!(admitted.signed_by.as_deref(), Some("release"));
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_registry_asking_for_credentials_moat_lacks_is_a_denial_saying_so() {
    let env = env();
    let trust = trust(&env, &[&env.auth_registry], &[], "");
    let image = format!("{}/nobody/app:1", env.auth_registry);
    let why = check_one(&resolver(&trust), &trust, &image)
        .await
        .unwrap_err();
    assert!(
        why.contains("asks for credentials and the credentials file has none for it"),
        "{why}"
    );
}
