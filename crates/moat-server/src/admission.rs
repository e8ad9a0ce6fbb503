//! `POST /mutate`, `POST /validate` and `POST /imagereview`: bytes → [`codec`] → engine →
//! [`codec`] → bytes, with a span, metrics and logs around each review.
//!
//! A policy's "no" is an HTTP 200 with `allowed: false`; only a request moat cannot read is an
//! HTTP error, with a JSON body of [`codec::ErrorBody`]'s shape.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use moat_core::decision::{Request, Requester, Stage};
use moat_core::engine;
use moat_listen::budget::Ticket;
use moat_listen::conn::Activity;
use moat_listen::refusals::Reason;
use tracing::field::Empty;

use crate::codec::{self, AdmissionIn, ImageReviewIn, RequestError};
use crate::limits::{
    BODY_READ_TIMEOUT, INLINE_DECISION_MAX_BODY_BYTES, MAX_BODY_LEN_BYTES,
    MAX_DISCARDED_BODY_LEN_BYTES,
};
use crate::metrics::{Endpoint, Outcome};
use crate::router::error_response;
use crate::state::AppState;

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        error_response(self.status(), self.to_string())
    }
}

fn json(bytes: Bytes) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

/// Who sent a request, as the server saw the connection; inserted by [`crate::server`]. A
/// request without it (the router driven without a socket) counts as from `0.0.0.0`.
#[derive(Debug, Clone)]
pub struct Client {
    /// The connection's source address.
    pub source: IpAddr,
    /// The connection, to mark a decision in progress (never displaced, never idle meanwhile).
    pub activity: Option<Activity>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

impl Default for Client {
    fn default() -> Self {
        Self {
            source: IpAddr::from([0, 0, 0, 0]),
            activity: None,
        }
    }
}

/// Reads a JSON body within the size and time limits, charging it to the budget as it arrives.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    ticket: &mut Ticket,
) -> Result<Bytes, RequestError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(RequestError::ContentType);
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, read_limited(body, ticket)).await {
        Err(_) => Err(RequestError::SlowBody),
        Ok(read) => read,
    }
}

/// The body, up to [`MAX_BODY_LEN_BYTES`], each chunk charged to `ticket` as it arrives; ends
/// at once if the request is displaced. A larger body is read on and thrown away (not charged:
/// it is not kept), up to [`MAX_DISCARDED_BODY_LEN_BYTES`] more, before the 413: an HTTP/2
/// client whose request body is still being sent when the answer comes would otherwise see its
/// stream reset instead of the answer.
async fn read_limited(mut body: Body, ticket: &mut Ticket) -> Result<Bytes, RequestError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let (mut kept, mut discarded) = (0usize, 0usize);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = ticket.displaced() => return Err(RequestError::Refused(Reason::requestDisplaced)),
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| RequestError::BrokenBody)?.into_data() else {
            continue; // trailers
        };
        if discarded > 0 || kept + data.len() > MAX_BODY_LEN_BYTES {
            chunks.clear();
            discarded += data.len();
            if discarded > MAX_DISCARDED_BODY_LEN_BYTES {
                return Err(RequestError::TooLarge);
            }
            continue;
        }
        ticket.charge(data.len()).map_err(RequestError::Refused)?;
        kept += data.len();
        chunks.push(data);
    }
    if discarded > 0 {
        return Err(RequestError::TooLarge);
    }
    Ok(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

pub(crate) async fn mutate(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Response {
    timed(&state, Endpoint::mutate, client, headers, body, |s, b| {
        Box::pin(review(s, Endpoint::mutate, Stage::Mutate, b))
    })
    .await
}

pub(crate) async fn validate(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Response {
    timed(&state, Endpoint::validate, client, headers, body, |s, b| {
        Box::pin(review(s, Endpoint::validate, Stage::Validate, b))
    })
    .await
}

pub(crate) async fn imagereview(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Response {
    timed(
        &state,
        Endpoint::imagereview,
        client,
        headers,
        body,
        |s, b| Box::pin(image_review(s, b)),
    )
    .await
}

/// How an endpoint answers a body once it has a slot.
type Answer =
    fn(Arc<AppState>, Bytes) -> Pin<Box<dyn Future<Output = Result<Bytes, RequestError>> + Send>>;

/// Runs `work` inline, or on the blocking pool when the body is large, so a large pod cannot
/// hold an async worker that other reviews need.
async fn on_cpu<T: Send + 'static>(
    state: &AppState,
    large: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RequestError> {
    if !large {
        return Ok(work());
    }
    let _turn = state.blocking_turn().await;
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "a decision failed");
        RequestError::BrokenBody
    })
}

/// Takes the request's place in the budget, reads the body, takes a decision slot, answers with
/// `answer`, and records the duration and in-flight gauge however the review ends. A request
/// holds nothing shared but its budget charge until its body has arrived.
async fn timed(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    client: Client,
    headers: HeaderMap,
    body: Body,
    answer: Answer,
) -> Response {
    let started = Instant::now();
    let _in_flight = state.metrics.in_flight();
    let answered = async {
        let mut ticket = state
            .budget
            .begin(client.source)
            .map_err(RequestError::Refused)?;
        let body = read_body(&headers, body, &mut ticket).await?;
        ticket.finish_reading();
        let _slot = state
            .slots
            .take(client.source)
            .await
            .map_err(RequestError::Refused)?;
        let _deciding = client.activity.as_ref().map(Activity::deciding);
        answer(state.clone(), body).await
    }
    .await;
    let response = match answered {
        Ok(bytes) => json(bytes),
        Err(e) => {
            state.metrics.count(endpoint, "", Outcome::invalid);
            match e.refusal() {
                // Counted and summarised by the listener, never a line each.
                Some(reason) => state.review_refusals.note(reason),
                None => {
                    tracing::debug!(endpoint = ?endpoint, error = %e, "rejected an unreadable review")
                }
            }
            e.into_response()
        }
    };
    state.metrics.observe(endpoint, started.elapsed());
    response
}

/// One AdmissionReview: read (on the blocking pool when large), its images resolved at their
/// registries when `images.trust` is on (all at once, within the registry budget), decided.
async fn review(
    state: Arc<AppState>,
    endpoint: Endpoint,
    stage: Stage,
    body: Bytes,
) -> Result<Bytes, RequestError> {
    let large = body.len() > INLINE_DECISION_MAX_BODY_BYTES;
    let req = on_cpu(&state, large, move || AdmissionIn::parse(&body)).await??;
    let config = state.config();
    let labels = state.namespace_labels(&req.namespace);
    let verdicts = if config.images.trust.is_some() && req.unusable.is_none() {
        let request = admission_request(&req, stage, labels.as_ref());
        let images = engine::images_to_resolve(&config, &request);
        state.image_verdicts(&config, &req.namespace, &images).await
    } else {
        None
    };
    let st = state.clone();
    on_cpu(&state, large, move || {
        decide_review(&st, endpoint, stage, &req, &config, labels, verdicts)
    })
    .await?
}

/// The engine's view of an AdmissionReview.
fn admission_request<'a>(
    req: &'a AdmissionIn,
    stage: Stage,
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
) -> Request<'a> {
    Request {
        operation: req.operation,
        stage,
        object: req.object.as_ref().or(req.old_object.as_ref()),
        old_object: req.old_object.as_ref(),
        namespace: &req.namespace,
        namespace_labels: labels,
        dry_run: req.dry_run,
        requester: Some(Requester {
            username: &req.user_info.username,
        }),
        placement_seed: &req.uid,
    }
}

