//! Karpenter's `karpenter.sh/v1` NodePool, written from its documented v1 API: the fields moat
//! writes and the ones an operator may add by hand, so a NodePool read back keeps them. Wire
//! types: no `deny_unknown_fields` (newer Karpenter versions add fields), absent optional
//! fields are not written.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `apiVersion` of the NodePools moat writes.
pub const API_VERSION: &str = "karpenter.sh/v1";
/// `kind` of a NodePool.
pub const KIND: &str = "NodePool";

/// A NodePool: the nodes Karpenter may launch for pods that fit its template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePool {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NodePoolSpec,
}

/// `spec` of a NodePool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolSpec {
    /// What every NodeClaim (and so every node) of the pool is made from.
    pub template: NodeClaimTemplate,
    /// When Karpenter may remove or replace the pool's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<Disruption>,
    /// Most resources the pool's nodes may hold together (`cpu`, `memory`, extended resources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<BTreeMap<String, String>>,
    /// Preference among pools a pod fits (higher first); unset is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// `spec.template`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaimTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    pub spec: NodeClaimTemplateSpec,
}

/// `spec.template.metadata`: labels and annotations every node of the pool gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// `spec.template.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaimTemplateSpec {
    /// Node-selector requirements the pool's nodes meet; pods narrow them further. Required
    /// by the API, possibly empty.
    pub requirements: Vec<NodeSelectorRequirementWithMinValues>,
    /// The provider's node class (instance image, network, …): moat never guesses it.
    pub node_class_ref: NodeClassReference,
    /// Taints every node of the pool carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taints: Option<Vec<Taint>>,
    /// Taints applied at start that something else removes; pods need not tolerate them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_taints: Option<Vec<Taint>>,
    /// Node lifetime before replacement (`720h`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<String>,
    /// Longest a node may take to drain once disrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period: Option<String>,
}

/// One requirement: a Kubernetes node-selector requirement with an optional minimum number of
/// distinct values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorRequirementWithMinValues {
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`, `Lt`.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_values: Option<i32>,
}

/// `spec.template.spec.nodeClassRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeClassReference {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// `spec.disruption`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disruption {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation_policy: Option<ConsolidationPolicy>,
    /// How long a node must be consolidatable (for `WhenEmpty`: empty) before it goes:
    /// a duration (`30s`, `1h30m`) or `Never`.
    pub consolidate_after: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<Vec<Budget>>,
}

/// Which nodes consolidation may remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsolidationPolicy {
    /// Only nodes with no workload pods.
    WhenEmpty,
    /// Also nodes whose pods fit elsewhere.
    WhenEmptyOrUnderutilized,
}

/// One disruption budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// How many nodes (or what percentage) may be disrupted at once.
    pub nodes: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
}

/// Label domains Karpenter refuses in a NodePool's labels and requirements (the kubelet's own
/// or Karpenter's), and the sub-domains it allows all the same.
const RESTRICTED_DOMAINS: &[&str] = &["kubernetes.io", "k8s.io", "karpenter.sh"];
const ALLOWED_SUBDOMAINS: &[&str] = &[
    "node-restriction.kubernetes.io",
    "node.kubernetes.io",
    "kops.k8s.io",
];

/// Whether Karpenter accepts `key` as a label a NodePool sets or lets pods choose.
pub fn allows_label(key: &str) -> bool {
    let Some((domain, _)) = key.split_once('/') else {
        return true;
    };
    let under = |d: &str, parent: &str| d == parent || d.ends_with(&format!(".{parent}"));
    ALLOWED_SUBDOMAINS.iter().any(|a| under(domain, a))
        || !RESTRICTED_DOMAINS.iter().any(|r| under(domain, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NodePool using every field of the documented v1 API (values made up).
    const EVERY_FIELD: &str = r#"
apiVersion: karpenter.sh/v1
kind: NodePool
metadata:
  name: general
spec:
  template:
    metadata:
      labels: {team: a}
      annotations: {note: b}
    spec:
      nodeClassRef: {group: example.dev, kind: ExampleNodeClass, name: standard}
      taints: [{key: dedicated, value: a, effect: NoSchedule}]
      startupTaints: [{key: agent-not-ready, effect: NoExecute}]
      expireAfter: 720h
      terminationGracePeriod: 48h
      requirements:
        - {key: kubernetes.io/arch, operator: In, values: [amd64, arm64], minValues: 2}
        - {key: team, operator: Exists}
  disruption:
    consolidationPolicy: WhenEmptyOrUnderutilized
    consolidateAfter: 1m
    budgets:
      - {nodes: 10%}
      - {nodes: "0", schedule: "0 9 * * mon-fri", duration: 8h, reasons: [Drifted, Underutilized]}
  limits: {cpu: "1000", memory: 1000Gi}
  weight: 10
"#;

    #[test]
    fn every_documented_field_round_trips() {
        let value: serde_json::Value = serde_yaml_ng::from_str(EVERY_FIELD).unwrap();
        let pool: NodePool = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(&pool).unwrap(), value);
        assert_eq!(
            pool.spec.disruption.unwrap().consolidation_policy,
            Some(ConsolidationPolicy::WhenEmptyOrUnderutilized)
        );
    }

    #[test]
    fn unknown_fields_from_newer_versions_are_tolerated() {
        let mut value: serde_json::Value = serde_yaml_ng::from_str(EVERY_FIELD).unwrap();
        value["spec"]["replicas"] = 3.into();
        value["status"] = serde_json::json!({"conditions": []});
        assert!(serde_json::from_value::<NodePool>(value).is_ok());
    }

    #[test]
    fn karpenter_label_domains() {
        for ok in [
            "node-restriction.kubernetes.io/moat-class",
            "node.kubernetes.io/pool",
            "moat.dev/class",
            "ipp",
        ] {
            assert!(allows_label(ok), "{ok}");
        }
        for refused in [
            "kubernetes.io/moat",
            "example.kubernetes.io/moat",
            "k8s.io/x",
            "karpenter.sh/x",
        ] {
            assert!(!allows_label(refused), "{refused}");
        }
    }
}
