//! The webhook with `images.trust` against a real registry (distribution), images pushed with
//! skopeo and signed with cosign: `/mutate` pins every image a pod pulls to the digest it
//! verified, the reinvoked call and `/validate` find nothing left to do and call no registry
//! again, an unsigned image is denied by every endpoint with the registry's reason, a
//! workload's template is verified and left as it is. `scripts/test.sh` starts the registry
//! and runs these with `--ignored`; the last two need no registry and run with the others.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

#[path = "../../moat-registry/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use axum::body::Body;
use base64::Engine as _;
use http::Request;
use http_body_util::BodyExt;
use moat_core::config::Config;
use moat_server::{AppState, router};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use support::{Env, Scratch, indent, key_pair, push, sign};
use tower::ServiceExt;

async fn post(state: &Arc<AppState>, path: &str, body: &Value) -> Value {
    let response = router(state.clone())
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn admission(object: &Value) -> Value {
    let (group, version) = object["apiVersion"]
        .as_str()
        .unwrap()
        .split_once('/')
        .unwrap_or(("", "v1"));
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u1", "kind": {"group": group, "version": version, "kind": object["kind"]},
        "operation": "CREATE", "namespace": "shop", "userInfo": {"username": "alice"},
        "object": object}})
}

fn pod(app: &str, sidecar: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "image": app}, {"name": "sidecar", "image": sidecar}],
                    "initContainers": [{"name": "init", "image": app}],
                    "volumes": [{"name": "data", "image": {"reference": sidecar}}]}})
}

/// The response's patch applied to `object`.
fn patched(object: &Value, answer: &Value) -> Value {
    let response = &answer["response"];
    assert_eq!(response["allowed"], true, "{answer}");
    let Some(patch) = response["patch"].as_str() else {
        return object.clone();
    };
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

/// `moat_registry_calls_total` for manifests of `registry`, as the metrics port shows it.
fn manifest_calls(registry: &Registry, host: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("moat_registry_calls_total{")
                && l.contains(&format!("registry=\"{host}\""))
                && l.contains("call=\"manifest\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

struct Setup {
    env: Env,
    _scratch: Scratch,
    state: Arc<AppState>,
    registry: Registry,
    signed: (String, String),
    unsigned: String,
    /// The unsigned image by its digest.
    unsigned_digest: String,
}

fn setup(name: &str) -> Setup {
    let env = support::env();
    let scratch = Scratch::new(name);
    let (key, public) = key_pair(&scratch, "release");
    let repo = format!("{}/{name}", env.registry);
    let app = format!("{repo}/app:2.0");
    let digest = push(&env, &scratch, &format!("{name}-app"), &app);
    sign(&env, &scratch, &key, &format!("{repo}/app@{digest}"));
    let unsigned = format!("{repo}/unsigned:1");
    let unsigned_digest = push(&env, &scratch, &format!("{name}-unsigned"), &unsigned);
    let yaml = format!(
        "images:\n  trust:\n    caCertificates: |\n{}    rules:\n      - repositories: [{}]\n        keys:\n          - name: release\n            publicKey: |\n{}",
        indent(&env.ca, 6),
        env.registry,
        indent(&public, 14)
    );
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut registry = Registry::default();
    let state = Arc::new(AppState::new(config, None, &mut registry));
    assert!(state.image_trust_error().is_none());
    Setup {
        env,
        _scratch: scratch,
        state,
        registry,
        signed: (app, digest),
        unsigned_digest: format!("{unsigned}@{unsigned_digest}"),
        unsigned,
    }
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn mutate_pins_every_image_and_the_second_call_and_validate_call_no_registry() {
    let s = setup("pins");
    let (app, digest) = &s.signed;
    let object = pod(app, app);
    let answer = post(&s.state, "/mutate", &admission(&object)).await;
    let after = patched(&object, &answer);
    let pinned = format!("{app}@{digest}");
    assert_eq!(after["spec"]["containers"][0]["image"], pinned.as_str());
    assert_eq!(after["spec"]["containers"][1]["image"], pinned.as_str());
    assert_eq!(after["spec"]["initContainers"][0]["image"], pinned.as_str());
    assert_eq!(
        after["spec"]["volumes"][0]["image"]["reference"],
        pinned.as_str()
    );
    // One tag, looked up once for four fields.
    assert_eq!(manifest_calls(&s.registry, &s.env.registry), 1);

    // The API server's reinvocation, then the validating webhook, on the pinned pod.
    let again = post(&s.state, "/mutate", &admission(&after)).await;
    assert_eq!(again["response"]["allowed"], true, "{again}");
    assert!(again["response"].get("patch").is_none(), "{again}");
    let validated = post(&s.state, "/validate", &admission(&after)).await;
    assert_eq!(validated["response"]["allowed"], true, "{validated}");
    assert_eq!(manifest_calls(&s.registry, &s.env.registry), 1);

    // A later webhook that puts the tag back is caught at validation.
    let validated = post(&s.state, "/validate", &admission(&object)).await;
    assert_eq!(validated["response"]["allowed"], false, "{validated}");
    let message = validated["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("moat's mutation is missing"), "{message}");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_unsigned_image_is_denied_by_every_endpoint_with_the_registrys_reason() {
    let s = setup("deny");
    let object = pod(&s.signed.0, &s.unsigned);
    let answer = post(&s.state, "/mutate", &admission(&object)).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "container 'sidecar' (spec.containers[1]): image '{}': sha256:",
            s.unsigned
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "is not signed: registry {} has no",
            s.env.registry
        )),
        "{message}"
    );
    assert!(message.contains("image volume 'data'"), "{message}");

    let review = json!({"apiVersion": "imagepolicy.k8s.io/v1alpha1", "kind": "ImageReview",
        "spec": {"namespace": "shop", "containers": [{"image": s.signed.0}, {"image": s.unsigned}]}});
    let answer = post(&s.state, "/imagereview", &review).await;
    assert_eq!(answer["status"]["allowed"], false, "{answer}");
    let reason = answer["status"]["reason"].as_str().unwrap();
    assert!(reason.contains("spec.containers[1]"), "{reason}");
    assert!(reason.contains("is not signed"), "{reason}");
}

/// A pod UPDATE from `old` to `new`, as `images.moat.dev` sends it.
fn update(old: &Value, new: &Value) -> Value {
    let mut review = admission(new);
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["oldObject"] = old.clone();
    review
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn an_image_change_on_a_running_pod_is_verified_and_must_be_a_digest() {
    let s = setup("update");
    let (app, digest) = &s.signed;
    let object = pod(app, app);
    let running = patched(
        &object,
        &post(&s.state, "/mutate", &admission(&object)).await,
    );
    let calls = manifest_calls(&s.registry, &s.env.registry);
    let with_app_image = |image: &str| {
        let mut p = running.clone();
        p["spec"]["containers"][0]["image"] = json!(image);
        p
    };

    // An unsigned digest, and an unsigned tag: refused with the registry's reason.
    for image in [&s.unsigned_digest, &s.unsigned] {
        let answer = post(
            &s.state,
            "/validate",
            &update(&running, &with_app_image(image)),
        )
        .await;
        assert_eq!(answer["response"]["allowed"], false, "{image}: {answer}");
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("is not signed"), "{message}");
    }
    // A signed tag: refused, since an update is never pinned, with the digest to name instead.
    let answer = post(
        &s.state,
        "/validate",
        &update(&running, &with_app_image(app)),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "pin the image of container 'app' (spec.containers[0]) to '{app}@{digest}'"
        )),
        "{message}"
    );
    // The signed digest: admitted.
    let answer = post(
        &s.state,
        "/validate",
        &update(&running, &with_app_image(&format!("{app}@{digest}"))),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    // The running pod with a label added: nothing to resolve, no registry call.
    let before = manifest_calls(&s.registry, &s.env.registry);
    let mut labelled = running.clone();
    labelled["metadata"]["labels"] = json!({"team": "shop"});
    let answer = post(&s.state, "/validate", &update(&running, &labelled)).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(manifest_calls(&s.registry, &s.env.registry), before);
    assert!(before > calls, "the unsigned image was looked up");
}

#[tokio::test]
#[ignore = "needs a registry: scripts/test.sh starts it"]
async fn a_workload_template_is_verified_and_not_rewritten() {
    let s = setup("template");
    let deployment = |image: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "shop"},
               "spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})
    };
    let signed = deployment(&s.signed.0);
    let answer = post(&s.state, "/mutate", &admission(&signed)).await;
    assert_eq!(patched(&signed, &answer), signed);
    let unsigned = deployment(&s.unsigned);
    let answer = post(&s.state, "/mutate", &admission(&unsigned)).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
}

