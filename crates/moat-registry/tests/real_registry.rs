//! moat's resolver against real registries (distribution, as Debian's docker-registry), images
//! pushed with skopeo and signed with cosign. `scripts/test.sh` installs them, starts the
//! registries (`scripts/start-test-registry.sh`) and runs these with `--ignored`; without the
//! registries each test fails, naming what is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use moat_core::image::ImageRef;
use moat_core::trust::ImageTrust;
use moat_registry::metrics::{CacheKind, Call};
use moat_registry::{Image, Resolver};
use prometheus_client::registry::Registry;
use support::{
    Env, Scratch, base64_encode, indent, key_pair, push, push_command, push_with, run, sign,
};

/// The deadline the tests give a review: the server's budget.
const BUDGET: Duration = Duration::from_secs(2);

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
    let env = support::env();
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
    let env = support::env();
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
    let resolver = resolver(&trust);
    let admitted = check_one(&resolver, &trust, &image).await.unwrap();
    assert_eq!(admitted.digest.to_string(), digest);
    assert_eq!(admitted.pinned, format!("{image}@{digest}"));
    assert_eq!(admitted.signed_by.as_deref(), Some("release"));
    // The next review of the image is one cache lookup: no registry call.
    let calls = |c| resolver.metrics().calls(&env.registry, c);
    let before = [Call::manifest, Call::signatures, Call::payload].map(calls);
    assert_eq!(
        check_one(&resolver, &trust, &image).await.unwrap(),
        admitted
    );
    assert_eq!(
        [Call::manifest, Call::signatures, Call::payload].map(calls),
        before
    );
    assert_eq!(resolver.metrics().hits(CacheKind::image), 1);
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_image_signed_by_another_key_is_denied() {
    let env = support::env();
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
    let env = support::env();
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
    let env = support::env();
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
    let env = support::env();
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
    // The kind of failure; the connection error itself is for the log, not the tenant.
    assert_eq!(why, format!("registry {registry} is unreachable"));
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_registry_that_never_answers_is_a_denial_at_the_deadline() {
    let env = support::env();
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
    use moat_registry::limits::MAX_WAITING_LOOKUPS_PER_NAMESPACE as PER_REVIEW;
    const IMAGES: usize = 200;
    const REVIEWS: usize = 8;
    let env = support::env();
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
            // Each review, in a namespace of its own, names as many images as one namespace
            // may look up at once, overlapping the next review's: together, every image.
            let mut order: Vec<usize> = (0..IMAGES).collect();
            order.rotate_left(n * IMAGES / REVIEWS);
            order.truncate(PER_REVIEW);
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
                    &format!("tenant-{n}"),
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
    let env = support::env();
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
    let env = support::env();
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

/// A TCP proxy to `upstream` that holds every chunk `one_way` before passing it on, either
/// way: a registry `2 × one_way` of round trip away, as one in another zone or region is.
async fn distant(upstream: String, one_way: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        one_way: Duration,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    tokio::time::sleep(one_way).await;
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, one_way));
            tokio::spawn(pipe(sr, cw, one_way));
        }
    });
    addr
}

