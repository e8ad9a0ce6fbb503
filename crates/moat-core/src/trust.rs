//! `images.trust`: which images moat resolves to a digest at the registry, and whose signatures
//! it requires on them. Plain configuration types with their parsers; the registry calls and the
//! signature checks live in `moat-registry`. See `docs/policies.md` ("Image trust").
//!
//! ```
//! use moat_core::trust::ImageTrust;
//! let trust: ImageTrust = serde_yaml_ng::from_str(r#"
//! rules:
//!   - repositories: [registry.example.com/shop]
//!     signatures: required
//!     keys:
//!       - name: release
//!         publicKey: |
//!           -----BEGIN PUBLIC KEY-----
//!           MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGop020WFOi7ybNff8X0GZVwmJwE4
//!           W5s+iL1X6WjzR22CcC2PX+xCNSpp2YBkyX5dTPr0XrA5vDD5/Q/lmfTlbg==
//!           -----END PUBLIC KEY-----
//! "#).unwrap();
//! assert_eq!(trust.rules[0].keys[0].name, "release");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::image::{ImageRef, RegistryPrefix};
use crate::names::NamespacePattern;

/// Longest `tagTtlSeconds`: a tag → digest answer older than an hour is more likely a typo than
/// a policy (a moved tag would go unseen that long).
pub const MAX_TAG_TTL_SECONDS: u32 = 3600;

/// The default `tagTtlSeconds`: short enough that a moved tag reaches new pods within half a
/// minute, long enough that a Deployment's replicas, created together, share one lookup.
pub const DEFAULT_TAG_TTL_SECONDS: u32 = 30;

/// `images.trust`. Absent: moat calls no registry (the default; `moat review` never does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageTrust {
    /// How long a tag → digest answer is reused, in seconds (0: never; concurrent lookups are
    /// still shared).
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl_seconds: u32,
    /// A mounted `kubernetes.io/dockerconfigjson` Secret key (`.dockerconfigjson`), read again
    /// when it changes. Absent: every registry is called anonymously.
    #[serde(default)]
    pub credentials_file: Option<String>,
    /// PEM certificates trusted for registries' TLS, beside the system roots.
    #[serde(default)]
    pub ca_certificates: Option<PemCertificates>,
    /// Images no rule names.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Tried in order; the first whose repositories (and namespaces, if any) match applies.
    #[serde(default)]
    pub rules: Vec<TrustRule>,
}

fn default_tag_ttl() -> u32 {
    DEFAULT_TAG_TTL_SECONDS
}

fn yes() -> bool {
    true
}

/// What happens to an image no rule names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unmatched {
    /// Denied: every registry a pod may pull from must be named by a rule (fail closed).
    #[default]
    Deny,
    /// Pinned to the digest the registry serves, no signature required.
    Pin,
}

/// Whether a rule requires a signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SignaturePolicy {
    /// A cosign signature by one of the rule's keys over the digest being admitted.
    #[default]
    Required,
    /// Pinned only.
    Off,
}

/// One rule of `images.trust.rules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustRule {
    /// Registries or repository prefixes, matched by whole path components as in
    /// `allowedRegistries`.
    pub repositories: Vec<RegistryPrefix>,
    /// Only for pods in these namespaces (patterns); empty: every namespace.
    #[serde(default)]
    pub namespaces: Vec<NamespacePattern>,
    /// Whether a signature is required.
    #[serde(default)]
    pub signatures: SignaturePolicy,
    /// Keys whose signatures are accepted (any one suffices).
    #[serde(default)]
    pub keys: Vec<TrustedKey>,
    /// The signed payload's `critical.identity.docker-reference` must name the repository
    /// being admitted (off for mirrors that copy signatures from elsewhere).
    #[serde(default = "yes")]
    pub require_same_repository: bool,
}

impl TrustRule {
    /// Whether this rule applies to `image` pulled in `namespace`.
    pub fn applies(&self, image: &ImageRef, namespace: &str) -> bool {
        self.repositories.iter().any(|r| r.contains(image))
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|p| p.matches(namespace)))
    }
}

