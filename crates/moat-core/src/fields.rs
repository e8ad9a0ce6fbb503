//! The only fields of a pod template that a policy may change, as one owned, typed struct, and
//! the JSON Patch between two versions of it.
//!
//! Policies edit a copy of [`PodFields`]; the patch is computed from the typed before and after of
//! these fields alone, never from a diff of the whole object. moat only adds (a label, a
//! toleration, a node-affinity requirement, an anti-affinity term, nodeSelector entries) or sets
//! `runtimeClassName`, so most operations are single `add`s at the end of a list or under a new
//! key; where a field that the pod already had changes inside (its own affinity), the patch is
//! the diff of that field alone, which touches only what moat added and so keeps every field of
//! the pod's own that `k8s_openapi` does not know.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use serde::Serialize;
use serde_json::Value;

/// `metadata.{labels, annotations}`, `spec.{runtimeClassName, tolerations, affinity,
/// nodeSelector}` and the image references moat pins to a digest, of a pod template: everything
/// moat may change. `None` is "absent or null" in the object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodFields {
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub runtime_class_name: Option<String>,
    pub tolerations: Option<Vec<Toleration>>,
    pub affinity: Option<Affinity>,
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Images replaced by their pinned reference (`name[:tag]@sha256:…`), by where they are.
    /// Empty as the object is read: moat only ever adds pins.
    pub image_pins: BTreeMap<ImageSlot, String>,
}

/// Where a pod pulls an image from: a container of some kind, or an image volume, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageSlot {
    /// `spec.containers[i].image`.
    Container(usize),
    /// `spec.initContainers[i].image`.
    InitContainer(usize),
    /// `spec.ephemeralContainers[i].image`.
    EphemeralContainer(usize),
    /// `spec.volumes[i].image.reference`.
    Volume(usize),
}

impl ImageSlot {
    /// The JSON Pointer of the image field, written at once (names and an index: nothing to
    /// escape).
    fn pointer(self) -> PointerBuf {
        let path = match self {
            Self::Container(i) => format!("/spec/containers/{i}/image"),
            Self::InitContainer(i) => format!("/spec/initContainers/{i}/image"),
            Self::EphemeralContainer(i) => format!("/spec/ephemeralContainers/{i}/image"),
            Self::Volume(i) => format!("/spec/volumes/{i}/image/reference"),
        };
        // Always a valid pointer; parsed rather than trusted, so a typo here fails the tests
        // (an empty pointer would replace the whole object) instead of writing a bad patch.
        PointerBuf::parse(path).unwrap_or_default()
    }

    /// The image field as messages name it (`spec.containers[0]`,
    /// `spec.volumes[2].image.reference`).
    pub(crate) fn field(self) -> String {
        match self {
            Self::Container(i) => format!("spec.containers[{i}]"),
            Self::InitContainer(i) => format!("spec.initContainers[{i}]"),
            Self::EphemeralContainer(i) => format!("spec.ephemeralContainers[{i}]"),
            Self::Volume(i) => format!("spec.volumes[{i}].image.reference"),
        }
    }
}

impl PodFields {
    /// The labels, created empty when absent.
    pub fn labels_mut(&mut self) -> &mut BTreeMap<String, String> {
        self.labels.get_or_insert_with(BTreeMap::new)
    }

    /// The annotations, created empty when absent.
    pub fn annotations_mut(&mut self) -> &mut BTreeMap<String, String> {
        self.annotations.get_or_insert_with(BTreeMap::new)
    }

    /// The tolerations, created empty when absent.
    pub fn tolerations_mut(&mut self) -> &mut Vec<Toleration> {
        self.tolerations.get_or_insert_with(Vec::new)
    }

    /// The nodeSelector, created empty when absent.
    pub fn node_selector_mut(&mut self) -> &mut BTreeMap<String, String> {
        self.node_selector.get_or_insert_with(BTreeMap::new)
    }

    /// The affinity, created empty when absent.
    pub fn affinity_mut(&mut self) -> &mut Affinity {
        self.affinity.get_or_insert_with(Affinity::default)
    }

