//! A bound on nesting, checked before a YAML (or JSON) document is parsed.
//!
//! The YAML parser's work grows with the square of flow-collection nesting (`[[[[…`), so a
//! 400 KB document nested 200,000 deep kept a core busy for minutes. Tenants write such text
//! (pod annotations the identity agent reads, manifests an operator reviews), so every YAML
//! document moat parses is first scanned here, in one linear pass.

/// Deepest flow nesting accepted: far beyond any Kubernetes object (a pod is ~15 deep, a large
/// CRD schema ~60), and where the YAML deserialiser's own recursion limit stops anyway.
pub const MAX_NESTING_DEPTH: usize = 128;

/// The document nests flow collections deeper than [`MAX_NESTING_DEPTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nests more than {MAX_NESTING_DEPTH} levels deep")]
pub struct TooDeep;

/// Checks that `text` nests `[`/`{` at most [`MAX_NESTING_DEPTH`] deep.
///
/// Every bracket counts, also inside quoted strings and comments: telling those apart would
/// need the parser this check protects, and counting them can only over-estimate the depth (a
/// string with more than a hundred unclosed brackets is refused, never a deep document passed).
///
/// # Errors
/// [`TooDeep`].
pub fn check_depth(text: &str) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_deep_flow_nesting_and_passes_real_documents() {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_NESTING_DEPTH + 1),
            "]".repeat(MAX_NESTING_DEPTH + 1)
        );
        assert_eq!(check_depth(&deep), Err(TooDeep));
        let at_limit = format!(
            "{}{}",
            "{".repeat(MAX_NESTING_DEPTH),
            "}".repeat(MAX_NESTING_DEPTH)
        );
        assert_eq!(check_depth(&at_limit), Ok(()));
        // Wide is fine: only depth counts.
        assert_eq!(check_depth(&"[a], ".repeat(100_000)), Ok(()));
        assert_eq!(
            check_depth("spec: {containers: [{name: a, image: 'x:1'}]}"),
            Ok(())
        );
        // Quotes do not hide brackets.
        let quoted = format!("a: '{}'", "[".repeat(MAX_NESTING_DEPTH + 1));
        assert_eq!(check_depth(&quoted), Err(TooDeep));
    }
}
