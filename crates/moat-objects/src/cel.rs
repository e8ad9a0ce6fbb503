//! Building CEL text: literals, lists and the regular expressions the backstop matches with.
//!
//! The generated CEL uses only what both Kubernetes' CEL and the `cel` crate (the tests'
//! evaluator) implement; [`FEATURES`] is that list. Regular expressions use only syntax RE2
//! (Kubernetes) and Rust's `regex` (the crate) read alike: explicit ASCII classes, no `\w`
//! (Unicode-aware in Rust), no look-around (absent from RE2).

/// The CEL the backstop may use: nothing else appears in what it generates.
pub const FEATURES: &[&str] = &[
    "literals: strings in single quotes, booleans, integers, lists, maps with string keys",
    "operators: == != && || ! ?: + (strings and lists) in (lists and map keys) [index]",
    "has() on fields",
    "macros: all, exists, filter, map",
    "functions: size(), string.startsWith, string.endsWith, string.contains, string.matches",
    "variables: object, oldObject, request, namespaceObject, variables.<name>",
];

/// A CEL string literal for `s`.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A CEL list of string literals.
pub fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(lit).collect();
    format!("[{}]", items.join(", "))
}

/// `s` with every regular-expression metacharacter escaped.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An anchored regular expression for a namespace glob (`*` matches any run of characters).
pub fn glob_regex(glob: &str) -> String {
    let parts: Vec<String> = glob.split('*').map(regex_escape).collect();
    format!("^{}$", parts.join(".*"))
}

/// A registry host component.
const HOST: &str = "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?";
/// A repository path component: `[a-z0-9]+ ( ( [._] | __ | -+ ) [a-z0-9]+ )*`.
const PATH: &str = "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
/// A tag: `[\w][\w.-]{0,127}` with `\w` spelt in ASCII.
pub const TAG: &str = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
/// A digest: algorithm components and at least 32 hex digits.
const DIGEST: &str = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";

/// A registry: host names or a bracketed IPv6 address (its inside checked loosely), with an
/// optional port.
pub fn domain_regex() -> String {
    format!("(?:{HOST}(?:\\.{HOST})*|\\[[0-9A-Fa-f:.]+\\])(?::[0-9]+)?")
}

/// The whole distribution reference grammar, anchored.
pub fn reference_regex() -> String {
    format!(
        "^(?:{}/)?{PATH}(?:/{PATH})*(?::{TAG})?(?:@{DIGEST})?$",
        domain_regex()
    )
}

/// A reference whose first component Docker reads as a registry (it holds `.` or `:` or an
/// upper-case letter, or is `localhost`, and a `/` follows).
pub const HAS_DOMAIN: &str = "^(?:[^/@]*[.:A-Z][^/@]*|localhost)/";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(lit("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(list(["x", "y"]), "['x', 'y']");
    }

    #[test]
    fn globs_become_anchored_expressions() {
        assert_eq!(glob_regex("kube-*"), "^kube\\-.*$");
        assert_eq!(glob_regex("*"), "^.*$");
    }
}