impl ImageTrust {
    /// The rule for `image` in `namespace`, and its index, if any.
    pub fn rule_for(&self, image: &ImageRef, namespace: &str) -> Option<(usize, &TrustRule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.applies(image, namespace))
    }

    /// The rules that span fields; `at` is this section's path.
    ///
    /// # Errors
    /// `(path, message)` for the first rule that does not hold.
    pub fn check(&self, at: &str) -> Result<(), (String, String)> {
        if self.tag_ttl_seconds > MAX_TAG_TTL_SECONDS {
            return Err((
                format!("{at}.tagTtlSeconds"),
                format!(
                    "{} is more than the {MAX_TAG_TTL_SECONDS} s a tag's digest may be reused",
                    self.tag_ttl_seconds
                ),
            ));
        }
        if let Some(path) = &self.credentials_file
            && !path.starts_with('/')
        {
            return Err((
                format!("{at}.credentialsFile"),
                format!("'{path}' must be an absolute path"),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let here = format!("{at}.rules[{i}]");
            if rule.repositories.is_empty() {
                return Err((
                    format!("{here}.repositories"),
                    "names no repository, so the rule matches no image".to_owned(),
                ));
            }
            if rule.signatures == SignaturePolicy::Required && rule.keys.is_empty() {
                return Err((
                    format!("{here}.keys"),
                    "signatures are required but no key is trusted, so every image would be denied"
                        .to_owned(),
                ));
            }
            for (k, key) in rule.keys.iter().enumerate() {
                if key.name.is_empty() {
                    return Err((format!("{here}.keys[{k}].name"), "is empty".to_owned()));
                }
                if rule.keys[..k].iter().any(|o| o.name == key.name) {
                    return Err((
                        format!("{here}.keys[{k}].name"),
                        format!("key '{}' is named twice", key.name),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A key whose signatures a rule accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustedKey {
    /// Named in messages and logs.
    pub name: String,
    /// PEM `PUBLIC KEY` (PKIX), as `cosign generate-key-pair` writes `cosign.pub`.
    pub public_key: PublicKey,
}

/// The algorithms moat verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA over P-256 with SHA-256, the signature ASN.1 DER (cosign's default key).
    EcdsaP256Sha256,
    /// Ed25519 over the payload itself.
    Ed25519,
}

/// A public key, parsed from PEM `SubjectPublicKeyInfo`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: KeyAlgorithm,
    /// The key as the algorithm takes it: the uncompressed point (65 bytes) for P-256, the 32
    /// bytes for Ed25519.
    raw: Vec<u8>,
    pem: String,
}

/// Why a string is not a public key moat can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicKeyError {
    #[error("not PEM: {0}")]
    NotPem(String),
    #[error("PEM block is '{0}', expected 'PUBLIC KEY'")]
    WrongBlock(String),
    #[error(
        "not an ECDSA P-256 or Ed25519 SubjectPublicKeyInfo (cosign generate-key-pair writes P-256)"
    )]
    UnsupportedKey,
}

// DER is canonical, so each supported algorithm's SubjectPublicKeyInfo is a fixed prefix (the
// algorithm identifier and the bit string's header) followed by the key bytes.
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (66 bytes, 0 unused bits) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// SEQUENCE { SEQUENCE { id-Ed25519 }, BIT STRING (33 bytes, 0 unused bits) }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl PublicKey {
    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The key bytes as the algorithm takes them (see [`KeyAlgorithm`]).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Parses the DER `SubjectPublicKeyInfo`.
    ///
    /// # Errors
    /// [`PublicKeyError::UnsupportedKey`] for any other algorithm or a malformed key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, PublicKeyError> {
        let (algorithm, raw) = if let Some(point) = der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            // Uncompressed point: 0x04, X, Y.
            if point.len() != 65 || point[0] != 0x04 {
                return Err(PublicKeyError::UnsupportedKey);
            }
            (KeyAlgorithm::EcdsaP256Sha256, point)
        } else if let Some(key) = der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            if key.len() != 32 {
                return Err(PublicKeyError::UnsupportedKey);
            }
            (KeyAlgorithm::Ed25519, key)
        } else {
            return Err(PublicKeyError::UnsupportedKey);
        };
        let pem = pem::encode_config(
            &pem::Pem::new("PUBLIC KEY", der.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        Ok(Self {
            algorithm,
            raw: raw.to_vec(),
            pem,
        })
    }
}

impl FromStr for PublicKey {
    type Err = PublicKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let block = pem::parse(s.trim()).map_err(|e| PublicKeyError::NotPem(e.to_string()))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(PublicKeyError::WrongBlock(block.tag().to_owned()));
        }
        Self::from_spki_der(block.contents())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pem)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({:?}, {} bytes)",
            self.algorithm,
            self.raw.len()
        )
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pem)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One or more PEM `CERTIFICATE` blocks, kept as DER. Whether each is a usable CA is decided
/// when the TLS configuration is built (the server refuses to start otherwise).
#[derive(Clone, PartialEq, Eq)]
pub struct PemCertificates {
    ders: Vec<Vec<u8>>,
    pem: String,
}