    /// The RFC 6902 patch that turns a template whose fields are `self` into one whose fields are
    /// `after`. `has_metadata`: whether the template has a `metadata` object to add labels and
    /// annotations to.
    pub fn patch_to(&self, after: &Self, has_metadata: bool) -> Patch {
        let mut ops = Vec::new();
        if !has_metadata && (after.labels.is_some() || after.annotations.is_some()) {
            let mut metadata = serde_json::Map::new();
            for (key, map) in [
                ("labels", &after.labels),
                ("annotations", &after.annotations),
            ] {
                if let Some(map) = map {
                    metadata.insert(key.to_owned(), to_value(map));
                }
            }
            ops.push(add(&["metadata"], Value::Object(metadata)));
        } else {
            if self.labels != after.labels {
                map_ops(
                    &mut ops,
                    &["metadata", "labels"],
                    &self.labels,
                    &after.labels,
                );
            }
            if self.annotations != after.annotations {
                map_ops(
                    &mut ops,
                    &["metadata", "annotations"],
                    &self.annotations,
                    &after.annotations,
                );
            }
        }
        match (&self.runtime_class_name, &after.runtime_class_name) {
            (a, b) if a == b => {}
            (None, Some(b)) => {
                ops.push(add(&["spec", "runtimeClassName"], Value::from(b.as_str())))
            }
            (Some(_), Some(b)) => ops.push(replace(
                &["spec", "runtimeClassName"],
                Value::from(b.as_str()),
            )),
            (Some(_), None) => ops.push(remove(&["spec", "runtimeClassName"])),
            (None, None) => {}
        }
        if self.tolerations != after.tolerations {
            list_ops(
                &mut ops,
                &["spec", "tolerations"],
                &self.tolerations,
                &after.tolerations,
            );
        }
        if self.affinity != after.affinity {
            match (&self.affinity, &after.affinity) {
                (Some(before), Some(after)) => {
                    let prefix = pointer(&["spec", "affinity"]);
                    for op in json_patch::diff(&to_value(before), &to_value(after)).0 {
                        ops.push(prefixed(&prefix, op));
                    }
                }
                (_, after) => whole(&mut ops, &["spec", "affinity"], after.as_ref()),
            }
        }
        if self.node_selector != after.node_selector {
            map_ops(
                &mut ops,
                &["spec", "nodeSelector"],
                &self.node_selector,
                &after.node_selector,
            );
        }
        for (slot, image) in &after.image_pins {
            if self.image_pins.get(slot) != Some(image) {
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: slot.pointer(),
                    value: Value::from(image.as_str()),
                }));
            }
        }
        Patch(ops)
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn replace(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(tokens),
        value,
    })
}

fn remove(tokens: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: pointer(tokens),
    })
}

/// Serialises a `k8s_openapi` value. Their `Serialize` impls do not fail (string keys, no
/// non-finite floats), so a failure would be a bug in that crate; it becomes `null`, which a
/// test of every mutation would catch.
fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Sets a whole field: add (also over a `null`) or remove.
fn whole<T: Serialize>(ops: &mut Vec<PatchOperation>, path: &[&str], after: Option<&T>) {
    match after {
        Some(v) => ops.push(add(path, to_value(v))),
        None => ops.push(remove(path)),
    }
}