/// Prints the figure docs/server.md quotes: a cold review of a pod with N distinct signed
/// images, each a TLS handshake, a tag lookup, a signature manifest and a payload, against a
/// registry 20 ms of round trip away, costs about what one image costs, not N times it.
/// Asserts only the calls made, never a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_cold_review_of_many_images_costs_about_one_images_round_trips() {
    let env = support::env();
    let scratch = Scratch::new("cold");
    let (key, public) = key_pair(&scratch, "release");
    let mut images = Vec::new();
    for i in 0..16 {
        let repo = format!("{}/cold{}/app{i}", env.registry, std::process::id());
        let digest = push(&env, &scratch, &format!("cold-{i}"), &format!("{repo}:1"));
        sign(&env, &scratch, &key, &format!("{repo}@{digest}"));
        images.push(format!("{repo}:1"));
    }
    // The images as seen through the distant path; their signatures name the registry's own
    // address, so the repository check is off for this figure.
    const ONE_WAY: Duration = Duration::from_millis(10);
    let far = distant(env.registry.clone(), ONE_WAY).await;
    let images: Vec<String> = images
        .iter()
        .map(|i| i.replace(&env.registry, &far))
        .collect();
    let mut trust = trust(&env, &[&far], &[("release", &public)], "");
    trust.rules[0].require_same_repository = false;
    let mut lines = vec![format!(
        "registry round trip {} ms (a proxy holds each chunk {} ms each way)",
        2 * ONE_WAY.as_millis(),
        ONE_WAY.as_millis()
    )];
    for n in [1usize, 4, 16] {
        // A fresh resolver per run: cold cache, cold connections (each run's first call
        // pays the TLS handshake, as a cold review does).
        let resolver = resolver(&trust);
        let parsed: Vec<ImageRef> = images[..n].iter().map(|r| r.parse().unwrap()).collect();
        let asked: Vec<Image<'_>> = images[..n]
            .iter()
            .zip(&parsed)
            .map(|(raw, parsed)| Image { raw, parsed })
            .collect();
        let started = Instant::now();
        let answers = resolver
            .check(&trust, "tenant", &asked, Instant::now() + BUDGET)
            .await;
        let took = started.elapsed();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        let m = resolver.metrics();
        for call in [Call::manifest, Call::signatures, Call::payload] {
            assert_eq!(m.calls(&far, call), n as u64, "{call:?}");
        }
        lines.push(format!(
            "cold review of {n:2} signed image(s): {:6.1} ms ({} registry calls)",
            took.as_secs_f64() * 1e3,
            3 * n
        ));
    }
    println!("{}", lines.join("\n"));
}

/// Issue #30: a rule protects its registry under every spelling the runtime reaches it by
/// (letter case, a port written with leading zeros or `:443`), not only the one it is
/// written in; a name moat cannot tie to the registry (`localhost` for `127.0.0.1`) needs the
/// rule to list it, as `docs/policies.md` says. The pod keeps its own spelling.
#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn every_spelling_of_a_protected_registry_is_checked() {
    let env = support::env();
    let scratch = Scratch::new("spellings");
    let (key, public) = key_pair(&scratch, "release");
    let (host, port) = env.registry.rsplit_once(':').unwrap();
    let unsigned = format!("{}/guarded/app:1", env.registry);
    push(&env, &scratch, "guarded-unsigned", &unsigned);
    let signed = format!("{}/guarded/signed:1", env.registry);
    let digest = push(&env, &scratch, "guarded-signed", &signed);
    sign(
        &env,
        &scratch,
        &key,
        &format!("{}/guarded/signed@{digest}", env.registry),
    );
    let other_name = format!("localhost:{port}");
    let trust = trust(
        &env,
        &[
            &format!("{}/guarded", env.registry),
            &format!("{other_name}/guarded"),
        ],
        &[("release", &public)],
        "unmatched: pin\n",
    );
    let resolver = resolver(&trust);
    for spelling in [
        env.registry.clone(),
        format!("{host}:0{port}"),
        format!("{}:00{port}", host.to_uppercase()),
        "LocalHost:".to_owned() + port,
    ] {
        let why = check_one(&resolver, &trust, &format!("{spelling}/guarded/app:1"))
            .await
            .unwrap_err();
        assert!(why.contains("is not signed"), "{spelling}: {why}");
        let image = format!("{spelling}/guarded/signed:1");
        let answer = check_one(&resolver, &trust, &image).await;
        if spelling.to_lowercase().starts_with("localhost") {
            // Signed as 127.0.0.1's image: not this name's (the signature names the
            // repository, and moat cannot tell that both names are one registry).
            assert!(answer.unwrap_err().contains("another repository"));
            continue;
        }
        let admitted = answer.unwrap();
        assert_eq!(admitted.pinned, format!("{image}@{digest}"));
        assert_eq!(admitted.signed_by.as_deref(), Some("release"));
    }
}