impl PemCertificates {
    /// The certificates, DER.
    pub fn ders(&self) -> &[Vec<u8>] {
        &self.ders
    }
}

impl FromStr for PemCertificates {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let blocks = pem::parse_many(s).map_err(|e| format!("not PEM: {e}"))?;
        if blocks.is_empty() {
            return Err("no PEM block".to_owned());
        }
        let mut ders = Vec::with_capacity(blocks.len());
        for b in blocks {
            if b.tag() != "CERTIFICATE" {
                return Err(format!(
                    "PEM block is '{}', expected 'CERTIFICATE'",
                    b.tag()
                ));
            }
            ders.push(b.into_contents());
        }
        Ok(Self {
            ders,
            pem: s.to_owned(),
        })
    }
}

impl fmt::Debug for PemCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PemCertificates({} certificates)", self.ders.len())
    }
}

impl Serialize for PemCertificates {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pem)
    }
}

impl<'de> Deserialize<'de> for PemCertificates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the registry said about one image reference, as the server found it before the
/// decision (the engine itself calls no registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageVerdict {
    /// Resolved (and verified, when its rule requires a signature): the pod must run `pinned`,
    /// `name[:tag]@sha256:…` (the reference itself when it already named a digest).
    Admitted { pinned: String },
    /// Why the image is refused: the registry and the reason.
    Refused(String),
}

/// Verdicts by image reference as the pod writes it, each with the reference as the server
/// parsed it to ask the registry, so the decision does not parse it a second time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageVerdicts {
    by_reference: std::collections::HashMap<String, (ImageVerdict, Option<ImageRef>)>,
}

impl ImageVerdicts {
    /// No verdicts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the verdict on `raw`, with `parsed`, what `raw.parse()` gave.
    pub fn insert(&mut self, raw: String, verdict: ImageVerdict, parsed: Option<ImageRef>) {
        self.by_reference.insert(raw, (verdict, parsed));
    }

    /// The verdict on `raw`.
    pub fn get(&self, raw: &str) -> Option<&ImageVerdict> {
        self.by_reference.get(raw).map(|(v, _)| v)
    }

    /// `raw` parsed, when the verdict came with it.
    pub fn parsed(&self, raw: &str) -> Option<&ImageRef> {
        self.by_reference.get(raw).and_then(|(_, p)| p.as_ref())
    }

    /// How many references have a verdict.
    pub fn len(&self) -> usize {
        self.by_reference.len()
    }

    /// Whether no reference has one.
    pub fn is_empty(&self) -> bool {
        self.by_reference.is_empty()
    }
}

