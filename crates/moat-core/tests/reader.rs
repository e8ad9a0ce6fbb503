//! The field-selective reader (`moat_core::json`) against serde_json, which read the templates
//! before it: the same template (so the same decision) from every captured API server object
//! and from mutated copies of them, and the same refusals, except where the reader documents
//! that it differs (invalid JSON inside a skipped value, a body that is not UTF-8).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::path::PathBuf;

use moat_core::subject::{Kind, Template, TemplateSeed};
use proptest::prelude::*;
use serde_json::Value;

/// Every object of a reviewed kind in the captured reviews, as compact bytes with its kind.
fn fixture_objects() -> &'static [(Kind, Vec<u8>)] {
    static OBJECTS: std::sync::OnceLock<Vec<(Kind, Vec<u8>)>> = std::sync::OnceLock::new();
    OBJECTS.get_or_init(read_fixture_objects)
}

fn read_fixture_objects() -> Vec<(Kind, Vec<u8>)> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../moat-server/tests/data");
    let mut files = Vec::new();
    for dir in [
        data.clone(),
        data.join("kube-apiserver-1.26"),
        data.join("kube-apiserver-1.34"),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut objects = Vec::new();
    for path in files {
        let review: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for field in ["object", "oldObject"] {
            let object = &review["request"][field];
            if let Some(kind) = moat_core::subject::type_of(object) {
                objects.push((kind, serde_json::to_vec(object).unwrap()));
            }
        }
    }
    assert!(objects.len() >= 40, "fixtures missing: {}", objects.len());
    objects
}

/// The reader before this one: serde_json's deserializer through the same typed views.
fn serde_json_read(kind: Kind, bytes: &[u8]) -> Result<Result<Template, String>, ()> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let read =
        serde::de::DeserializeSeed::deserialize(TemplateSeed(kind), &mut de).map_err(|_| ())?;
    de.end().map_err(|_| ())?;
    Ok(read.map_err(|e| e.to_string()))
}

/// The reader under test, in the same shape.
fn fast_read(kind: Kind, bytes: &[u8]) -> Result<Result<Template, String>, ()> {
    match moat_core::json::from_slice_seed(bytes, TemplateSeed(kind)) {
        Ok(read) => Ok(read.map_err(|e| e.to_string())),
        Err(_) => Err(()),
    }
}

fn is_valid_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// The rule every input must keep: on valid JSON both readers read the same or both refuse; the
/// new one reads where serde_json refused only when the input is not JSON, and refuses where
/// serde_json read only when the input is not UTF-8.
fn agree(kind: Kind, bytes: &[u8]) -> Result<(), String> {
    let (old, new) = (serde_json_read(kind, bytes), fast_read(kind, bytes));
    match (&old, &new) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(()), Err(())) => Ok(()),
        (Err(()), Ok(_)) if !is_valid_json(bytes) => Ok(()),
        (Ok(_), Err(())) if std::str::from_utf8(bytes).is_err() => Ok(()),
        _ => Err(format!(
            "readers disagree on {}:\nserde_json: {old:?}\nreader: {new:?}",
            String::from_utf8_lossy(bytes)
        )),
    }
}

#[test]
fn every_captured_object_reads_the_same_as_with_serde_json() {
    for (kind, bytes) in fixture_objects() {
        let (kind, bytes) = (*kind, bytes.as_slice());
        let new = Template::from_json_as(kind, bytes).unwrap();
        assert_eq!(serde_json_read(kind, bytes), Ok(Ok(new.clone())));
        let tree = Template::from_value(&serde_json::from_slice(bytes).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(new, tree);
        // Pretty-printed (whitespace everywhere) reads the same.
        let pretty =
            serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(bytes).unwrap()).unwrap();
        assert_eq!(Template::from_json_as(kind, &pretty).unwrap(), new);
    }
}

fn read(json: &str) -> Result<Template, String> {
    Template::from_json_as(Kind::Pod, json.as_bytes()).map_err(|e| e.to_string())
}

