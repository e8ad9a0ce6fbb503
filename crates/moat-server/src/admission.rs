//! `POST /mutate`, `POST /validate` (AdmissionReview `admission.k8s.io/v1` and `v1beta1`, answered
//! in the version asked) and `POST /imagereview` (`imagepolicy.k8s.io/v1alpha1`).
//!
//! A policy's "no" is an HTTP 200 with `allowed: false`; only a request moat cannot read is an
//! HTTP error, with a JSON body of [`ErrorBody`]'s shape.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http_body_util::{BodyExt, Limited};
use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Operation as KubeOperation,
};
use moat_core::policy::{self, Decision, Operation, Request, Stage};
use moat_core::subject::Pruned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::field::Empty;

use crate::AppState;
use crate::limits::{BODY_READ_TIMEOUT, MAX_BODY_LEN_BYTES};
use crate::metrics::{
    Endpoint, EndpointLabels, ExemptionLabels, Outcome, PolicyLabels, RequestLabels,
};

const ADMISSION_V1: &str = "admission.k8s.io/v1";
const ADMISSION_V1BETA1: &str = "admission.k8s.io/v1beta1";
const IMAGEPOLICY_V1ALPHA1: &str = "imagepolicy.k8s.io/v1alpha1";
/// HTTP status written into `status.code` of a denial, as the API server expects.
const DENIED_STATUS_CODE: u16 = 403;

/// The JSON body of every HTTP error moat returns.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An HTTP error's detail.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

/// A request moat cannot read. Turned into a 4xx (or 5xx) JSON answer at the boundary; the
/// message names what is wrong, never internals.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("content type must be application/json")]
    ContentType,
    #[error("body is larger than {MAX_BODY_LEN_BYTES} bytes")]
    TooLarge,
    #[error("body was not received within {} seconds", BODY_READ_TIMEOUT.as_secs())]
    SlowBody,
    #[error("body could not be read")]
    BrokenBody,
    #[error("body is not a valid {kind}: {message}")]
    Malformed { kind: &'static str, message: String },
    #[error("apiVersion '{0}' is not supported (use {ADMISSION_V1} or {ADMISSION_V1BETA1})")]
    UnsupportedVersion(String),
    #[error("kind must be '{expected}', not '{got}'")]
    WrongKind { expected: &'static str, got: String },
    #[error("the review has no request")]
    NoRequest,
}

impl RequestError {
    fn status(&self) -> StatusCode {
        match self {
            Self::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowBody => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An HTTP error answer of moat's JSON shape.
pub fn error_response(status: StatusCode, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
        },
    };
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        error_response(self.status(), self.to_string())
    }
}

/// Reads a JSON body within the size and time limits.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, RequestError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(RequestError::ContentType);
    }
    let limited = Limited::new(body, MAX_BODY_LEN_BYTES);
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => Err(RequestError::SlowBody),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(RequestError::TooLarge),
        Ok(Err(_)) => Err(RequestError::BrokenBody),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn operation_name(op: &KubeOperation) -> &'static str {
    match op {
        KubeOperation::Create => "CREATE",
        KubeOperation::Update => "UPDATE",
        KubeOperation::Delete => "DELETE",
        KubeOperation::Connect => "CONNECT",
    }
}

pub(crate) async fn mutate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    review(&state, Endpoint::mutate, Stage::Mutate, &headers, body).await
}

pub(crate) async fn validate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    review(&state, Endpoint::validate, Stage::Validate, &headers, body).await
}

async fn review(
    state: &AppState,
    endpoint: Endpoint,
    stage: Stage,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let _in_flight = state.in_flight();
    let response = match read_body(headers, body)
        .await
        .and_then(|b| parse_review(&b))
    {
        Ok(req) => answer(state, endpoint, stage, req, started),
        Err(e) => {
            state.count(endpoint, "", Outcome::invalid);
            tracing::info!(endpoint = ?endpoint, error = %e, "rejected an unreadable review");
            e.into_response()
        }
    };
    state
        .metrics
        .duration
        .get_or_create(&EndpointLabels { endpoint })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// An object in a review, as the policy core reads it: pruned to the fields policies read
/// ([`moat_core::subject::Pruned`]) while the body is parsed, so no JSON tree of the whole pod
/// is built. kube-core's `AdmissionReview<T>` needs `T: Resource`; moat reads metadata from the
/// JSON, so `meta()` is an empty `ObjectMeta` no code reads.
#[derive(Debug, Clone)]
pub struct ReviewedObject {
    value: Value,
    meta: ObjectMeta,
}

impl<'de> Deserialize<'de> for ReviewedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read in one pass with the envelope. A kept field of the wrong type makes the whole
        // review unreadable (400); the API server, which decoded the object before calling,
        // never sends one.
        let Pruned(value) = Pruned::deserialize(d)?;
        Ok(Self {
            value,
            meta: ObjectMeta::default(),
        })
    }
}