/// A string map (labels, nodeSelector): one operation per changed key, or the whole map when
/// the object had none.
fn map_ops(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    before: &Option<BTreeMap<String, String>>,
    after: &Option<BTreeMap<String, String>>,
) {
    let (Some(before), Some(after)) = (before, after) else {
        whole(ops, path, after.as_ref());
        return;
    };
    for (k, v) in after {
        if before.get(k) != Some(v) {
            let mut p = path.to_vec();
            p.push(k);
            ops.push(add(&p, Value::from(v.as_str())));
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(*k)) {
        let mut p = path.to_vec();
        p.push(k);
        ops.push(remove(&p));
    }
}

/// A list moat appends to: one `add` per new item at the end, or the whole list when the object
/// had none or the old items changed.
fn list_ops<T: Serialize + PartialEq>(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    before: &Option<Vec<T>>,
    after: &Option<Vec<T>>,
) {
    match (before, after) {
        (Some(before), Some(after)) if after.starts_with(before) => {
            for (i, item) in after.iter().enumerate().skip(before.len()) {
                let index = i.to_string();
                let mut p = path.to_vec();
                p.push(&index);
                ops.push(add(&p, to_value(item)));
            }
        }
        (_, after) => whole(ops, path, after.as_ref()),
    }
}

fn prefixed(prefix: &PointerBuf, op: PatchOperation) -> PatchOperation {
    let join = |p: &PointerBuf| prefix.concat(p);
    match op {
        PatchOperation::Add(o) => PatchOperation::Add(AddOperation {
            path: join(&o.path),
            value: o.value,
        }),
        PatchOperation::Remove(o) => PatchOperation::Remove(RemoveOperation {
            path: join(&o.path),
        }),
        PatchOperation::Replace(o) => PatchOperation::Replace(ReplaceOperation {
            path: join(&o.path),
            value: o.value,
        }),
        // `diff` emits only add, remove and replace.
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apply(object: &Value, patch: &Patch) -> Value {
        let mut o = object.clone();
        json_patch::patch(&mut o, patch).unwrap();
        o
    }

    fn tol(key: &str) -> Toleration {
        Toleration {
            key: Some(key.to_owned()),
            operator: Some("Exists".to_owned()),
            ..Toleration::default()
        }
    }

    #[test]
    fn unchanged_fields_give_an_empty_patch() {
        let f = PodFields {
            labels: Some(BTreeMap::from([("a".to_owned(), "b".to_owned())])),
            tolerations: Some(vec![tol("x")]),
            ..PodFields::default()
        };
        assert!(f.patch_to(&f.clone(), true).0.is_empty());
    }

    #[test]
    fn adds_to_what_the_pod_has_and_escapes_keys() {
        let object = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"tolerations": [{"key": "x", "operator": "Exists", "future": 1}]}});
        let before = PodFields {
            labels: Some(BTreeMap::from([("a".to_owned(), "b".to_owned())])),
            tolerations: Some(vec![tol("x")]),
            ..PodFields::default()
        };
        let mut after = before.clone();
        after
            .labels_mut()
            .insert("moat.dev/class".to_owned(), "gold".to_owned());
        after.tolerations_mut().push(tol("y"));
        after.runtime_class_name = Some("gvisor".to_owned());
        let patch = before.patch_to(&after, true);
        for op in &patch.0 {
            assert!(matches!(op, PatchOperation::Add(_)), "{op}");
        }
        let patched = apply(&object, &patch);
        assert_eq!(
            patched,
            json!({"metadata": {"labels": {"a": "b", "moat.dev/class": "gold"}},
                   "spec": {"runtimeClassName": "gvisor", "tolerations": [
                       {"key": "x", "operator": "Exists", "future": 1},
                       {"key": "y", "operator": "Exists"}]}})
        );
    }

    #[test]
    fn creates_metadata_when_the_template_has_none() {
        let mut after = PodFields::default();
        after.labels_mut().insert("k".to_owned(), "v".to_owned());
        let patch = PodFields::default().patch_to(&after, false);
        assert_eq!(
            apply(&json!({"spec": {}}), &patch),
            json!({"metadata": {"labels": {"k": "v"}}, "spec": {}})
        );
    }

    #[test]
    fn affinity_changes_keep_the_pods_unknown_fields() {
        let object = json!({"spec": {"affinity": {"nodeAffinity": {"future": true,
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}}}});
        let before: Affinity = serde_json::from_value(object["spec"]["affinity"].clone()).unwrap();
        let mut changed: Affinity = before.clone();
        let terms = &mut changed
            .node_affinity
            .as_mut()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_mut()
            .unwrap()
            .node_selector_terms;
        terms[0].match_expressions = Some(vec![Default::default()]);
        let patch = PodFields {
            affinity: Some(before),
            ..PodFields::default()
        }
        .patch_to(
            &PodFields {
                affinity: Some(changed),
                ..PodFields::default()
            },
            true,
        );
        let patched = apply(&object, &patch);
        assert_eq!(patched["spec"]["affinity"]["nodeAffinity"]["future"], true);
        assert!(
            patched["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchExpressions"]
                .is_array()
        );
    }

    #[test]
    fn runtime_class_is_added_replaced_or_removed() {
        let with = |r: Option<&str>| PodFields {
            runtime_class_name: r.map(str::to_owned),
            ..PodFields::default()
        };
        let ops = |a, b| serde_json::to_value(with(a).patch_to(&with(b), true)).unwrap();
        assert_eq!(
            ops(None, Some("g")),
            json!([{"op": "add", "path": "/spec/runtimeClassName", "value": "g"}])
        );
        assert_eq!(
            ops(Some("runc"), Some("g")),
            json!([{"op": "replace", "path": "/spec/runtimeClassName", "value": "g"}])
        );
        assert_eq!(
            ops(Some("g"), None),
            json!([{"op": "remove", "path": "/spec/runtimeClassName"}])
        );
    }
}
