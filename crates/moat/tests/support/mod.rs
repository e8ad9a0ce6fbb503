//! A model of the documented rules that decide where pods go, shared by the capacity tests:
//! the scheduler's filters (taints and tolerations, nodeSelector, required node affinity,
//! required pod anti-affinity in both directions) and Karpenter's choice of a NodePool for a
//! pending pod (tolerated taints; every label the pod requires is set by the pool, chosen by
//! the pod where the pool leaves it open (`Exists`, `NotIn`), or `kubernetes.io/hostname`,
//! which every new node gets a value of its own for).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support; not every test uses every helper"
)]

use std::collections::BTreeMap;

use moat_objects::capacity::karpenter::NodePool;
use serde_json::Value;

pub(crate) const HOSTNAME: &str = "kubernetes.io/hostname";

/// A node: its labels and taints (key, value, effect).
#[derive(Debug, Clone, Default)]
pub(crate) struct Node {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) taints: Vec<(String, String, String)>,
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn s<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

pub(crate) fn tolerates(pod: &Value, key: &str, value: &str, effect: &str) -> bool {
    pod.pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| {
            let exists = s(t, "operator") == "Exists";
            (s(t, "key") == key || (s(t, "key").is_empty() && exists))
                && (exists || s(t, "value") == value)
                && (s(t, "effect").is_empty() || s(t, "effect") == effect)
        })
}

/// A node-selector requirement as (key, operator, values).
pub(crate) type Req = (String, String, Vec<String>);

/// The pod's node requirements: its nodeSelector as `In`, then each term of its required node
/// affinity (moat writes one term; a pod with none has one empty term).
pub(crate) fn node_terms(pod: &Value) -> Vec<Vec<Req>> {
    let selector: Vec<Req> = pod
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                "In".to_owned(),
                vec![v.as_str().unwrap().to_owned()],
            )
        })
        .collect();
    let terms = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if terms.is_empty() {
        return vec![selector];
    }
    terms
        .iter()
        .map(|t| {
            let mut reqs = selector.clone();
            reqs.extend(strs_exprs(t.get("matchExpressions")));
            reqs
        })
        .collect()
}

fn strs_exprs(v: Option<&Value>) -> Vec<Req> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            (
                s(e, "key").to_owned(),
                s(e, "operator").to_owned(),
                strs(e.get("values")),
            )
        })
        .collect()
}

fn matches(labels: &BTreeMap<String, String>, (key, op, values): &Req) -> bool {
    let got = labels.get(key);
    let inside = got.is_some_and(|g| values.contains(g));
    match op.as_str() {
        "In" => inside,
        "NotIn" => !inside,
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        other => panic!("operator {other}"),
    }
}

/// The scheduler's node filters, without resources and pod affinity.
pub(crate) fn node_fits(pod: &Value, node: &Node) -> bool {
    node.taints.iter().all(|(k, v, e)| tolerates(pod, k, v, e))
        && node_terms(pod)
            .iter()
            .any(|term| term.iter().all(|r| matches(&node.labels, r)))
}

fn pod_labels(pod: &Value) -> BTreeMap<String, String> {
    pod.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Required anti-affinity terms as (selector requirements, topology key, all namespaces).
fn anti_terms(pod: &Value) -> Vec<(Vec<Req>, String, bool)> {
    pod.pointer("/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| {
            (
                strs_exprs(t.pointer("/labelSelector/matchExpressions")),
                s(t, "topologyKey").to_owned(),
                t.get("namespaceSelector")
                    .is_some_and(|n| n.as_object().is_some_and(serde_json::Map::is_empty)),
            )
        })
        .collect()
}

fn namespace(pod: &Value) -> &str {
    pod.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Whether `a`'s anti-affinity keeps `b` out of its topology domain.
fn repels(a: &Value, b: &Value) -> bool {
    let labels = pod_labels(b);
    anti_terms(a).iter().any(|(selector, _, all)| {
        (*all || namespace(a) == namespace(b)) && selector.iter().all(|r| matches(&labels, r))
    })
}

/// Whether `pod` may join a node (same topology domain) where `others` run: anti-affinity
/// both ways. (Every modelled node has a hostname of its own, so the domain is the node.)
pub(crate) fn anti_affinity_allows(pod: &Value, others: &[&Value]) -> bool {
    others.iter().all(|o| !repels(pod, o) && !repels(o, pod))
}

/// Karpenter's choice: whether a pool may launch a node for `pod`, and that node's labels
/// (`hostname` is the new node's name).
pub(crate) fn launch(pool: &NodePool, pod: &Value, hostname: &str) -> Option<Node> {
    let spec = &pool.spec.template.spec;
    let taints: Vec<(String, String, String)> = spec
        .taints
        .iter()
        .flatten()
        .map(|t| {
            (
                t.key.clone(),
                t.value.clone().unwrap_or_default(),
                t.effect.clone(),
            )
        })
        .collect();
    if !taints.iter().all(|(k, v, e)| tolerates(pod, k, v, e)) {
        return None;
    }
    let fixed: BTreeMap<String, String> = pool
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    'terms: for term in node_terms(pod) {
        let mut labels = fixed.clone();
        labels.insert(HOSTNAME.to_owned(), hostname.to_owned());
        for (key, op, values) in &term {
            if labels.contains_key(key) {
                continue;
            }
            let Some(open) = spec.requirements.iter().find(|r| &r.key == key) else {
                continue 'terms; // a custom label the pool does not define
            };
            let excluded = open.values.clone().unwrap_or_default();
            let value = match (op.as_str(), open.operator.as_str()) {
                ("In", "Exists") => values.first().cloned(),
                ("In", "NotIn") => values.iter().find(|v| !excluded.contains(v)).cloned(),
                _ => None,
            };
            match value {
                Some(v) => {
                    labels.insert(key.clone(), v);
                }
                None => continue 'terms,
            }
        }
        if term.iter().all(|r| matches(&labels, r)) {
            return Some(Node { labels, taints });
        }
    }
    None
}