impl Serialize for ReviewedObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl kube::Resource for ReviewedObject {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Object")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("objects")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// Parses the body once: kube-core's typed envelope (uid, kind, operation, userInfo, …), with
/// the objects pruned on the way.
fn parse_review(body: &[u8]) -> Result<AdmissionRequest<ReviewedObject>, RequestError> {
    let malformed = |e: serde_json::Error| RequestError::Malformed {
        kind: "AdmissionReview",
        message: e.to_string(),
    };
    let review: AdmissionReview<ReviewedObject> =
        serde_json::from_slice(body).map_err(malformed)?;
    if review.types.kind != "AdmissionReview" {
        return Err(RequestError::WrongKind {
            expected: "AdmissionReview",
            got: review.types.kind,
        });
    }
    if review.types.api_version != ADMISSION_V1 && review.types.api_version != ADMISSION_V1BETA1 {
        return Err(RequestError::UnsupportedVersion(review.types.api_version));
    }
    let req: AdmissionRequest<ReviewedObject> =
        review.try_into().map_err(|_| RequestError::NoRequest)?;
    if req
        .object
        .as_ref()
        .or(req.old_object.as_ref())
        .is_some_and(|o| !o.value.is_object())
    {
        return Err(RequestError::Malformed {
            kind: "AdmissionReview",
            message: "request.object is not an object".to_owned(),
        });
    }
    Ok(req)
}

fn answer(
    state: &AppState,
    endpoint: Endpoint,
    stage: Stage,
    mut req: AdmissionRequest<ReviewedObject>,
    started: Instant,
) -> Response {
    let object = req.object.take().map(|o| o.value);
    let old_object = req.old_object.take().map(|o| o.value);
    let operation = operation_name(&req.operation);
    let span = tracing::info_span!(
        "review",
        uid = %req.uid,
        endpoint = ?endpoint,
        kind = %req.kind.kind,
        namespace = req.namespace.as_deref().unwrap_or(""),
        name = %req.name,
        operation,
        dry_run = req.dry_run,
        decision = Empty,
        duration_us = Empty,
    );
    let decided = |decision: &'static str| {
        span.record("decision", decision);
        span.record("duration_us", started.elapsed().as_micros() as u64);
    };
    let _enter = span.enter();
    let config = state.config();
    let namespace = req.namespace.clone().unwrap_or_default();
    let labels: Option<BTreeMap<String, String>> = state.namespace_labels(&namespace);
    let mut response = AdmissionResponse::from(&req);
    let Some(object) = object.or_else(|| old_object.clone()) else {
        // DELETE without an old object, CONNECT: nothing to decide.
        state.count(endpoint, operation, Outcome::allowed);
        decided("allowed");
        return review_json(response);
    };
    let request = Request {
        operation: match req.operation {
            KubeOperation::Create => Operation::Create,
            KubeOperation::Update => Operation::Update,
            KubeOperation::Delete => Operation::Delete,
            KubeOperation::Connect => Operation::Connect,
        },
        stage,
        object: &object,
        old_object: old_object.as_ref(),
        namespace: &namespace,
        namespace_labels: labels.as_ref(),
        dry_run: req.dry_run,
        placement_seed: &req.uid,
    };
    let decision = match policy::decide(&config, &request) {
        Ok(d) => d,
        Err(e) => {
            // The API server sent something that is not a pod moat can read: refuse, with the
            // reason, rather than hand the decision to failurePolicy.
            state.count(endpoint, operation, Outcome::denied);
            decided("denied");
            tracing::info!(reason = %e, "denied an unreadable object");
            response = response.deny(e.to_string());
            response.result.code = DENIED_STATUS_CODE;
            return review_json(response);
        }
    };
    state.record_policies(endpoint, &decision);
    if !decision.warnings.is_empty() {
        response.warnings = Some(decision.warnings.clone());
    }
    if decision.allowed() {
        state.count(endpoint, operation, Outcome::allowed);
        decided("allowed");
        if !decision.patch.0.is_empty() {
            tracing::debug!(changes = decision.changes.len(), "allowed with a patch");
            response = match response.with_patch(decision.patch) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "could not encode the patch");
                    state.count(endpoint, operation, Outcome::error);
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "could not encode the patch".to_owned(),
                    );
                }
            };
        } else {
            tracing::debug!("allowed");
        }
    } else {
        state.count(endpoint, operation, Outcome::denied);
        decided("denied");
        let message = decision.message();
        tracing::info!(reasons = decision.denials.len(), %message, "denied");
        response = response.deny(message);
        response.result.code = DENIED_STATUS_CODE;
    }
    review_json(response)
}

