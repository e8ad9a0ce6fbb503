//! The wire: bytes in, a core request out; a decision in, bytes out.
//!
//! - AdmissionReview (`admission.k8s.io/v1` and `v1beta1`, answered in the version asked). The
//!   envelope is read in one pass of [`moat_core::json`]'s field-selective reader, each object
//!   straight into the typed fields the policies read; what no policy reads is skipped by its
//!   structure, unbuilt. Nothing builds a JSON tree of the pod.
//! - ImageReview (`imagepolicy.k8s.io/v1alpha1`), kube-apiserver's ImagePolicyWebhook.
//! - moat's own error body for requests it cannot read.
//!
//! moat writes its own response types instead of kube-core's `AdmissionReview<T>`: that type
//! needs `T: kube::Resource` for the objects (which moat reads as [`Template`]s, not as resources)
//! and encodes `patch` as an array of numbers, where the API's wire form (Go's `[]byte`) is a
//! base64 string. Every response here is serialised once, straight to bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use moat_core::decision::{Decision, Operation};
use moat_core::json::RawJson;
use moat_core::subject::{Kind, MalformedObject, ReadError, Template, TemplateSeed};
use serde::{Deserialize, Serialize};

use moat_listen::refusals::Reason;

use crate::limits::{BODY_READ_TIMEOUT, MAX_BODY_LEN_BYTES};

pub const ADMISSION_V1: &str = "admission.k8s.io/v1";
pub const ADMISSION_V1BETA1: &str = "admission.k8s.io/v1beta1";
pub const IMAGEPOLICY_V1ALPHA1: &str = "imagepolicy.k8s.io/v1alpha1";
/// HTTP status written into `status.code` of a denial, as the API server expects.
const DENIED_STATUS_CODE: u16 = 403;

/// A request moat cannot read. Turned into a 4xx JSON answer at the boundary; the message names
/// what is wrong, never internals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A bound of the request budget or the decision slots (see [`crate::limits`]).
    #[error("{}", refusal_message(*.0))]
    Refused(Reason),
}

fn refusal_message(reason: Reason) -> &'static str {
    match reason {
        Reason::requestPerSource => {
            "too many requests from this address are still sending their body; retry"
        }
        Reason::requestDisplaced => {
            "the body was still arriving when the server's request memory was full; send bodies at once and retry"
        }
        Reason::slotPerSource => "too many reviews in progress from this address; retry",
        Reason::slotTimeout => "too many reviews in progress; retry",
        _ => "the server's request memory is full; retry",
    }
}

impl RequestError {
    /// The listener bound this error reports, if it is one: counted and summarised, not logged
    /// one by one.
    pub fn refusal(&self) -> Option<Reason> {
        match self {
            Self::Refused(reason) => Some(*reason),
            Self::SlowBody => Some(Reason::slowBody),
            Self::TooLarge => Some(Reason::bodyTooLarge),
            _ => None,
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowBody => StatusCode::REQUEST_TIMEOUT,
            Self::Refused(Reason::requestPerSource | Reason::slotPerSource) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Refused(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

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

/// The bytes of an HTTP error answer of moat's JSON shape.
pub fn error_body(status: StatusCode, message: String) -> Bytes {
    let body = ErrorBody {
        error: ErrorDetail {
            code: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
        },
    };
    // A struct of strings and a number always serialises.
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------------------------
// AdmissionReview

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a> {
    #[serde(default, borrow)]
    api_version: Cow<'a, str>,
    #[serde(default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    request: Option<RequestIn<'a>>,
}

/// `request`, read by hand so that each object is read in the same pass as the envelope: the API
/// server writes `kind` before `object` and `oldObject`, so by then the objects' shape is known
/// and they are read straight into typed templates. An object met before `kind` (never from an
/// API server, but valid JSON) is kept as borrowed raw JSON and read afterwards.
struct RequestIn<'a> {
    uid: String,
    kind: GroupVersionKind,
    sub_resource: Option<String>,
    name: String,
    namespace: Option<String>,
    operation: OperationIn,
    user_info: UserInfo,
    object: ObjectIn<'a>,
    old_object: ObjectIn<'a>,
    dry_run: Option<bool>,
}

/// An object of the review, as far as the envelope's pass got with it.
#[expect(
    clippy::large_enum_variant,
    reason = "two live briefly on the stack per review; boxing would add an allocation to each"
)]
enum ObjectIn<'a> {
    Absent,
    /// Read in the envelope's pass: a template, or why it is no usable one.
    Read(Result<Template, MalformedObject>),
    /// A kind moat does not review.
    Other,
    /// Met before `request.kind`: read afterwards.
    Raw(RawJson<'a>),
}

impl<'de: 'a, 'a> Deserialize<'de> for RequestIn<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RequestVisitor(std::marker::PhantomData))
    }
}

