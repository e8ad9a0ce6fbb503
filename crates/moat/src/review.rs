//! `moat review`: the admission decisions on manifests on disk.
//!
//! Every document is reviewed as a CREATE at the mutate stage, exactly as the mutating webhook
//! would decide it. Namespace labels (for classes bound by namespace label or selector) come from
//! `Namespace` documents in the same input and from `--namespace-label`.

use std::collections::BTreeMap;
use std::io::Write;

use moat_core::config::Config;
use moat_core::decision::{Decision, Operation, Request, Stage};
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
    moat_core::nesting::check_depth(doc).map_err(|e| format!("the document {e}"))?;
    let value: Value =
        serde_yaml_ng::from_str(doc).map_err(|e| format!("does not parse as YAML or JSON: {e}"))?;
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
        return Ok(items.clone());
    }
    Ok(vec![value])
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
        for object in parse_document(doc).unwrap_or_default() {
            let is_namespace = object.get("kind").and_then(Value::as_str) == Some("Namespace")
                && object.get("apiVersion").and_then(Value::as_str) == Some("v1");
            let Some(name) = metadata_str(&object, "name").filter(|_| is_namespace) else {
                continue;
            };
            let labels = namespaces.entry(name.to_owned()).or_default();
            if let Some(Value::Object(l)) = object.get("metadata").and_then(|m| m.get("labels")) {
                for (k, v) in l {
                    if let Some(v) = v.as_str() {
                        labels.entry(k.clone()).or_insert_with(|| v.to_owned());
                    }
                }
            }
        }
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
        let objects = match parse_document(doc) {
            Ok(objects) => objects,
            Err(message) => {
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
                continue;
            }
        };
        for object in objects {
            match review_object(config, options, &namespaces, file, document, &object) {
                Ok(v) => {
                    if v.allowed {
                        summary.allowed += 1;
                    } else {
                        summary.denied += 1;
                    }
                    renderer.write(&v, out)?;
                }
                Err(e) => {
                    summary.errors += 1;
                    writeln!(errors, "moat: {e}")?;
                }
            }
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
    let req = Request {
        operation: Operation::Create,
        stage: Stage::Mutate,
        object: template.as_ref(),
        old_object: None,
        namespace: &namespace,
        namespace_labels: labels.as_ref(),
        dry_run: false,
        requester: None,
        placement_seed: &seed,
    };
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