/// The AdmissionReview answer. kube-core serialises `response.patch` (`Vec<u8>`) as an array of
/// numbers; the API's documented wire form, and what Go's `[]byte` encodes to, is a base64
/// string, so the patch is written that way (a third the size, too).
fn review_json(mut response: AdmissionResponse) -> Response {
    let patch = response.patch.take();
    let mut review = match serde_json::to_value(response.into_review()) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "could not encode the review");
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the review".to_owned(),
            );
        }
    };
    if let (Some(patch), Some(Value::Object(r))) = (patch, review.get_mut("response")) {
        r.insert(
            "patch".to_owned(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(patch)),
        );
    }
    (StatusCode::OK, axum::Json(review)).into_response()
}

// ------------------------------------------------------------------------------------------------
// ImageReview (kube-apiserver's ImagePolicyWebhook admission plugin)

/// `imagepolicy.k8s.io/v1alpha1` ImageReview. The API server's wire type; no Rust crate carries
/// it, so it is written here, lenient on input like every wire type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub spec: ImageReviewSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ImageReviewStatus>,
}

/// `ImageReview.spec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReviewSpec {
    #[serde(default)]
    pub containers: Vec<ImageReviewContainer>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// One container of `ImageReview.spec.containers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageReviewContainer {
    #[serde(default)]
    pub image: String,
}

/// `ImageReview.status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReviewStatus {
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
}

pub(crate) async fn imagereview(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let endpoint = Endpoint::imagereview;
    let _in_flight = state.in_flight();
    let parsed = read_body(&headers, body).await.and_then(|b| {
        let review: ImageReview =
            serde_json::from_slice(&b).map_err(|e| RequestError::Malformed {
                kind: "ImageReview",
                message: e.to_string(),
            })?;
        if review.kind != "ImageReview" {
            return Err(RequestError::WrongKind {
                expected: "ImageReview",
                got: review.kind,
            });
        }
        if review.api_version != IMAGEPOLICY_V1ALPHA1 {
            return Err(RequestError::UnsupportedVersion(review.api_version));
        }
        Ok(review)
    });
    let response = match parsed {
        Err(e) => {
            state.count(endpoint, "", Outcome::invalid);
            e.into_response()
        }
        Ok(mut review) => {
            let config = state.config();
            let problems = policy::review_images(
                &config,
                review.spec.containers.iter().map(|c| c.image.as_str()),
            );
            let reasons: Vec<String> = problems
                .iter()
                .map(|(i, m)| format!("spec.containers[{i}]: {m}"))
                .collect();
            let audit = config.enforcement.images == moat_core::config::Enforcement::Audit;
            let mut status = ImageReviewStatus {
                allowed: reasons.is_empty() || audit,
                ..Default::default()
            };
            if !reasons.is_empty() {
                let decision = if audit { "audited" } else { "denied" };
                state
                    .metrics
                    .policy_decisions
                    .get_or_create(&PolicyLabels {
                        endpoint,
                        policy: "images",
                        decision,
                    })
                    .inc();
                if audit {
                    status
                        .audit_annotations
                        .insert("moat.dev/audit".to_owned(), reasons.join("; "));
                } else {
                    status.reason = reasons.join("; ");
                }
            }
            let outcome = if status.allowed {
                Outcome::allowed
            } else {
                Outcome::denied
            };
            state.count(endpoint, "", outcome);
            tracing::info!(namespace = %review.spec.namespace, images = review.spec.containers.len(), allowed = status.allowed, "image review");
            review.status = Some(status);
            review.spec = ImageReviewSpec::default();
            (StatusCode::OK, axum::Json(review)).into_response()
        }
    };
    state
        .metrics
        .duration
        .get_or_create(&EndpointLabels { endpoint })
        .observe(started.elapsed().as_secs_f64());
    response
}

impl AppState {
    fn count(&self, endpoint: Endpoint, operation: &str, decision: Outcome) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                operation: operation.to_owned(),
                decision,
            })
            .inc();
    }

    fn record_policies(&self, endpoint: Endpoint, d: &Decision) {
        for x in &d.denials {
            self.metrics
                .policy_decisions
                .get_or_create(&PolicyLabels {
                    endpoint,
                    policy: x.policy.as_str(),
                    decision: "denied",
                })
                .inc();
        }
        for x in &d.audited {
            self.metrics
                .policy_decisions
                .get_or_create(&PolicyLabels {
                    endpoint,
                    policy: x.policy.as_str(),
                    decision: "audited",
                })
                .inc();
        }
        for e in &d.exemptions {
            let policy = e.policy.map_or("all", |p| p.as_str());
            self.metrics
                .exemptions
                .get_or_create(&ExemptionLabels {
                    policy,
                    reason: e.reason.as_str(),
                })
                .inc();
            tracing::debug!(policy, reason = e.reason.as_str(), "exempt");
        }
    }
}