struct RequestVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for RequestVisitor<'a> {
    type Value = RequestIn<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an admission request")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<RequestIn<'a>, A::Error> {
        use serde::de::Error as _;
        let (mut uid, mut kind, mut operation) = (None, None::<GroupVersionKind>, None);
        let mut req = RequestIn {
            uid: String::new(),
            kind: GroupVersionKind::default(),
            sub_resource: None,
            name: String::new(),
            namespace: None,
            operation: OperationIn::Connect,
            user_info: UserInfo::default(),
            object: ObjectIn::Absent,
            old_object: ObjectIn::Absent,
            dry_run: None,
        };
        while let Some(FieldName(key)) = map.next_key()? {
            match &*key {
                "uid" => uid = Some(map.next_value::<String>()?),
                "kind" => kind = Some(map.next_value()?),
                "subResource" => req.sub_resource = map.next_value()?,
                "name" => req.name = map.next_value::<Option<String>>()?.unwrap_or_default(),
                "namespace" => req.namespace = map.next_value()?,
                "operation" => operation = Some(map.next_value::<OperationIn>()?),
                "userInfo" => {
                    req.user_info = map.next_value::<Option<UserInfo>>()?.unwrap_or_default()
                }
                "dryRun" => req.dry_run = map.next_value()?,
                "object" | "oldObject" => {
                    let declared = kind.as_ref().map(GroupVersionKind::reviewed);
                    let read = map.next_value_seed(ObjectSeed(declared))?;
                    if key == "object" {
                        req.object = read;
                    } else {
                        req.old_object = read;
                    }
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        req.uid = uid.ok_or_else(|| A::Error::missing_field("uid"))?;
        req.operation = operation.ok_or_else(|| A::Error::missing_field("operation"))?;
        req.kind = kind.unwrap_or_default();
        Ok(req)
    }
}

/// A key of `request`, borrowed unless it has an escape.
struct FieldName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<FieldName<'de>, E> {
                Ok(FieldName(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads one object: typed when the kind is known (`Some(Some(kind))`), skipped when it is one
/// moat does not review (`Some(None)`), kept raw when the kind is not known yet (`None`).
struct ObjectSeed(Option<Option<Kind>>);

impl<'de> serde::de::DeserializeSeed<'de> for ObjectSeed {
    type Value = ObjectIn<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<ObjectIn<'de>, D::Error> {
        match self.0 {
            None => {
                Ok(Option::<RawJson<'de>>::deserialize(d)?.map_or(ObjectIn::Absent, ObjectIn::Raw))
            }
            Some(None) => Ok(Option::<serde::de::IgnoredAny>::deserialize(d)?
                .map_or(ObjectIn::Absent, |_| ObjectIn::Other)),
            Some(Some(kind)) => d.deserialize_option(TypedObject(kind)),
        }
    }
}

struct TypedObject(Kind);

impl<'de> serde::de::Visitor<'de> for TypedObject {
    type Value = ObjectIn<'static>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<ObjectIn<'static>, E> {
        Ok(ObjectIn::Absent)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<ObjectIn<'static>, E> {
        Ok(ObjectIn::Absent)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<ObjectIn<'static>, D::Error> {
        serde::de::DeserializeSeed::deserialize(TemplateSeed(self.0), d).map(ObjectIn::Read)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

impl GroupVersionKind {
    /// The kind moat reviews that the API server says the objects are.
    fn reviewed(&self) -> Option<Kind> {
        let api_version = if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        };
        Kind::from_type(&api_version, &self.kind)
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum OperationIn {
    Create,
    Update,
    Delete,
    Connect,
}

/// `request.userInfo`: who asks, as the API server authenticated them. Written by the API
/// server, never by the client, so decisions may rest on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// One AdmissionReview request, read: the envelope's facts and the objects as templates.
#[derive(Debug)]
pub struct AdmissionIn {
    /// The review's apiVersion, answered in kind.
    pub api_version: &'static str,
    pub uid: String,
    /// `request.kind.kind`, for logs.
    pub kind: String,
    pub sub_resource: Option<String>,
    pub name: String,
    pub namespace: String,
    pub operation: Operation,
    pub user_info: UserInfo,
    /// `request.object`: `None` when absent (DELETE) or not a kind moat reviews.
    pub object: Option<Template>,
    pub old_object: Option<Template>,
    /// An object of a reviewed kind that is no usable pod template: denied with this reason.
    pub unusable: Option<MalformedObject>,
    /// Whether the request carried an object at all (`object` or `oldObject`).
    pub has_object: bool,
    pub dry_run: bool,
}

impl AdmissionIn {
    /// Reads an AdmissionReview body.
    ///
    /// # Errors
    /// [`RequestError`] naming what is wrong with the body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        let malformed = |e: moat_core::json::Error| RequestError::Malformed {
            kind: "AdmissionReview",
            message: e.to_string(),
        };
        let review: ReviewIn<'_> = moat_core::json::from_slice(body).map_err(malformed)?;
        if review.kind != "AdmissionReview" {
            return Err(RequestError::WrongKind {
                expected: "AdmissionReview",
                got: review.kind.into_owned(),
            });
        }
        let api_version = match &*review.api_version {
            ADMISSION_V1 => ADMISSION_V1,
            ADMISSION_V1BETA1 => ADMISSION_V1BETA1,
            other => return Err(RequestError::UnsupportedVersion(other.to_owned())),
        };
        let req = review.request.ok_or(RequestError::NoRequest)?;
        let declared = req.kind.reviewed();
        let mut unusable = None;
        let mut read = |object: ObjectIn<'_>| -> Result<Option<Template>, RequestError> {
            let read = match object {
                ObjectIn::Absent | ObjectIn::Other => return Ok(None),
                ObjectIn::Read(read) => read,
                ObjectIn::Raw(raw) => {
                    let bytes = raw.get();
                    if !bytes.starts_with(b"{") {
                        return Err(RequestError::Malformed {
                            kind: "AdmissionReview",
                            message: "request.object is not an object".to_owned(),
                        });
                    }
                    // The API server decoded the object before calling, so a field of the
                    // wrong type means the body is not what the API server sends: unreadable,
                    // not a denial.
                    let parsed = match declared {
                        Some(kind) => Template::from_json_as(kind, bytes).map(Some),
                        None => Template::from_json(bytes),
                    };
                    match parsed {
                        Ok(t) => return Ok(t),
                        Err(ReadError::Malformed(e)) => Err(e),
                        Err(e) => {
                            return Err(RequestError::Malformed {
                                kind: "AdmissionReview",
                                message: e.to_string(),
                            });
                        }
                    }
                }
            };
            match read {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    unusable.get_or_insert(e);
                    Ok(None)
                }
            }
        };
        let has_object =
            !matches!(req.object, ObjectIn::Absent) || !matches!(req.old_object, ObjectIn::Absent);
        let (object, old_object) = (read(req.object)?, read(req.old_object)?);
        Ok(Self {
            api_version,
            has_object,
            object,
            old_object,
            unusable,
            uid: req.uid,
            kind: req.kind.kind,
            sub_resource: req.sub_resource.filter(|s| !s.is_empty()),
            name: req.name,
            namespace: req.namespace.unwrap_or_default(),
            operation: match req.operation {
                OperationIn::Create => Operation::Create,
                OperationIn::Update => Operation::Update,
                OperationIn::Delete => Operation::Delete,
                OperationIn::Connect => Operation::Connect,
            },
            user_info: req.user_info,
            dry_run: req.dry_run.unwrap_or(false),
        })
    }

    /// The operation's name as the API server writes it (a metric label).
    pub fn operation_name(&self) -> &'static str {
        match self.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// What an AdmissionReview answer says.
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    /// The denial's message (`status.code` is [`DENIED_STATUS_CODE`]).
    denied: Option<String>,
    /// The JSON Patch, as JSON: written base64 (`patchType: JSONPatch`).
    patch: Option<Vec<u8>>,
    warnings: &'a [String],
}

/// The AdmissionReview answer to `review` for `decision`: allowed (with the patch, base64, when
/// there is one) or denied with every reason; warnings either way.
pub fn admission_answer(review: &AdmissionIn, decision: &Decision) -> Bytes {
    let allowed = decision.allowed();
    review_out(
        review.api_version,
        &ResponseOut {
            uid: &review.uid,
            allowed,
            denied: (!allowed).then(|| decision.message()),
            patch: (allowed && !decision.patch.0.is_empty())
                .then(|| serde_json::to_vec(&decision.patch).ok())
                .flatten(),
            warnings: &decision.warnings,
        },
    )
}

/// An allow with nothing to say (nothing to decide: DELETE without an object, CONNECT).
pub fn admission_allow(review: &AdmissionIn) -> Bytes {
    review_out(
        review.api_version,
        &ResponseOut {
            uid: &review.uid,
            allowed: true,
            denied: None,
            patch: None,
            warnings: &[],
        },
    )
}

/// An object refused because moat cannot read it as its kind (a denial, not an HTTP error:
/// the reason reaches the user instead of `failurePolicy` deciding).
pub fn admission_deny(review: &AdmissionIn, message: String) -> Bytes {
    review_out(
        review.api_version,
        &ResponseOut {
            uid: &review.uid,
            allowed: false,
            denied: Some(message),
            patch: None,
            warnings: &[],
        },
    )
}

/// The AdmissionReview answer's bytes, written by hand: the base64 patch, most of an allowed
/// answer's bytes, is encoded straight into the output with no escaping pass over it (its
/// alphabet needs none), where serialising it as a string scanned every byte again. Strings
/// from the request or the decision go through serde_json's escaping.
fn review_out(api_version: &str, r: &ResponseOut<'_>) -> Bytes {
    use base64::engine::general_purpose::STANDARD;
    let patch_len = r
        .patch
        .as_ref()
        .map_or(0, |p| base64::encoded_len(p.len(), true).unwrap_or(0));
    let mut out = Vec::with_capacity(160 + r.uid.len() + patch_len);
    let string = |out: &mut Vec<u8>, s: &str| {
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    };
    out.extend_from_slice(b"{\"apiVersion\":");
    string(&mut out, api_version);
    out.extend_from_slice(b",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    string(&mut out, r.uid);
    out.extend_from_slice(if r.allowed {
        b",\"allowed\":true"
    } else {
        b",\"allowed\":false"
    });
    if let Some(message) = &r.denied {
        out.extend_from_slice(
            format!(",\"status\":{{\"code\":{DENIED_STATUS_CODE},\"message\":").as_bytes(),
        );
        string(&mut out, message);
        out.push(b'}');
    }
    if let Some(patch) = &r.patch {
        out.extend_from_slice(b",\"patch\":\"");
        let start = out.len();
        out.resize(start + patch_len, 0);
        let written = STANDARD.encode_slice(patch, &mut out[start..]).unwrap_or(0);
        out.truncate(start + written);
        out.extend_from_slice(b"\",\"patchType\":\"JSONPatch\"");
    }
    if !r.warnings.is_empty() {
        out.extend_from_slice(b",\"warnings\":");
        let _ = serde_json::to_writer(&mut out, r.warnings);
    }
    out.extend_from_slice(b"}}");
    Bytes::from(out)
}

fn to_bytes<T: Serialize>(v: &T) -> Bytes {
    // Strings, booleans and numbers only: serialisation cannot fail.
    serde_json::to_vec(v).map(Bytes::from).unwrap_or_default()
}

// ------------------------------------------------------------------------------------------------
// ImageReview (kube-apiserver's ImagePolicyWebhook admission plugin)

/// `imagepolicy.k8s.io/v1alpha1` ImageReview, as the API server sends it. No Rust crate carries
/// it; lenient on input like every wire type.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReviewIn {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub spec: ImageReviewSpec,
}

/// `ImageReview.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReviewSpec {
    #[serde(default)]
    pub containers: Vec<ImageReviewContainer>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub namespace: String,
}

/// One container of `ImageReview.spec.containers`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageReviewContainer {
    #[serde(default)]
    pub image: String,
}

