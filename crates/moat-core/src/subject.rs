//! What is being reviewed: a Pod, or a workload that carries a pod template. Finds the template
//! and reads it leniently (API servers add fields over time, so nothing here rejects unknown
//! ones).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::Deserialize;
use serde_json::Value;

use std::collections::BTreeMap;

use crate::fields::PodFields;

/// A kind moat reviews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
    ReplicationController,
}

impl Kind {
    /// Recognises `apiVersion` and `kind`. Only the group matters: every served version of
    /// these kinds has the same template layout.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        Some(match (group, kind) {
            ("", "Pod") => Self::Pod,
            ("", "ReplicationController") => Self::ReplicationController,
            ("apps", "Deployment") => Self::Deployment,
            ("apps", "ReplicaSet") => Self::ReplicaSet,
            ("apps", "StatefulSet") => Self::StatefulSet,
            ("apps", "DaemonSet") => Self::DaemonSet,
            ("batch", "Job") => Self::Job,
            ("batch", "CronJob") => Self::CronJob,
            _ => return None,
        })
    }

    /// JSON Pointer of the pod template (`metadata` + `spec`) inside the object.
    pub fn template_pointer(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::CronJob => "/spec/jobTemplate/spec/template",
            _ => "/spec/template",
        }
    }

    /// The same location written as a field path for messages (`spec.template.`).
    pub fn field_prefix(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::CronJob => "spec.jobTemplate.spec.template.",
            _ => "spec.template.",
        }
    }

    /// The Kubernetes name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::ReplicaSet => "ReplicaSet",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
            Self::ReplicationController => "ReplicationController",
        }
    }
}

/// The object does not have the shape its kind requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} '{field}' does not parse: {message}")]
pub struct MalformedObject {
    pub kind: &'static str,
    pub field: String,
    pub message: String,
}

/// Why an object could not be read from JSON bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Not JSON where it is read, or a field the policies read has the wrong type.
    #[error(transparent)]
    Json(#[from] crate::json::Error),
    /// JSON of a reviewed kind, but no usable pod template.
    #[error(transparent)]
    Malformed(#[from] MalformedObject),
}

/// The metadata fields the policies read, other than labels and annotations (which are in
/// [`PodFields`]). Lenient: unknown fields are skipped.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView {
    #[serde(default)]
    pub owner_references: Option<Vec<OwnerReference>>,
}

/// One container of any kind: only what the image policy reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
}

/// The pod spec fields the policies read and do not change. Lenient: unknown fields are skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSpecView {
    pub containers: Vec<ContainerView>,
    pub init_containers: Option<Vec<ContainerView>>,
    pub ephemeral_containers: Option<Vec<ContainerView>>,
    pub node_name: Option<String>,
    pub scheduler_name: Option<String>,
    /// `spec.serviceAccountName` (or the deprecated `serviceAccount`), as sent.
    pub service_account_name: Option<String>,
    /// Volumes of the `image` type: images the kubelet pulls like a container's.
    pub image_volumes: Vec<ImageVolume>,
}

/// A volume backed by an image (`spec.volumes[i].image.reference`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageVolume {
    /// Index in `spec.volumes`.
    pub index: usize,
    pub name: String,
    pub reference: Option<String>,
}

/// A pod template as the policies see it: what they read ([`MetaView`], [`PodSpecView`]) and,
/// apart, the only fields a policy may change ([`PodFields`]).
///
/// moat reads these views instead of `k8s_openapi`'s whole `ObjectMeta` and `PodSpec` because
/// deserialising every probe, env var and managed field of a pod costs more than the decision
/// itself; the placement types it does read (`Toleration`, `Affinity`, `OwnerReference`) are
/// `k8s_openapi`'s own.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub kind: Kind,
    pub metadata: MetaView,
    pub spec: PodSpecView,
    /// The fields moat may change, as the object carries them.
    pub fields: PodFields,
    /// Whether the template has a `metadata` object (a patch that adds a label must create it
    /// otherwise).
    pub has_metadata: bool,
}

