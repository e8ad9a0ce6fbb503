//! Identifiers the policies compare: each parsed once, so the rest of the code never re-checks
//! strings. All implement `FromStr`, `Display` and serde through their string form.

use std::fmt;
use std::str::FromStr;

/// Longest isolation class name: a DNS label shortened so that a dedicated node id
/// (`<class>-<10 hex>`) still fits a 63-character label value.
pub const MAX_CLASS_NAME_LEN_CHARS: usize = 40;
const MAX_DNS_LABEL_LEN_CHARS: usize = 63;
const MAX_DNS_SUBDOMAIN_LEN_CHARS: usize = 253;

/// Why a string is not a valid identifier of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error(
        "'{0}' is not a valid isolation class name (lower-case DNS label of at most {MAX_CLASS_NAME_LEN_CHARS} characters)"
    )]
    Class(String),
    #[error("'{0}' is not a valid RuntimeClass name (lower-case DNS subdomain)")]
    RuntimeClass(String),
    #[error(
        "'{0}' is not a valid namespace pattern (a namespace name, optionally with '*' wildcards)"
    )]
    NamespacePattern(String),
    #[error("'{0}' is not a valid label key ([prefix/]name)")]
    LabelKey(String),
    #[error("'{0}' is not a valid label value")]
    LabelValue(String),
}

fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_DNS_SUBDOMAIN_LEN_CHARS
        && s.split('.')
            .all(|l| is_dns_label(l, MAX_DNS_LABEL_LEN_CHARS))
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_DNS_LABEL_LEN_CHARS
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'-' | b'_' | b'.'))
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $check:expr, $err:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The identifier as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                let check: fn(&str) -> bool = $check;
                if check(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err($err(s.to_owned()))
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_newtype!(
    /// An isolation class: a lower-case DNS label of at most [`MAX_CLASS_NAME_LEN_CHARS`].
    ClassName,
    |s| is_dns_label(s, MAX_CLASS_NAME_LEN_CHARS),
    NameError::Class
);

string_newtype!(
    /// A `RuntimeClass` object name: a lower-case DNS subdomain.
    RuntimeClassName,
    is_dns_subdomain,
    NameError::RuntimeClass
);

string_newtype!(
    /// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
    /// characters.
    LabelKey,
    |s| match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    },
    NameError::LabelKey
);

string_newtype!(
    /// A label value: empty, or a qualified name part of at most 63 characters.
    LabelValue,
    |s| s.is_empty() || is_qualified_name_part(s),
    NameError::LabelValue
);

string_newtype!(
    /// A namespace name or a glob over namespace names where `*` matches any run of characters
    /// (`kube-system`, `*-system`, `tenant-*`, `*`).
    NamespacePattern,
    |s| !s.is_empty()
        && s.len() <= MAX_DNS_LABEL_LEN_CHARS
        && s.bytes().all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-' || x == b'*'),
    NameError::NamespacePattern
);

impl NamespacePattern {
    /// Whether the pattern has a wildcard (matches more than one name).
    pub fn is_glob(&self) -> bool {
        self.0.contains('*')
    }

    /// Whether `namespace` matches this pattern.
    pub fn matches(&self, namespace: &str) -> bool {
        glob_match(self.0.as_bytes(), namespace.as_bytes())
    }
}

/// Iterative glob with `*` only: linear in practice, no recursion.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names() {
        for ok in [
            "a",
            "untrusted",
            "team-a-1",
            &"x".repeat(MAX_CLASS_NAME_LEN_CHARS),
        ] {
            assert!(ok.parse::<ClassName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a.b",
            "a_b",
            &"x".repeat(MAX_CLASS_NAME_LEN_CHARS + 1),
        ] {
            assert_eq!(
                bad.parse::<ClassName>(),
                Err(NameError::Class(bad.to_owned()))
            );
        }
    }

    #[test]
    fn runtime_class_names() {
        for ok in ["gvisor", "kata-qemu", "runsc.v1"] {
            assert!(ok.parse::<RuntimeClassName>().is_ok(), "{ok}");
        }
        for bad in ["", "Kata", "a..b", "-x"] {
            assert!(bad.parse::<RuntimeClassName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "ipp",
            "ipp-class",
            "moat.dev/class",
            "node-restriction.kubernetes.io/moat-class",
            "A_b.c",
        ] {
            assert!(ok.parse::<LabelKey>().is_ok(), "{ok}");
        }
        for bad in ["", "/x", "a/", "Bad.Prefix/x", "a/b/c", "-x"] {
            assert!(bad.parse::<LabelKey>().is_err(), "{bad}");
        }
        for ok in ["", "true", "a.b-c_D"] {
            assert!(ok.parse::<LabelValue>().is_ok(), "{ok}");
        }
        assert!("a b".parse::<LabelValue>().is_err());
    }

    #[test]
    fn namespace_patterns_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("kube-system", "kube-system", true),
            ("kube-system", "kube-system2", false),
            ("*-system", "kube-system", true),
            ("*-system", "moat-system", true),
            ("*-system", "system", false),
            ("tenant-*", "tenant-a", true),
            ("tenant-*", "tenant-", true),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (pattern, ns, want) in cases {
            let p: NamespacePattern = pattern.parse().unwrap();
            assert_eq!(p.matches(ns), *want, "{pattern} vs {ns}");
        }
        assert!("Kube".parse::<NamespacePattern>().is_err());
        assert!("a?b".parse::<NamespacePattern>().is_err());
    }
}