impl ImageReviewIn {
    /// Reads an ImageReview body.
    ///
    /// # Errors
    /// [`RequestError`] naming what is wrong with the body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        let review: Self = serde_json::from_slice(body).map_err(|e| RequestError::Malformed {
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
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageReviewOut<'a> {
    api_version: &'a str,
    kind: &'a str,
    status: ImageReviewStatus,
}

/// `ImageReview.status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageReviewStatus {
    allowed: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    audit_annotations: BTreeMap<String, String>,
}

/// Annotation key of an audited ImageReview's reasons.
const AUDIT_ANNOTATION: &str = "moat.dev/audit";

/// The ImageReview answer: denied with the reasons, or allowed (audited reasons go to an audit
/// annotation).
pub fn image_review_answer(decision: &Decision) -> Bytes {
    let join = |d: &[moat_core::decision::Denial]| {
        d.iter()
            .map(|d| d.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut status = ImageReviewStatus {
        allowed: decision.allowed(),
        ..ImageReviewStatus::default()
    };
    if !decision.allowed() {
        status.reason = join(&decision.denials);
    } else if !decision.audited.is_empty() {
        status
            .audit_annotations
            .insert(AUDIT_ANNOTATION.to_owned(), join(&decision.audited));
    }
    to_bytes(&ImageReviewOut {
        api_version: IMAGEPOLICY_V1ALPHA1,
        kind: "ImageReview",
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written answer is the JSON serde would write: escapes in every string from
    /// the request or the decision, the patch base64, fields present only when set.
    #[test]
    fn the_written_answer_is_the_json_of_its_fields() {
        use base64::Engine as _;
        use serde_json::json;
        let tricky = "a \"quoted\" \\ line\nwith\ttabs, \u{7f}\u{1}, é and ☃";
        let patch = br#"[{"op":"add","path":"/spec/runtimeClassName","value":"gvisor \"x\""}]"#;
        let warnings = vec![tricky.to_owned(), "second".to_owned()];
        let cases = [
            (
                ResponseOut {
                    uid: tricky,
                    allowed: true,
                    denied: None,
                    patch: Some(patch.to_vec()),
                    warnings: &warnings,
                },
                json!({"uid": tricky, "allowed": true,
                       "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                       "patchType": "JSONPatch", "warnings": warnings}),
            ),
            (
                ResponseOut {
                    uid: "u",
                    allowed: false,
                    denied: Some(tricky.to_owned()),
                    patch: None,
                    warnings: &[],
                },
                json!({"uid": "u", "allowed": false, "status": {"code": 403, "message": tricky}}),
            ),
            (
                ResponseOut {
                    uid: "u",
                    allowed: true,
                    denied: None,
                    patch: None,
                    warnings: &[],
                },
                json!({"uid": "u", "allowed": true}),
            ),
        ];
        for version in ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] {
            for (response, expected) in &cases {
                let bytes = review_out(version, response);
                let written: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
                assert_eq!(
                    written,
                    json!({"apiVersion": version, "kind": "AdmissionReview", "response": expected})
                );
            }
        }
    }

    const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"a":"b"}},"spec":{"containers":[{"name":"c","image":"x:1"}],"tolerations":[{"key":"k","operator":"Exists"}]}}"#;
    const KIND: &str = r#"{"group":"","version":"v1","kind":"Pod"}"#;

    fn review(request_fields: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{{request_fields}}}}}"#
        )
    }

    #[test]
    fn objects_read_in_the_envelopes_pass_or_after_it_agree() {
        // As the API server writes it: kind before object, read in one pass.
        let in_order = review(&format!(
            r#""uid":"u","kind":{KIND},"operation":"UPDATE","userInfo":{{"username":"a"}},"object":{POD},"oldObject":{POD}"#
        ));
        // Object first: kept raw, read once the kind is known.
        let object_first = review(&format!(
            r#""object":{POD},"oldObject":{POD},"uid":"u","operation":"UPDATE","kind":{KIND}"#
        ));
        let a = AdmissionIn::parse(in_order.as_bytes()).unwrap();
        let b = AdmissionIn::parse(object_first.as_bytes()).unwrap();
        let direct = Template::from_json(POD.as_bytes()).unwrap();
        assert_eq!(a.object, direct);
        assert_eq!(a.old_object, direct);
        assert_eq!(b.object, direct);
        assert_eq!(b.old_object, direct);
        assert!(a.has_object && b.has_object);
        assert_eq!(a.user_info.username, "a");
    }

    /// Every captured review read by the field-selective reader gives what serde_json's whole
    /// tree of it says: the same envelope facts and the same templates, hence the same decision.
    #[test]
    fn every_captured_review_reads_as_its_json_tree_says() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut read = 0;
        for dir in ["", "kube-apiserver-1.26", "kube-apiserver-1.34"] {
            for entry in std::fs::read_dir(data.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let body = std::fs::read(&path).unwrap();
                let tree: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if tree["kind"] != "AdmissionReview" {
                    continue;
                }
                let r = AdmissionIn::parse(&body).unwrap();
                let req = &tree["request"];
                let name = path.display();
                assert_eq!(r.uid, req["uid"].as_str().unwrap(), "{name}");
                assert_eq!(
                    r.namespace,
                    req["namespace"].as_str().unwrap_or(""),
                    "{name}"
                );
                assert_eq!(r.operation_name(), req["operation"], "{name}");
                assert_eq!(r.user_info.username, req["userInfo"]["username"], "{name}");
                assert_eq!(
                    r.dry_run,
                    req["dryRun"].as_bool().unwrap_or(false),
                    "{name}"
                );
                assert_eq!(
                    r.object,
                    Template::from_value(&req["object"]).unwrap(),
                    "{name}"
                );
                assert_eq!(
                    r.old_object,
                    Template::from_value(&req["oldObject"]).unwrap(),
                    "{name}"
                );
                read += 1;
            }
        }
        assert!(read >= 35, "fixtures missing: {read}");
    }

    #[test]
    fn objects_of_other_kinds_and_null_objects_are_not_read() {
        let other = review(
            r#""uid":"u","kind":{"group":"","version":"v1","kind":"Service"},"operation":"CREATE","object":{"spec":{"containers":3}}"#,
        );
        let r = AdmissionIn::parse(other.as_bytes()).unwrap();
        assert!(r.object.is_none() && r.has_object && r.unusable.is_none());
        let deleted = review(&format!(
            r#""uid":"u","kind":{KIND},"operation":"DELETE","object":null,"oldObject":{POD}"#
        ));
        let r = AdmissionIn::parse(deleted.as_bytes()).unwrap();
        assert!(r.object.is_none() && r.old_object.is_some());
        let wrong = review(&format!(
            r#""uid":"u","kind":{KIND},"operation":"CREATE","object":{{"spec":{{"containers":"x"}}}}"#
        ));
        assert!(matches!(
            AdmissionIn::parse(wrong.as_bytes()),
            Err(RequestError::Malformed { .. })
        ));
        let no_spec = review(&format!(
            r#""uid":"u","kind":{KIND},"operation":"CREATE","object":{{"metadata":{{}}}}"#
        ));
        let r = AdmissionIn::parse(no_spec.as_bytes()).unwrap();
        assert!(
            r.unusable
                .is_some_and(|e| e.message.contains("pod spec is missing"))
        );
    }
}