impl Template {
    /// Reads the template of a JSON object (offline review, tests). `Ok(None)`: not a kind moat
    /// reviews.
    ///
    /// # Errors
    /// [`MalformedObject`] naming the template part (`spec.template.spec`) that does not parse.
    pub fn from_value(object: &Value) -> Result<Option<Self>, MalformedObject> {
        let Some(kind) = type_of(object) else {
            return Ok(None);
        };
        let err = |field: &str, message: String| MalformedObject {
            kind: kind.as_str(),
            field: format!("{}{field}", kind.field_prefix()),
            message,
        };
        let tpl = object
            .pointer(kind.template_pointer())
            .ok_or_else(|| err("", "pod template is missing".to_owned()))?;
        let metadata = match tpl.get("metadata") {
            None | Some(Value::Null) => None,
            Some(m) => {
                Some(wire::Meta::deserialize(m).map_err(|e| err("metadata", e.to_string()))?)
            }
        };
        let spec = match tpl.get("spec") {
            None | Some(Value::Null) => None,
            Some(s) => Some(wire::Spec::deserialize(s).map_err(|e| err("spec", e.to_string()))?),
        };
        Self::assemble(kind, metadata, spec)
            .map(Some)
            .map_err(|m| err("spec", m.to_owned()))
    }