/// One AdmissionReview, decided, with the registries' verdicts on its images.
fn decide_review(
    state: &AppState,
    endpoint: Endpoint,
    stage: Stage,
    req: &AdmissionIn,
    config: &moat_core::config::Config,
    labels: Option<std::collections::BTreeMap<String, String>>,
    verdicts: Option<moat_core::trust::ImageVerdicts>,
) -> Result<Bytes, RequestError> {
    let started = Instant::now();
    let operation = req.operation_name();
    let span = tracing::info_span!(
        "review",
        uid = %req.uid,
        endpoint = ?endpoint,
        kind = %req.kind,
        namespace = %req.namespace,
        name = %req.name,
        operation,
        dry_run = req.dry_run,
        decision = Empty,
        duration_us = Empty,
    );
    let _enter = span.enter();
    if !req.has_object {
        // DELETE without an old object, CONNECT: nothing to decide.
        state.metrics.count(endpoint, operation, Outcome::allowed);
        span.record("decision", "allowed");
        return Ok(codec::admission_allow(req));
    }
    if let Some(e) = &req.unusable {
        // Not a pod moat can read: refuse, with the reason, rather than hand the decision to
        // failurePolicy.
        state.metrics.count(endpoint, operation, Outcome::denied);
        span.record("decision", "denied");
        tracing::info!(reason = %e, "denied an unreadable object");
        return Ok(codec::admission_deny(req, e.to_string()));
    }
    let decision = engine::decide_with_images(
        config,
        &admission_request(req, stage, labels.as_ref()),
        verdicts.as_ref(),
    );
    state.metrics.record_policies(endpoint, &decision);
    let outcome = if decision.allowed() {
        tracing::debug!(changes = decision.changes.len(), "allowed");
        Outcome::allowed
    } else {
        let message = decision.message();
        tracing::info!(reasons = decision.denials.len(), %message, "denied");
        Outcome::denied
    };
    state.metrics.count(endpoint, operation, outcome);
    span.record("decision", outcome.as_str());
    span.record("duration_us", started.elapsed().as_micros() as u64);
    Ok(codec::admission_answer(req, &decision))
}

/// One ImageReview, decided by the image rule with admission's exemptions and enforcement, and
/// the registries' verdicts when `images.trust` is on.
async fn image_review(state: Arc<AppState>, body: Bytes) -> Result<Bytes, RequestError> {
    let endpoint = Endpoint::imagereview;
    let large = body.len() > INLINE_DECISION_MAX_BODY_BYTES;
    let review = on_cpu(&state, large, move || ImageReviewIn::parse(&body)).await??;
    let config = state.config();
    let images = || review.spec.containers.iter().map(|c| c.image.as_str());
    let verdicts = if config.images.trust.is_some() {
        let asked = engine::image_review_to_resolve(&config, &review.spec.namespace, images());
        state
            .image_verdicts(&config, &review.spec.namespace, &asked)
            .await
    } else {
        None
    };
    let decision = engine::review_images_verified(
        &config,
        &review.spec.namespace,
        images(),
        verdicts.as_ref(),
    );
    state.metrics.record_policies(endpoint, &decision);
    let outcome = if decision.allowed() {
        Outcome::allowed
    } else {
        Outcome::denied
    };
    state.metrics.count(endpoint, "", outcome);
    tracing::info!(
        namespace = %review.spec.namespace,
        images = review.spec.containers.len(),
        allowed = decision.allowed(),
        "image review"
    );
    Ok(codec::image_review_answer(&decision))
}
