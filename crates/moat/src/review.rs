//! `moat review`: the admission decisions on manifests on disk.
//!
//! Every document is reviewed as a CREATE at the mutate stage, exactly as the mutating webhook
//! would decide it. Namespace labels (for classes bound by namespace label or selector) come from
//! `Namespace` documents in the same input and from `--namespace-label`.

use std::collections::BTreeMap;
use std::io::Write;

use moat_core::config::Config;
use moat_core::decision::{Decision, Request};
use moat_core::engine;
use moat_core::subject::Template;
use serde::Serialize;
use serde_json::Value;

/// Largest input file, in bytes. Manifests are small; a larger file is a mistake, not a review.
pub const MAX_INPUT_LEN_BYTES: usize = 256 * 1024 * 1024;

/// The label every namespace carries with its own name (Kubernetes ≥ 1.21).
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// How verdicts are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per object, then each reason indented.
    Text,
    /// A JSON array, one element per input document.
    Json,
    /// The same elements as a YAML sequence.
    Yaml,
}

/// One input: its display name and its text.
#[derive(Debug)]
pub struct Input {
    pub name: String,
    pub text: String,
}

/// A document that could not be reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    pub file: String,
    /// 1-based document index within the file.
    pub document: usize,
    pub message: String,
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: document {}: {}",
            self.file, self.document, self.message
        )
    }
}

/// The options of one review run.
#[derive(Debug, Default)]
pub struct Options {
    /// Namespace for objects that name none.
    pub default_namespace: String,
    /// Extra namespace labels: namespace → key → value.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// One element of the JSON/YAML output.
#[derive(Debug, Serialize)]
pub struct Verdict {
    pub file: String,
    pub document: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Whether moat decides this kind (false: passed through untouched).
    pub reviewed: bool,
    pub allowed: bool,
    pub message: String,
    pub reasons: Vec<Reason>,
    pub warnings: Vec<String>,
    pub exemptions: Vec<String>,
    /// What changes, in words. For workloads: what changes in each pod when it is created.
    pub changes: Vec<String>,
    pub patch: json_patch::Patch,
    pub object: Value,
}

/// One denial reason, with its policy.
#[derive(Debug, Serialize)]
pub struct Reason {
    pub policy: &'static str,
    pub message: String,
}

/// Counts of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub allowed: usize,
    pub denied: usize,
    /// Documents that could not be reviewed.
    pub errors: usize,
}

impl Summary {
    /// 0 when every object is allowed, 1 when any is denied, 2 when any document failed.
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 {
            2
        } else if self.denied > 0 {
            1
        } else {
            0
        }
    }
}

/// Splits a YAML stream at document markers (`---` at the start of a line), so one broken
/// document does not hide the others.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.trim().is_empty() || rest.starts_with([' ', '\t']));
        if marker {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "..."
    })
}

/// Parses one document into the objects it holds (`List` kinds are expanded into their items).
pub(crate) fn parse_document(doc: &str) -> Result<Vec<Value>, String> {
    let mut objects = Vec::new();
    for_each_object(doc, &mut |o| {
        objects.push(o);
        Ok(())
    })?;
    Ok(objects)
}

/// Calls `each` with every object of one document, in order (`List` kinds are expanded into
/// their items). A JSON document (what `kubectl get -o json` prints) is read in one pass that
/// hands each list item over as soon as it is parsed, so memory stays flat however long the
/// list; YAML documents are parsed whole. An error from `each` ends the document with it.
///
/// # Errors
/// A message saying why the document cannot be read.
pub(crate) fn for_each_object(
    doc: &str,
    each: &mut dyn FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    moat_core::nesting::check_depth(doc).map_err(|e| format!("the document {e}"))?;
    if doc.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(doc);
        let read = serde::de::DeserializeSeed::deserialize(stream::TopLevel { each }, &mut de)
            .and_then(|top| de.end().map(|()| top));
        return match read {
            Ok(stream::Read::Object(value)) => whole(value, each),
            Ok(stream::Read::Streamed { kind }) => match kind.as_deref() {
                Some(k) if k.ends_with("List") => Ok(()),
                _ => Err("has list items but is not a List kind".to_owned()),
            },
            Err(e) => Err(e
                .to_string()
                .strip_prefix(stream::EACH_FAILED)
                .map_or_else(|| format!("does not parse as JSON: {e}"), str::to_owned)),
        };
    }
    let value: Value =
        serde_yaml_ng::from_str(doc).map_err(|e| format!("does not parse as YAML or JSON: {e}"))?;
    whole(value, each)
}