    /// Reads the template of an object from JSON bytes in one typed pass (the admission server),
    /// skipping every field no policy reads. `Ok(None)`: not a kind moat reviews.
    ///
    /// # Errors
    /// [`ReadError::Json`] when the JSON does not parse or a field policies read has the wrong
    /// type; [`ReadError::Malformed`] when it parses but is no usable pod template (no template,
    /// no spec, no containers).
    pub fn from_json(bytes: &[u8]) -> Result<Option<Self>, ReadError> {
        // The kind decides the shape of the rest, and a kind moat does not review may use the
        // same field names for anything: read the type first.
        let types: wire::Types<'_> = crate::json::from_slice(bytes)?;
        match Kind::from_type(&types.api_version, &types.kind) {
            Some(kind) => Self::from_json_as(kind, bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Reads the template of an object whose kind is already known (the admission server takes
    /// it from the review's `request.kind`, which the API server writes), in one pass of
    /// [`crate::json`]'s field-selective reader.
    ///
    /// # Errors
    /// As [`Template::from_json`].
    pub fn from_json_as(kind: Kind, bytes: &[u8]) -> Result<Self, ReadError> {
        Ok(crate::json::from_slice_seed(bytes, TemplateSeed(kind))??)
    }

    fn assemble(
        kind: Kind,
        metadata: Option<wire::Meta>,
        spec: Option<wire::Spec>,
    ) -> Result<Self, &'static str> {
        let spec = spec.ok_or("pod spec is missing")?;
        let containers = spec.containers.ok_or("missing field `containers`")?;
        let has_metadata = metadata.is_some();
        let metadata = metadata.unwrap_or_default();
        Ok(Self {
            kind,
            metadata: MetaView {
                owner_references: metadata.owner_references,
            },
            spec: PodSpecView {
                containers,
                init_containers: spec.init_containers,
                ephemeral_containers: spec.ephemeral_containers,
                node_name: spec.node_name,
                scheduler_name: spec.scheduler_name,
                service_account_name: spec.service_account_name.or(spec.service_account),
                image_volumes: spec
                    .volumes
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .filter_map(|(index, v)| {
                        Some(ImageVolume {
                            index,
                            name: v.name,
                            reference: v.image?.reference,
                        })
                    })
                    .collect(),
            },
            fields: PodFields {
                labels: metadata.labels,
                annotations: metadata.annotations,
                runtime_class_name: spec.runtime_class_name,
                tolerations: spec.tolerations,
                affinity: spec.affinity,
                node_selector: spec.node_selector,
                image_pins: BTreeMap::new(),
            },
            has_metadata,
        })
    }

    /// A template label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.fields.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// A value of the pod spec's `nodeSelector`.
    pub fn node_selector(&self, key: &str) -> Option<&str> {
        self.fields
            .node_selector
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// A template annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.fields
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// Whether a DaemonSet controls this pod (or this is a DaemonSet's template).
    pub fn is_daemonset_pod(&self) -> bool {
        self.kind == Kind::DaemonSet
            || self.metadata.owner_references.as_ref().is_some_and(|refs| {
                refs.iter().any(|r| {
                    r.controller == Some(true)
                        && r.kind == "DaemonSet"
                        && r.api_version.starts_with("apps/")
                })
            })
    }
}

/// Reads the template of an object of a known kind straight from any deserializer (the admission
/// server reads it inside the review envelope, in the same pass). The outer error is the
/// deserializer's (bad JSON, a field of the wrong type); the inner one an object that parses but
/// is no usable pod template.
#[derive(Debug, Clone, Copy)]
pub struct TemplateSeed(pub Kind);

impl<'de> serde::de::DeserializeSeed<'de> for TemplateSeed {
    type Value = Result<Template, MalformedObject>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let kind = self.0;
        let template = match kind {
            Kind::Pod => Some(wire::Template::deserialize(d)?),
            Kind::CronJob => wire::CronJob::deserialize(d)?
                .spec
                .and_then(|s| s.job_template)
                .and_then(|j| j.spec)
                .and_then(|s| s.template),
            _ => wire::Workload::deserialize(d)?
                .spec
                .and_then(|s| s.template),
        };
        let err = |field: &str, message: &str| MalformedObject {
            kind: kind.as_str(),
            field: format!("{}{field}", kind.field_prefix()),
            message: message.to_owned(),
        };
        Ok(template
            .ok_or_else(|| err("", "pod template is missing"))
            .and_then(|t| Template::assemble(kind, t.metadata, t.spec).map_err(|m| err("spec", m))))
    }
}

/// The kind of a JSON object, from its `apiVersion` and `kind`.
pub fn type_of(object: &Value) -> Option<Kind> {
    let api_version = object.get("apiVersion")?.as_str()?;
    let kind = object.get("kind")?.as_str()?;
    Kind::from_type(api_version, kind)
}

/// The shapes read from the wire: exactly the fields some policy reads, everything else skipped
/// by the parser without building it.
mod wire {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Affinity, Toleration};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use serde::Deserialize;

    use super::ContainerView;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Types<'a> {
        #[serde(default, borrow)]
        pub(super) api_version: Cow<'a, str>,
        #[serde(default, borrow)]
        pub(super) kind: Cow<'a, str>,
    }

    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Meta {
        #[serde(default)]
        pub(super) labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        pub(super) annotations: Option<BTreeMap<String, String>>,
        #[serde(default)]
        pub(super) owner_references: Option<Vec<OwnerReference>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Spec {
        #[serde(default)]
        pub(super) containers: Option<Vec<ContainerView>>,
        #[serde(default)]
        pub(super) init_containers: Option<Vec<ContainerView>>,
        #[serde(default)]
        pub(super) ephemeral_containers: Option<Vec<ContainerView>>,
        #[serde(default)]
        pub(super) tolerations: Option<Vec<Toleration>>,
        #[serde(default)]
        pub(super) affinity: Option<Affinity>,
        #[serde(default)]
        pub(super) node_selector: Option<BTreeMap<String, String>>,
        #[serde(default)]
        pub(super) node_name: Option<String>,
        #[serde(default)]
        pub(super) runtime_class_name: Option<String>,
        #[serde(default)]
        pub(super) scheduler_name: Option<String>,
        #[serde(default)]
        pub(super) service_account_name: Option<String>,
        #[serde(default)]
        pub(super) service_account: Option<String>,
        #[serde(default)]
        pub(super) volumes: Option<Vec<Volume>>,
    }

    /// A volume: only an image volume's reference is read.
    #[derive(Deserialize)]
    pub(super) struct Volume {
        #[serde(default)]
        pub(super) name: String,
        #[serde(default)]
        pub(super) image: Option<ImageSource>,
    }

    #[derive(Deserialize)]
    pub(super) struct ImageSource {
        #[serde(default)]
        pub(super) reference: Option<String>,
    }

    /// A Pod, or a pod template.
    #[derive(Deserialize)]
    pub(super) struct Template {
        #[serde(default)]
        pub(super) metadata: Option<Meta>,
        #[serde(default)]
        pub(super) spec: Option<Spec>,
    }

    #[derive(Deserialize)]
    pub(super) struct Workload {
        #[serde(default)]
        pub(super) spec: Option<WorkloadSpec>,
    }

    #[derive(Deserialize)]
    pub(super) struct WorkloadSpec {
        #[serde(default)]
        pub(super) template: Option<Template>,
    }

    #[derive(Deserialize)]
    pub(super) struct CronJob {
        #[serde(default)]
        pub(super) spec: Option<CronJobSpec>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct CronJobSpec {
        #[serde(default)]
        pub(super) job_template: Option<Workload>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_kinds_by_group() {
        let cases: &[(&str, &str, Option<Kind>)] = &[
            ("v1", "Pod", Some(Kind::Pod)),
            ("apps/v1", "Deployment", Some(Kind::Deployment)),
            ("apps/v1beta2", "DaemonSet", Some(Kind::DaemonSet)),
            ("batch/v1", "CronJob", Some(Kind::CronJob)),
            (
                "v1",
                "ReplicationController",
                Some(Kind::ReplicationController),
            ),
            ("v1", "Service", None),
            ("example.com/v1", "Pod", None),
            ("apps/v1", "Pod", None),
        ];
        for (api_version, kind, want) in cases {
            assert_eq!(
                Kind::from_type(api_version, kind),
                *want,
                "{api_version} {kind}"
            );
        }
    }

    /// Both readers, on the same object.
    fn both(obj: &Value) -> Template {
        let from_value = Template::from_value(obj).unwrap().unwrap();
        let from_json = Template::from_json(&serde_json::to_vec(obj).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(from_value, from_json);
        let bytes = serde_json::to_vec(obj).unwrap();
        assert_eq!(
            Template::from_json_as(from_value.kind, &bytes).unwrap(),
            from_value
        );
        from_value
    }

    #[test]
    fn reads_cronjob_templates() {
        let obj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}}}});
        let t = both(&obj);
        assert_eq!(t.label("a"), Some("b"));
        assert_eq!(t.spec.containers[0].name, "c");
    }