#[test]
fn duplicate_fields_are_refused_where_serde_json_refused_them() {
    let dup_read = r#"{"spec":{"containers":[],"runtimeClassName":"a","runtimeClassName":"b"}}"#;
    assert!(read(dup_read).unwrap_err().contains("duplicate field"));
    assert!(serde_json_read(Kind::Pod, dup_read.as_bytes()).is_err());
    // A repeated field no policy reads, and a repeated label (a map: the last one counts), are
    // read as serde_json read them.
    for json in [
        r#"{"spec":{"containers":[],"hostname":"a","hostname":"b"}}"#,
        r#"{"metadata":{"labels":{"a":"1","a":"2"}},"spec":{"containers":[]}}"#,
    ] {
        agree(Kind::Pod, json.as_bytes()).unwrap();
    }
    assert_eq!(
        read(r#"{"metadata":{"labels":{"a":"1","a":"2"}},"spec":{"containers":[]}}"#)
            .unwrap()
            .label("a"),
        Some("2")
    );
}

#[test]
fn escaped_keys_and_strings_are_read_as_serde_json_reads_them() {
    let json = r#"{"metadata":{"\u006cabels":{"a\"b":"\u00e9\n"}},"spec":{"containers":[{"name":"c\\d","image":"x:1"}]}}"#;
    let t = read(json).unwrap();
    assert_eq!(t.label("a\"b"), Some("é\n"));
    assert_eq!(t.spec.containers[0].name, "c\\d");
    agree(Kind::Pod, json.as_bytes()).unwrap();
}

#[test]
fn invalid_json_where_it_is_read_is_refused() {
    for json in [
        r#"{"spec":{"containers":[{"name":"c","image":"x:1"},]}}"#,
        r#"{"spec":{"containers":[{"name":"c" "image":"x:1"}]}}"#,
        r#"{"spec":{"containers":[{"name":"c","image":"x\u12"}]}}"#,
        "{\"spec\":{\"containers\":[{\"name\":\"c\u{1}\"}]}}",
        r#"{"spec":{"containers":[],"runtimeClassName":nul}}"#,
        r#"{"spec":{"containers":[],"tolerations":[{"tolerationSeconds":1x}]}}"#,
        r#"{"spec":{"containers":[]}} x"#,
        r#"{"spec":{"containers":[]},}"#,
        r#"{"spec":{"containers":[]}"#,
        r#"{"spec":{"containers":[],"skipped":[1,2}}}"#,
        r#"{"spec":{"containers":[],"skipped":"open}}"#,
        r#"{"spec":{"containers":[],"skipped":}}"#,
    ] {
        assert!(read(json).is_err(), "read: {json}");
        agree(Kind::Pod, json.as_bytes()).unwrap();
    }
}

#[test]
fn invalid_json_inside_a_skipped_value_is_not_checked() {
    // The documented choice (see `moat_core::json`): only strings closing and brackets matching
    // are checked in what no policy reads; what is read is unchanged.
    let json = r#"{"spec":{"containers":[{"name":"c","image":"x:1","env":[1 2 tru "\q"]}]}}"#;
    assert_eq!(
        read(json).unwrap().spec.containers[0].image.as_deref(),
        Some("x:1")
    );
    assert!(serde_json_read(Kind::Pod, json.as_bytes()).is_err());
}

/// A byte edit of a captured object: replace, insert or delete, with bytes that matter to JSON.
fn edit() -> impl Strategy<Value = (usize, u8, u8)> {
    let bytes = prop::sample::select(&b"\"\\{}[],: \x01\xc3\xa9a0-enul"[..]);
    (any::<usize>(), 0u8..3, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_objects_read_the_same_or_differ_only_as_documented(
        pick in any::<usize>(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        let objects = fixture_objects();
        let (kind, mut bytes) = objects[pick % objects.len()].clone();
        for (at, op, byte) in edits {
            let at = at % bytes.len();
            match op {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => { bytes.remove(at); }
            }
        }
        prop_assert!(agree(kind, &bytes).is_ok(), "{}", agree(kind, &bytes).unwrap_err());
    }
}