impl FromIterator<(String, ImageVerdict)> for ImageVerdicts {
    fn from_iter<I: IntoIterator<Item = (String, ImageVerdict)>>(iter: I) -> Self {
        Self {
            by_reference: iter.into_iter().map(|(r, v)| (r, (v, None))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // cosign generate-key-pair's cosign.pub (a P-256 key).
    const COSIGN_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGop020WFOi7ybNff8X0GZVwmJwE4
W5s+iL1X6WjzR22CcC2PX+xCNSpp2YBkyX5dTPr0XrA5vDD5/Q/lmfTlbg==
-----END PUBLIC KEY-----
";
    const ED25519_PUB: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAU91QqqPx4mMiZ+nre78KHIgkgKOzaHKiXQDbpi2btgM=
-----END PUBLIC KEY-----
";
    // An RSA key: not supported.
    const RSA_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAL7SOqKjuEnSbqrMFQ4psZqbIHEVOknv
LskcBCfySdnZfqEt8GnjtzBclJHpGDaoXzeAxtMelvVvN0r18cq/uoMCAwEAAQ==
-----END PUBLIC KEY-----
";

    #[test]
    fn reads_cosign_p256_and_ed25519_keys() {
        let k: PublicKey = COSIGN_PUB.parse().unwrap();
        assert_eq!(k.algorithm(), KeyAlgorithm::EcdsaP256Sha256);
        assert_eq!(k.raw().len(), 65);
        let k: PublicKey = ED25519_PUB.parse().unwrap();
        assert_eq!(k.algorithm(), KeyAlgorithm::Ed25519);
        assert_eq!(k.raw().len(), 32);
    }

    #[test]
    fn rejects_other_keys_and_blocks() {
        assert_eq!(
            RSA_PUB.parse::<PublicKey>(),
            Err(PublicKeyError::UnsupportedKey)
        );
        let cert_block = COSIGN_PUB.replace("PUBLIC KEY", "CERTIFICATE");
        assert!(matches!(
            cert_block.parse::<PublicKey>(),
            Err(PublicKeyError::WrongBlock(_))
        ));
        assert!(matches!(
            "hello".parse::<PublicKey>(),
            Err(PublicKeyError::NotPem(_))
        ));
    }

    #[test]
    fn a_key_prints_back_as_the_pem_it_was_read_from() {
        let k: PublicKey = COSIGN_PUB.parse().unwrap();
        let again: PublicKey = k.to_string().parse().unwrap();
        assert_eq!(k, again);
        // LF only, so `moat config check` prints it as a YAML block.
        assert_eq!(k.to_string(), COSIGN_PUB);
    }

    fn rule(yaml: &str) -> ImageTrust {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn the_first_matching_rule_applies() {
        let t = rule(
            "rules:
  - {repositories: [r.example/shop], namespaces: [shop], signatures: off}
  - {repositories: [r.example], signatures: off}",
        );
        let shop: ImageRef = "r.example/shop/api:1".parse().unwrap();
        assert_eq!(t.rule_for(&shop, "shop").map(|r| r.0), Some(0));
        assert_eq!(t.rule_for(&shop, "other").map(|r| r.0), Some(1));
        let elsewhere: ImageRef = "ghcr.io/x/y:1".parse().unwrap();
        assert!(t.rule_for(&elsewhere, "shop").is_none());
    }

    #[test]
    fn a_rule_applies_to_every_spelling_of_its_registry() {
        let t = rule("rules: [{repositories: [r.example/shop], signatures: off}]");
        for image in [
            "r.example/shop/api:1",
            "R.EXAMPLE/shop/api:1",
            "r.example:443/shop/api:1",
            "R.Example:0443/shop/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let i: ImageRef = image.parse().unwrap();
            assert_eq!(t.rule_for(&i, "ns").map(|r| r.0), Some(0), "{image}");
        }
        let other_port: ImageRef = "r.example:8443/shop/api:1".parse().unwrap();
        assert!(t.rule_for(&other_port, "ns").is_none());
    }

    #[test]
    fn required_signatures_need_a_key() {
        let t = rule("rules: [{repositories: [r.example]}]");
        let (path, message) = t.check("images.trust").unwrap_err();
        assert_eq!(path, "images.trust.rules[0].keys");
        assert!(message.contains("no key"), "{message}");
    }

    #[test]
    fn rejects_a_relative_credentials_file_and_a_long_ttl() {
        let t = rule("credentialsFile: creds.json");
        assert_eq!(t.check("t").unwrap_err().0, "t.credentialsFile");
        let t = rule("tagTtlSeconds: 86400");
        assert_eq!(t.check("t").unwrap_err().0, "t.tagTtlSeconds");
    }

    #[test]
    fn rejects_a_key_named_twice() {
        let t: ImageTrust = serde_yaml_ng::from_str(&format!(
            "rules: [{{repositories: [r.example], keys: [{{name: a, publicKey: {k:?}}}, {{name: a, publicKey: {k:?}}}]}}]",
            k = COSIGN_PUB
        ))
        .unwrap();
        assert_eq!(t.check("t").unwrap_err().0, "t.rules[0].keys[1].name");
    }

    #[test]
    fn reads_ca_certificates() {
        let bad = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(bad.parse::<PemCertificates>().is_err());
        assert!("".parse::<PemCertificates>().is_err());
    }
}