    #[test]
    fn names_the_malformed_field() {
        let obj = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": {"containers": "nope"}}}});
        let e = Template::from_value(&obj).unwrap_err();
        assert_eq!(e.field, "spec.template.spec");
        assert!(Template::from_json(&serde_json::to_vec(&obj).unwrap()).is_err());
        let e = Template::from_value(&json!({"apiVersion": "batch/v1", "kind": "Job", "spec": {}}))
            .unwrap_err();
        assert!(e.to_string().contains("pod template is missing"), "{e}");
        let e = Template::from_value(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}))
            .unwrap_err();
        assert!(e.to_string().contains("pod spec is missing"), "{e}");
        let e = Template::from_json(br#"{"apiVersion": "v1", "kind": "Pod", "metadata": {}}"#)
            .unwrap_err();
        assert!(matches!(e, ReadError::Malformed(_)), "{e}");
        assert!(e.to_string().contains("pod spec is missing"), "{e}");
        let e =
            Template::from_json(br#"{"apiVersion": "v1", "kind": "Pod", "spec": {}}"#).unwrap_err();
        assert!(e.to_string().contains("containers"), "{e}");
        let e = Template::from_json(
            br#"{"apiVersion": "v1", "kind": "Pod", "spec": {"containers": 3}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ReadError::Json(_)), "{e}");
    }

    #[test]
    fn other_kinds_are_not_read() {
        // A kind moat does not review may use the policies' field names for anything.
        let svc = json!({"apiVersion": "v1", "kind": "Service", "spec": {"containers": 3, "template": "x"}});
        assert_eq!(Template::from_value(&svc).unwrap(), None);
        assert_eq!(
            Template::from_json(&serde_json::to_vec(&svc).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn keeps_the_changeable_fields_apart() {
        let obj = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
            "spec": {"containers": [{"name": "c", "image": "x:1", "env": [{"name": "A"}]}],
                     "tolerations": [], "runtimeClassName": "gvisor", "nodeSelector": {"k": "v"}, "volumes": []}});
        let t = both(&obj);
        assert!(t.has_metadata);
        assert_eq!(t.fields.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(t.fields.tolerations, Some(vec![]));
        assert_eq!(t.node_selector("k"), Some("v"));
        assert_eq!(t.label("a"), Some("b"));
        let bare = both(&json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []}}));
        assert!(!bare.has_metadata);
    }

    #[test]
    fn tolerates_unknown_fields() {
        let obj = json!({"apiVersion": "v1", "kind": "Pod", "spec": {"futureField": 1, "containers": [{"name": "c", "image": "x:1", "newThing": {}}]}});
        both(&obj);
    }
}
