//! SIG Autoscaling's CapacityBuffer (`autoscaling.x-k8s.io`), written from its documented API:
//! spare capacity an autoscaler keeps up by simulating placeholder pods shaped by a PodTemplate
//! in the same namespace. Wire types: unknown fields tolerated, absent optional fields not
//! written.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `kind` of a CapacityBuffer.
pub const KIND: &str = "CapacityBuffer";
/// The API group; the version is the operator's choice ([`Version`]).
pub const GROUP: &str = "autoscaling.x-k8s.io";
/// The default strategy: the autoscaler keeps the capacity up with placeholder pods that real
/// pods displace.
pub const ACTIVE_CAPACITY: &str = "buffer.x-k8s.io/active-capacity";

/// The CapacityBuffer API version an autoscaler serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `autoscaling.x-k8s.io/v1beta1`: Karpenter's CapacityBuffer CRD (the only version it
    /// serves) and the Cluster Autoscaler from Kubernetes 1.35.
    V1beta1,
    /// `autoscaling.x-k8s.io/v1alpha1`: earlier Cluster Autoscalers only (Karpenter does not
    /// serve it).
    V1alpha1,
}

impl Version {
    /// The `apiVersion` string.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::V1beta1 => "autoscaling.x-k8s.io/v1beta1",
            Self::V1alpha1 => "autoscaling.x-k8s.io/v1alpha1",
        }
    }
}

/// A CapacityBuffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityBuffer {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CapacityBufferSpec,
}

/// `spec` of a CapacityBuffer. One of `podTemplateRef` and `scalableRef` shapes a chunk;
/// `replicas`, `percentage` (of the scalable object) or `limits` say how many chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityBufferSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_ref: Option<LocalObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scalable_ref: Option<ScalableRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<BTreeMap<String, String>>,
}

/// A PodTemplate in the buffer's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    pub name: String,
}

/// An object with a scale subresource in the buffer's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalableRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    pub kind: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_field_round_trips() {
        for text in [
            "apiVersion: autoscaling.x-k8s.io/v1beta1\nkind: CapacityBuffer\nmetadata: {name: a, namespace: b}\nspec: {provisioningStrategy: buffer.x-k8s.io/active-capacity, podTemplateRef: {name: t}, replicas: 3, limits: {cpu: '20', memory: 40Gi}}",
            "apiVersion: autoscaling.x-k8s.io/v1alpha1\nkind: CapacityBuffer\nmetadata: {name: a}\nspec: {scalableRef: {apiGroup: apps, kind: Deployment, name: web}, percentage: 20}",
        ] {
            let value: serde_json::Value = serde_yaml_ng::from_str(text).unwrap();
            let buffer: CapacityBuffer = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(serde_json::to_value(&buffer).unwrap(), value, "{text}");
        }
    }
}
