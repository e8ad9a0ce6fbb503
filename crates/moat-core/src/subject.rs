//! What is being reviewed: a Pod, or a workload that carries a pod template. Finds the template
//! and reads it leniently (API servers add fields over time, so nothing here rejects unknown
//! ones).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::Deserialize;
use serde_json::Value;

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

/// The metadata fields the policies read. Lenient: unknown fields are skipped.
///
/// moat reads views instead of `k8s_openapi`'s whole `ObjectMeta` and `PodSpec` because
/// deserialising every probe, env var and managed field of a pod costs more than the decision
/// itself; the placement types it does read (`Toleration`, `Affinity`, `OwnerReference`) are
/// `k8s_openapi`'s own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView {
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub owner_references: Option<Vec<OwnerReference>>,
}

/// One container of any kind: only what the image policy reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
}

/// The pod spec fields the policies read. Lenient: unknown fields are skipped.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub ephemeral_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default)]
    pub affinity: Option<Affinity>,
    #[serde(default)]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub runtime_class_name: Option<String>,
}

/// A pod template read from an object: typed views for deciding, plus its location for patching.
#[derive(Debug, Clone)]
pub struct Template {
    pub kind: Kind,
    pub metadata: MetaView,
    pub spec: PodSpecView,
}

impl Template {
    /// Reads the template of `object`, whose kind is `kind`.
    ///
    /// # Errors
    /// [`MalformedObject`] when the template is missing or a field has the wrong type.
    pub fn read(kind: Kind, object: &Value) -> Result<Self, MalformedObject> {
        let err = |field: &str, message: String| MalformedObject {
            kind: kind.as_str(),
            field: format!("{}{field}", kind.field_prefix()),
            message,
        };
        let tpl = object
            .pointer(kind.template_pointer())
            .ok_or_else(|| err("", "pod template is missing".to_owned()))?;
        let metadata = match tpl.get("metadata") {
            None | Some(Value::Null) => MetaView::default(),
            Some(m) => MetaView::deserialize(m).map_err(|e| err("metadata", e.to_string()))?,
        };
        let spec = match tpl.get("spec") {
            None | Some(Value::Null) => return Err(err("spec", "pod spec is missing".to_owned())),
            Some(s) => PodSpecView::deserialize(s).map_err(|e| err("spec", e.to_string()))?,
        };
        Ok(Self {
            kind,
            metadata,
            spec,
        })
    }

    /// A template label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// A value of the pod spec's `nodeSelector`.
    pub fn node_selector(&self, key: &str) -> Option<&str> {
        self.spec
            .node_selector
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// A template annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
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

/// An object reduced to the fields the policies read, as JSON: `apiVersion`, `kind`, the
/// metadata of [`MetaView`] and name/namespace, and of each pod spec (the object's own, or a
/// workload's template) the fields of [`PodSpecView`], with containers cut down to `name` and
/// `image`.
///
/// Deciding on this instead of the whole object gives the same decision and a patch that applies
/// to the whole object (every field a patch touches is kept whole), at a fraction of the cost of
/// building a JSON tree of every probe, env var and managed field. Deserialisation fails where
/// a kept field has the wrong type (a caller that wants [`MalformedObject`]'s message reads the
/// whole object instead).
#[derive(Debug, Clone, PartialEq)]
pub struct Pruned(pub Value);

impl<'de> Deserialize<'de> for Pruned {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = pruned::Object::deserialize(d)?;
        serde_json::to_value(object)
            .map(Pruned)
            .map_err(serde::de::Error::custom)
    }
}

mod pruned {
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Object {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_version: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Meta>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<Spec>,
    }

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generate_name: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        annotations: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_references: Option<Value>,
    }

    #[derive(Deserialize, Serialize)]
    struct Container {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<Value>,
    }

    /// A pod spec, or a workload spec holding a template (or a CronJob's job template).
    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        containers: Option<Vec<Container>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_containers: Option<Vec<Container>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ephemeral_containers: Option<Vec<Container>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tolerations: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        affinity: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_selector: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_name: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime_class_name: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<Box<Template>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_template: Option<Box<JobTemplate>>,
    }

    #[derive(Deserialize, Serialize)]
    struct Template {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Meta>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<Spec>,
    }

    #[derive(Deserialize, Serialize)]
    struct JobTemplate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<Spec>,
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

    #[test]
    fn reads_cronjob_templates() {
        let obj = json!({"spec": {"jobTemplate": {"spec": {"template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}}}});
        let t = Template::read(Kind::CronJob, &obj).unwrap();
        assert_eq!(t.label("a"), Some("b"));
        assert_eq!(t.spec.containers[0].name, "c");
    }

    #[test]
    fn names_the_malformed_field() {
        let obj = json!({"spec": {"template": {"spec": {"containers": "nope"}}}});
        let e = Template::read(Kind::Deployment, &obj).unwrap_err();
        assert_eq!(e.field, "spec.template.spec");
        let e = Template::read(Kind::Job, &json!({"spec": {}})).unwrap_err();
        assert!(e.to_string().contains("pod template is missing"), "{e}");
        let e = Template::read(Kind::Pod, &json!({"metadata": {}})).unwrap_err();
        assert!(e.to_string().contains("pod spec is missing"), "{e}");
    }

    #[test]
    fn pruning_keeps_what_policies_read() {
        let obj = json!({
            "apiVersion": "apps/v1", "kind": "CronJob",
            "metadata": {"name": "c", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {
                "metadata": {"labels": {"moat.dev/class": "gold"}},
                "spec": {"containers": [{"name": "c", "image": "x:1", "env": [{"name": "A"}]}], "tolerations": [], "volumes": []}}}}},
        });
        let pruned: Pruned = serde_json::from_value(obj).unwrap();
        assert_eq!(
            pruned.0,
            json!({
                "apiVersion": "apps/v1", "kind": "CronJob",
                "metadata": {"name": "c", "labels": {"a": "b"}},
                "spec": {"jobTemplate": {"spec": {"template": {
                    "metadata": {"labels": {"moat.dev/class": "gold"}},
                    "spec": {"containers": [{"name": "c", "image": "x:1"}], "tolerations": []}}}}},
            })
        );
        assert!(serde_json::from_value::<Pruned>(json!({"spec": {"containers": "x"}})).is_err());
    }

    #[test]
    fn tolerates_unknown_fields() {
        let obj = json!({"spec": {"futureField": 1, "containers": [{"name": "c", "image": "x:1", "newThing": {}}]}});
        assert!(Template::read(Kind::Pod, &obj).is_ok());
    }
}
