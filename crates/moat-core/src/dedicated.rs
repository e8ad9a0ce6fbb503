//! Dedicated node ids (dedicatedNode mode): `<class>-<16 hex><6 hex>`, a node label value.
//!
//! The first hex part binds the id to a namespace and a class: the first 64 bits of
//! SHA-256(`moat-dedicated-node/v1`, namespace, class). At admission a pod may only name an id
//! whose binding is its own namespace's, so a tenant cannot claim (or join) a node moat gave
//! another namespace's pod: it would need a namespace whose name hashes to the same 64 bits.
//! No secret is needed: knowing another namespace's ids grants nothing. The second part tells
//! pods of one namespace apart (from the request's uid), so each pod gets a node of its own.
//! The two parts are written as one run of 22 hex digits, so the longest id (a 40-character
//! class) is 63 characters, a label value's limit.

use std::fmt;

use ring::digest;

use crate::names::ClassName;

/// Hex digits binding an id to its namespace and class.
const BINDING_HEX_LEN: usize = 16;
/// Hex digits telling one namespace's pods apart.
const POD_HEX_LEN: usize = 6;
const DOMAIN: &[u8] = b"moat-dedicated-node/v1";

/// A dedicated node id, checked against the namespace and class it is used in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedicatedNodeId(String);

/// Why a pod may not use a dedicated node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DedicatedNodeIdError {
    /// Not `<class>-<22 hex>` of this class.
    #[error("'{id}' is not a dedicated node of class '{class}'")]
    OtherClass { id: String, class: String },
    /// Of this class, but bound to another namespace.
    #[error("'{id}' is a dedicated node of another namespace")]
    OtherNamespace { id: String },
}

impl DedicatedNodeId {
    /// A new id for a pod of `class` in `namespace`, told apart by `seed` (the request's uid).
    pub fn derive(namespace: &str, class: &ClassName, seed: &str) -> Self {
        let binding = binding(namespace, class);
        let pod = hex(&digest::digest(&digest::SHA256, seed.as_bytes()).as_ref()[..3]);
        Self(format!("{class}-{binding}{pod}"))
    }

    /// Checks an id a pod names against its namespace and class.
    ///
    /// # Errors
    /// [`DedicatedNodeIdError`]: not of this class's form, or bound to another namespace.
    pub fn verify(
        id: &str,
        namespace: &str,
        class: &ClassName,
    ) -> Result<Self, DedicatedNodeIdError> {
        let hex_part = id
            .strip_prefix(class.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .filter(|h| {
                h.len() == BINDING_HEX_LEN + POD_HEX_LEN
                    && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
            .ok_or_else(|| DedicatedNodeIdError::OtherClass {
                id: id.to_owned(),
                class: class.to_string(),
            })?;
        if hex_part[..BINDING_HEX_LEN] != binding(namespace, class) {
            return Err(DedicatedNodeIdError::OtherNamespace { id: id.to_owned() });
        }
        Ok(Self(id.to_owned()))
    }

    /// The label value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DedicatedNodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn binding(namespace: &str, class: &ClassName) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    // Length-prefixed parts: no two (namespace, class) pairs encode alike.
    for part in [DOMAIN, namespace.as_bytes(), class.as_str().as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    hex(&ctx.finish().as_ref()[..BINDING_HEX_LEN / 2])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::MAX_CLASS_NAME_LEN_CHARS;

    fn class(s: &str) -> ClassName {
        s.parse().unwrap()
    }

    #[test]
    fn ids_are_label_values_bound_to_namespace_and_class() {
        let gold = class("gold");
        let id = DedicatedNodeId::derive("shop", &gold, "uid-1");
        assert_eq!(id.as_str().len(), "gold-".len() + 22);
        assert_eq!(
            DedicatedNodeId::verify(id.as_str(), "shop", &gold),
            Ok(id.clone())
        );
        assert_eq!(
            DedicatedNodeId::verify(id.as_str(), "bank", &gold),
            Err(DedicatedNodeIdError::OtherNamespace { id: id.to_string() })
        );
        assert!(matches!(
            DedicatedNodeId::verify(id.as_str(), "shop", &class("silver")),
            Err(DedicatedNodeIdError::OtherClass { .. })
        ));
        assert_ne!(id, DedicatedNodeId::derive("shop", &gold, "uid-2"));
        let longest = class(&"x".repeat(MAX_CLASS_NAME_LEN_CHARS));
        assert!(DedicatedNodeId::derive("ns", &longest, "u").as_str().len() <= 63);
    }

    #[test]
    fn rejects_ids_of_the_wrong_form() {
        let gold = class("gold");
        for id in [
            "gold-0123456789",
            "gold-",
            "golden-00000000000000000000aa",
            "gold-00000000000000000000AA",
            "",
        ] {
            assert!(DedicatedNodeId::verify(id, "shop", &gold).is_err(), "{id}");
        }
    }
}