/// A document parsed whole: one object, or a List's items.
fn whole(value: Value, each: &mut dyn FnMut(Value) -> Result<(), String>) -> Result<(), String> {
    if !value.is_object() {
        return Err("is not an object (expected a Kubernetes manifest)".to_owned());
    }
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind.is_empty() || value.get("apiVersion").and_then(Value::as_str).is_none() {
        return Err("has no apiVersion or kind".to_owned());
    }
    if kind.ends_with("List")
        && let Some(Value::Array(items)) = value.get("items")
    {
        for item in items.clone() {
            each(item)?;
        }
        return Ok(());
    }
    each(value)
}

/// The one-pass JSON reader: a top-level object whose `items` array is handed over item by item.
mod stream {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    /// Prefix of an error that came from the caller's `each`, to tell it from a parse error.
    pub(super) const EACH_FAILED: &str = "\u{0}moat-each:";

    pub(super) enum Read {
        /// No `items` array: the whole object.
        Object(Value),
        /// The items were handed over; the document's `kind`, if it had one.
        Streamed { kind: Option<String> },
    }

    pub(super) struct TopLevel<'f> {
        pub(super) each: &'f mut dyn FnMut(Value) -> Result<(), String>,
    }

    impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
        type Value = Read;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for TopLevel<'_> {
        type Value = Read;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a Kubernetes object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
            let mut fields = Map::new();
            let mut streamed = false;
            while let Some(key) = map.next_key::<String>()? {
                if key == "items" && !streamed {
                    match map.next_value_seed(Items {
                        each: &mut *self.each,
                    })? {
                        None => streamed = true,
                        Some(other) => {
                            fields.insert(key, other);
                        }
                    }
                    continue;
                }
                let value: Value = map.next_value()?;
                fields.insert(key, value);
            }
            if streamed {
                let kind = fields
                    .get("kind")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                Ok(Read::Streamed { kind })
            } else {
                Ok(Read::Object(Value::Object(fields)))
            }
        }

        // Anything else is read whole and refused by the caller's checks.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Read, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element::<Value>()? {
                items.push(v);
            }
            Ok(Read::Object(Value::Array(items)))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Read, E> {
            Ok(Read::Object(Value::String(v.to_owned())))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Read, E> {
            Ok(Read::Object(Value::Bool(v)))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Read, E> {
            Ok(Read::Object(Value::from(v)))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Read, E> {
            Ok(Read::Object(Value::from(v)))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Read, E> {
            Ok(Read::Object(Value::from(v)))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Read, E> {
            Ok(Read::Object(Value::Null))
        }
    }

    /// The `items` field: an array's elements are handed to `each` as soon as each is parsed
    /// (`None`); any other value is returned whole.
    struct Items<'f> {
        each: &'f mut dyn FnMut(Value) -> Result<(), String>,
    }

    impl<'de> DeserializeSeed<'de> for Items<'_> {
        type Value = Option<Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Items<'_> {
        type Value = Option<Value>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
            while let Some(item) = seq.next_element::<Value>()? {
                (self.each)(item).map_err(|e| A::Error::custom(format!("{EACH_FAILED}{e}")))?;
            }
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<Value>, A::Error> {
            Value::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<Value>, E> {
            Ok(Some(Value::String(v.to_owned())))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Option<Value>, E> {
            Ok(Some(Value::Bool(v)))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<Value>, E> {
            Ok(Some(Value::from(v)))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<Value>, E> {
            Ok(Some(Value::from(v)))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<Value>, E> {
            Ok(Some(Value::from(v)))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Option<Value>, E> {
            Ok(Some(Value::Null))
        }
    }
}

/// Every non-blank document of every input, with its file name and 1-based index.
pub(crate) fn documents(inputs: &[Input]) -> impl Iterator<Item = (&str, usize, &str)> {
    inputs.iter().flat_map(|input| {
        split_documents(&input.text)
            .into_iter()
            .enumerate()
            .filter(|(_, doc)| !is_blank(doc))
            .map(|(i, doc)| (input.name.as_str(), i + 1, doc))
    })
}

/// Labels of the `Namespace` objects in the input, over those given by flag.
pub(crate) fn namespace_labels(
    inputs: &[Input],
    options: &Options,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut namespaces = options.namespace_labels.clone();
    // Only documents that can hold a Namespace are parsed in this first pass.
    for (_, _, doc) in documents(inputs).filter(|(_, _, d)| d.contains("Namespace")) {
        // Errors are reported by the review pass.
        let _ = for_each_object(doc, &mut |object| {
            let is_namespace = object.get("kind").and_then(Value::as_str) == Some("Namespace")
                && object.get("apiVersion").and_then(Value::as_str) == Some("v1");
            let Some(name) = metadata_str(&object, "name").filter(|_| is_namespace) else {
                return Ok(());
            };
            let labels = namespaces.entry(name.to_owned()).or_default();
            if let Some(Value::Object(l)) = object.get("metadata").and_then(|m| m.get("labels")) {
                for (k, v) in l {
                    if let Some(v) = v.as_str() {
                        labels.entry(k.clone()).or_insert_with(|| v.to_owned());
                    }
                }
            }
            Ok(())
        });
    }
    namespaces
}

pub(crate) fn metadata_str<'v>(object: &'v Value, key: &str) -> Option<&'v str> {
    object.get("metadata")?.get(key)?.as_str()
}

/// Reviews every document of `inputs`, writing each verdict to `out` as it is decided (memory
/// stays flat however many objects there are) and each document error to `errors`.
///
/// # Errors
/// Only the writers' errors.
pub fn review(
    config: &Config,
    inputs: &[Input],
    options: &Options,
    format: OutputFormat,
    out: &mut dyn Write,
    errors: &mut dyn Write,
) -> std::io::Result<Summary> {
    let namespaces = namespace_labels(inputs, options);
    let mut summary = Summary::default();
    let mut renderer = Renderer::new(format);
    for (file, document, doc) in documents(inputs) {
        // Verdicts are written as each object is read; a write error ends the review.
        let mut write_error = None;
        let read = for_each_object(doc, &mut |object| {
            match review_object(config, options, &namespaces, file, document, &object) {
                Ok(v) => {
                    if v.allowed {
                        summary.allowed += 1;
                    } else {
                        summary.denied += 1;
                    }
                    renderer.write(&v, out)
                }
                Err(e) => {
                    summary.errors += 1;
                    writeln!(errors, "moat: {e}")
                }
            }
            .map_err(|e| {
                let message = e.to_string();
                write_error = Some(e);
                message
            })
        });
        if let Some(e) = write_error {
            return Err(e);
        }
        if let Err(message) = read {
            summary.errors += 1;
            writeln!(
                errors,
                "moat: {}",
                DocumentError {
                    file: file.to_owned(),
                    document,
                    message
                }
            )?;
        }
    }
    renderer.finish(&summary, out)?;
    Ok(summary)
}

fn review_object(
    config: &Config,
    options: &Options,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    file: &str,
    document: usize,
    object: &Value,
) -> Result<Verdict, DocumentError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Namespaces are cluster-scoped; every kind moat reviews is namespaced.
    let namespace = match metadata_str(object, "namespace") {
        Some(ns) => ns.to_owned(),
        None if kind == "Namespace" => String::new(),
        None => options.default_namespace.clone(),
    };
    let name = metadata_str(object, "name")
        .or_else(|| metadata_str(object, "generateName"))
        .unwrap_or_default()
        .to_owned();
    // A namespace the input does not describe (no Namespace document, no --namespace-label) is
    // unknown, as a namespace the server's cache has not seen: decisions that read its labels
    // deny.
    let labels = namespaces.get(&namespace).map(|known| {
        let mut labels = known.clone();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone());
        labels
    });
    let seed = format!("{kind}/{name}");
    let error = |message: String| DocumentError {
        file: file.to_owned(),
        document,
        message,
    };
    let template = Template::from_value(object)
        .map_err(|e| error(format!("{kind} {namespace}/{name}: {e}")))?;
    let req = Request::offline_create(template.as_ref(), &namespace, labels.as_ref(), &seed);
    let decision = engine::decide(config, &req);
    let patched = decision.patched(object).map_err(|e| {
        error(format!(
            "{kind} {namespace}/{name}: internal error: moat's patch does not apply: {e}"
        ))
    })?;
    Ok(verdict(
        file.to_owned(),
        document,
        kind,
        namespace,
        name,
        decision,
        patched,
    ))
}

fn verdict(
    file: String,
    document: usize,
    kind: String,
    namespace: String,
    name: String,
    d: Decision,
    object: Value,
) -> Verdict {
    Verdict {
        file,
        document,
        kind,
        namespace,
        name,
        reviewed: d.kind.is_some(),
        allowed: d.allowed(),
        message: d.message(),
        reasons: d
            .denials
            .iter()
            .map(|x| Reason {
                policy: x.policy.as_str(),
                message: x.message.clone(),
            })
            .collect(),
        warnings: d.warnings.clone(),
        exemptions: d
            .exemptions
            .iter()
            .map(|e| match e.policy {
                Some(p) => format!("{p}: {}", e.reason.as_str()),
                None => e.reason.as_str().to_owned(),
            })
            .collect(),
        changes: d
            .changes
            .iter()
            .map(|c| format!("{}: {}", c.policy, c.description))
            .collect(),
        patch: d.patch,
        object,
    }
}

/// Writes verdicts one at a time in the chosen format.
struct Renderer {
    format: OutputFormat,
    first: bool,
}

impl Renderer {
    fn new(format: OutputFormat) -> Self {
        Self {
            format,
            first: true,
        }
    }

    fn write(&mut self, v: &Verdict, out: &mut dyn Write) -> std::io::Result<()> {
        let first = std::mem::replace(&mut self.first, false);
        match self.format {
            OutputFormat::Json => {
                out.write_all(if first { b"[\n" } else { b",\n" })?;
                serde_json::to_writer_pretty(&mut *out, v).map_err(std::io::Error::other)
            }
            OutputFormat::Yaml => {
                let text = serde_yaml_ng::to_string(std::slice::from_ref(v))
                    .map_err(std::io::Error::other)?;
                out.write_all(text.as_bytes())
            }
            OutputFormat::Text => render_text(v, out),
        }
    }

    fn finish(self, summary: &Summary, out: &mut dyn Write) -> std::io::Result<()> {
        match self.format {
            OutputFormat::Json => out.write_all(if self.first { b"[]\n" } else { b"\n]\n" }),
            OutputFormat::Yaml if self.first => out.write_all(b"[]\n"),
            OutputFormat::Yaml => Ok(()),
            OutputFormat::Text => writeln!(
                out,
                "{} objects: {} allowed, {} denied, {} errors",
                summary.allowed + summary.denied,
                summary.allowed,
                summary.denied,
                summary.errors
            ),
        }
    }
}

fn render_text(v: &Verdict, out: &mut dyn Write) -> std::io::Result<()> {
    let verb = match (v.reviewed, v.allowed) {
        (false, _) => "SKIP ",
        (true, true) => "ALLOW",
        (true, false) => "DENY ",
    };
    let mut line = if v.namespace.is_empty() {
        format!("{verb} {} {}", v.kind, v.name)
    } else {
        format!("{verb} {} {}/{}", v.kind, v.namespace, v.name)
    };
    if !v.reviewed {
        line.push_str(" (not a kind moat reviews)");
    } else if !v.exemptions.is_empty() {
        line.push_str(&format!(" (exempt: {})", v.exemptions.join(", ")));
    }
    writeln!(out, "{line}")?;
    for r in &v.reasons {
        writeln!(out, "  - {}: {}", r.policy, r.message)?;
    }
    for w in &v.warnings {
        writeln!(out, "  ! {w}")?;
    }
    if v.allowed {
        let prefix = if v.kind == "Pod" {
            "+"
        } else {
            "+ at pod creation:"
        };
        for c in &v.changes {
            writeln!(out, "  {prefix} {c}")?;
        }
        for op in &v.patch.0 {
            writeln!(
                out,
                "    {}",
                serde_json::to_string(op).map_err(std::io::Error::other)?
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_stream_their_items_and_read_like_yaml() {
        let list = serde_json::json!({"apiVersion": "v1", "items": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}},
        ], "kind": "List", "metadata": {"resourceVersion": ""}});
        let json = serde_json::to_string_pretty(&list).unwrap();
        let yaml = serde_yaml_ng::to_string(&list).unwrap();
        let from_json = parse_document(&json).unwrap();
        assert_eq!(from_json, parse_document(&yaml).unwrap());
        assert_eq!(from_json.len(), 2);
        assert_eq!(from_json[1]["metadata"]["name"], "b");
        // One object, and an object whose items field is no list, are read whole.
        let pod = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}"#;
        assert_eq!(parse_document(pod).unwrap().len(), 1);
        let odd = r#"{"apiVersion": "x/v1", "kind": "Thing", "items": {"a": 1}}"#;
        assert_eq!(parse_document(odd).unwrap()[0]["items"]["a"], 1);
        // Items under a kind that is no List are refused, after they were read.
        let e = parse_document(r#"{"apiVersion": "x/v1", "items": [{}], "kind": "Thing"}"#)
            .unwrap_err();
        assert!(e.contains("not a List kind"), "{e}");
        assert!(
            parse_document(r#"{"apiVersion": "v1", "kind": "List", "items": [}"#)
                .unwrap_err()
                .contains("does not parse as JSON")
        );
    }

    #[test]
    fn splits_at_document_markers_only() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n---x: not a marker\n";
        let docs = split_documents(text);
        assert_eq!(docs, vec!["a: 1\n", "b: 2\n", "c: 3\n---x: not a marker\n"]);
        assert_eq!(split_documents("---\na: 1\n"), vec!["", "a: 1\n"]);
    }

    #[test]
    fn blank_documents_are_skipped() {
        assert!(is_blank("# only a comment\n\n"));
        assert!(is_blank("..."));
        assert!(!is_blank("a: 1"));
    }
}
