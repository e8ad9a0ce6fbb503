//! The router driven without a socket: every request body captured from a real kube-apiserver
//! v1.26 goes through the codec, the engine and back, and the answer has the shape the API
//! server reads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use moat_core::config::Config;
use moat_server::{AppState, router};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tower::ServiceExt;

fn captured() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/kube-apiserver-1.26");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "fixtures missing in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

async fn post(state: &Arc<AppState>, path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = router(state.clone())
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn every_captured_request_gets_an_answer_the_api_server_reads() {
    let state = Arc::new(AppState::new(
        Config::embedded_default(),
        None,
        &mut Registry::default(),
    ));
    for (name, body) in captured() {
        let sent: Value = serde_json::from_slice(&body).unwrap();
        let path = ["mutate", "validate", "imagereview"]
            .into_iter()
            .find(|e| name.contains(&format!("-{e}-")))
            .unwrap_or_else(|| panic!("{name}: no endpoint in the name"));
        let (status, answer) = post(&state, &format!("/{path}"), body).await;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(answer["apiVersion"], sent["apiVersion"], "{name}");
        assert_eq!(answer["kind"], sent["kind"], "{name}");
        if path == "imagereview" {
            assert!(answer["status"]["allowed"].is_boolean(), "{name}: {answer}");
            continue;
        }
        let response = &answer["response"];
        assert_eq!(response["uid"], sent["request"]["uid"], "{name}");
        assert!(response["allowed"].is_boolean(), "{name}: {answer}");
        if response["allowed"] == false {
            assert_eq!(response["status"]["code"], 403, "{name}");
            assert!(response["status"]["message"].is_string(), "{name}");
        }
        if let Some(patch) = response.get("patch") {
            assert!(
                patch.is_string(),
                "{name}: a patch is base64, as Go's []byte"
            );
            assert_eq!(response["patchType"], "JSONPatch", "{name}");
        }
    }
}

#[tokio::test]
async fn an_unusable_pod_template_is_denied_and_a_wrongly_typed_field_is_a_400() {
    let state = Arc::new(AppState::new(
        Config::embedded_default(),
        None,
        &mut Registry::default(),
    ));
    let review = |object: Value| {
        // `request.kind` as the API server writes it: the object's own.
        let (group, version) = object["apiVersion"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap_or(("", "v1"));
        let kind = serde_json::json!({"group": group, "version": version, "kind": object["kind"]});
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u1", "kind": kind,
                "operation": "CREATE", "namespace": "shop", "userInfo": {"username": "alice"},
                "object": object}}))
        .unwrap()
    };
    let cases = [
        (
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}}),
            "Deployment 'spec.template.' does not parse: pod template is missing",
        ),
        (
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}),
            "pod spec is missing",
        ),
        (
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": {"volumes": []}}),
            "containers",
        ),
    ];
    for (object, want) in cases {
        let (status, answer) = post(&state, "/validate", review(object)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{message}");
    }
    let (status, answer) = post(
        &state,
        "/validate",
        review(serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": "x"}})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kube-apiserver-1.26")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn a_class_label_change_through_pods_status_is_denied() {
    let state = Arc::new(AppState::new(
        Config::embedded_default(),
        None,
        &mut Registry::default(),
    ));
    let mut review = fixture("023-validate-UPDATE-Pod-status-admin.json");
    assert_eq!(review["request"]["subResource"], "status");
    let (_, answer) = post(&state, "/validate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    review["request"]["object"]["metadata"]["labels"]["moat.dev/class"] = "other".into();
    let (_, answer) = post(&state, "/validate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot change")
    );
}

#[tokio::test]
async fn a_tightened_policy_never_blocks_finalizer_removal_or_scaling() {
    // The workloads were admitted under a policy that allowed any registry; now only one is.
    let mut config = Config::embedded_default();
    config.images.allowed_registries = vec!["registry.internal".parse().unwrap()];
    let state = Arc::new(AppState::new(config, None, &mut Registry::default()));
    for name in [
        "025-validate-UPDATE-ReplicaSet-deployment-controller.json",
        "031-validate-UPDATE-ReplicaSet-generic-garbage-collector.json",
        "032-validate-UPDATE-ReplicaSet-generic-garbage-collector.json",
        "033-validate-UPDATE-Deployment-generic-garbage-collector.json",
    ] {
        let review = fixture(name);
        let (_, answer) = post(&state, "/validate", serde_json::to_vec(&review).unwrap()).await;
        assert_eq!(answer["response"]["allowed"], true, "{name}: {answer}");
        // The same object as a CREATE is refused: the policy did tighten.
        let mut create = review.clone();
        create["request"]["operation"] = "CREATE".into();
        create["request"]["oldObject"] = Value::Null;
        let (_, answer) = post(&state, "/validate", serde_json::to_vec(&create).unwrap()).await;
        assert_eq!(answer["response"]["allowed"], false, "{name}: {answer}");
    }
}

#[tokio::test]
async fn image_review_honours_the_exempt_namespaces() {
    let state = Arc::new(AppState::new(
        Config::embedded_default(),
        None,
        &mut Registry::default(),
    ));
    let review = |namespace: &str| {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "imagepolicy.k8s.io/v1alpha1", "kind": "ImageReview",
            "spec": {"containers": [{"image": "busybox:latest"}], "namespace": namespace}}))
        .unwrap()
    };
    let (_, answer) = post(&state, "/imagereview", review("kube-system")).await;
    assert_eq!(answer["status"]["allowed"], true, "{answer}");
    let (_, answer) = post(&state, "/imagereview", review("shop")).await;
    assert_eq!(answer["status"]["allowed"], false, "{answer}");
    assert!(
        answer["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("spec.containers[0]")
    );
}