fn own_ca() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

fn trust_config(ca: &str, rules: &str) -> Config {
    let yaml = format!(
        "images:\n  trust:\n    caCertificates: |\n{}    rules: {rules}\n",
        indent(ca, 6)
    );
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Rules take effect on reload; the client's TLS roots and credentials file need a restart,
/// and so does turning image trust on: such a reload is refused, the configuration in force
/// stays.
#[test]
fn a_reload_changes_rules_but_not_the_registry_client() {
    let ca = own_ca();
    let state = AppState::new(
        trust_config(&ca, "[{repositories: [r.example], signatures: off}]"),
        None,
        &mut Registry::default(),
    );
    state
        .set_config(trust_config(
            &ca,
            "[{repositories: [other.example], signatures: off}]",
        ))
        .unwrap();
    let refused = state
        .set_config(trust_config(
            &own_ca(),
            "[{repositories: [r.example], signatures: off}]",
        ))
        .unwrap_err();
    assert!(refused.contains("needs a restart"), "{refused}");
    let plain = AppState::new(Config::default(), None, &mut Registry::default());
    let refused = plain
        .set_config(trust_config(
            &ca,
            "[{repositories: [r.example], signatures: off}]",
        ))
        .unwrap_err();
    assert!(refused.contains("turning images.trust on"), "{refused}");
}

/// Needs no registry: nothing listens where the rule points, and the review is still a
/// denial that names the registry and why, answered 200, never an HTTP error or a hang.
#[tokio::test]
async fn a_registry_that_is_down_is_a_denial_naming_it_not_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = format!("127.0.0.1:{port}");
    // A CA of its own, so the test does not depend on the machine's roots.
    let config = trust_config(
        &own_ca(),
        &format!("[{{repositories: ['{registry}'], signatures: off}}]"),
    );
    let state = Arc::new(AppState::new(config, None, &mut Registry::default()));
    let image = format!("{registry}/shop/api:1");
    let answer = post(&state, "/mutate", &admission(&pod(&image, &image))).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    // What kind of failure, never the connection error (a tenant would read it).
    assert!(
        message.contains(&format!(
            "container 'app' (spec.containers[0]): image '{image}': registry {registry} is unreachable"
        )),
        "{message}"
    );
    assert!(
        !message.contains("refused") && !message.contains("os error"),
        "{message}"
    );
}
