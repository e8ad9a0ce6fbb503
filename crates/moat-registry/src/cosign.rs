//! cosign signatures as `cosign sign` stores them by default, and their verification.
//!
//! For an image at digest `sha256:<hex>`, cosign pushes to the same repository a manifest
//! tagged `sha256-<hex>.sig`. Each of its layers is one signature: the layer blob is the
//! signed payload, a "simple signing" JSON document
//!
//! ```json
//! {"critical": {"identity": {"docker-reference": "reg/shop/api"},
//!               "image": {"docker-manifest-digest": "sha256:<hex>"},
//!               "type": "cosign container image signature"},
//!  "optional": null}
//! ```
//!
//! and the layer's annotation `dev.cosignproject.cosign/signature` holds the base64 signature
//! over the payload's bytes (ECDSA P-256 with SHA-256, ASN.1 DER, for `cosign generate-key-pair`
//! keys). A signature is accepted when it verifies with a trusted key **and** its payload names
//! the digest being admitted (otherwise a valid signature over another image could be replayed
//! onto this one) and, unless the rule allows mirrors, this repository.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use moat_core::image::ImageRef;
use moat_core::trust::{KeyAlgorithm, TrustedKey};
use serde::Deserialize;

use crate::digest::Digest;

/// The layer annotation holding a signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The `critical.type` of an image signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";

/// One signature of a `.sig` manifest: its payload blob and the signature over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The payload blob's digest.
    pub payload: Digest,
    /// Its size as the manifest declares it.
    pub size: u64,
    /// The decoded signature; `None` when the annotation is missing or not base64.
    pub signature: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(default)]
    layers: Vec<LayerDoc>,
}

#[derive(Deserialize)]
struct LayerDoc {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

/// The signatures of a `sha256-<hex>.sig` manifest.
///
/// # Errors
/// A reason, when the manifest is not JSON or a layer's digest is not sha256.
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    let doc: ManifestDoc =
        serde_json::from_slice(manifest).map_err(|e| format!("not a manifest: {e}"))?;
    doc.layers
        .into_iter()
        .map(|l| {
            Ok(SignatureLayer {
                payload: l.digest.parse().map_err(|e| format!("{e}"))?,
                size: l.size,
                signature: l
                    .annotations
                    .get(SIGNATURE_ANNOTATION)
                    .and_then(|s| BASE64.decode(s.trim()).ok()),
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// What the signed claims say about the image being admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claims {
    /// The payload names this digest (and repository, when that is checked).
    Match,
    /// A reason the payload does not cover this image.
    Mismatch(String),
}

/// Checks a signed payload against the image being admitted.
pub fn check_claims(
    payload: &[u8],
    digest: &Digest,
    repository: &ImageRef,
    same_repository: bool,
) -> Claims {
    let Ok(p) = serde_json::from_slice::<Payload>(payload) else {
        return Claims::Mismatch("its payload is not a cosign simple-signing document".to_owned());
    };
    if p.critical.kind != SIGNATURE_TYPE {
        return Claims::Mismatch(format!(
            "its payload's type is '{}', not '{SIGNATURE_TYPE}'",
            p.critical.kind
        ));
    }
    if p.critical.image.docker_manifest_digest != digest.to_string() {
        return Claims::Mismatch(format!(
            "it signs another digest ({})",
            p.critical.image.docker_manifest_digest
        ));
    }
    if same_repository {
        let signed = p
            .critical
            .identity
            .docker_reference
            .parse::<ImageRef>()
            .map(|r| r.repository());
        if signed.as_deref() != Ok(repository.repository().as_str()) {
            return Claims::Mismatch(format!(
                "it was made for another repository ({})",
                p.critical.identity.docker_reference
            ));
        }
    }
    Claims::Match
}

/// Whether `signature` over `payload` verifies with `key`.
pub fn verifies(key: &TrustedKey, payload: &[u8], signature: &[u8]) -> bool {
    let algorithm: &dyn ring::signature::VerificationAlgorithm = match key.public_key.algorithm() {
        KeyAlgorithm::EcdsaP256Sha256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::Ed25519 => &ring::signature::ED25519,
        _ => return false,
    };
    ring::signature::UnparsedPublicKey::new(algorithm, key.public_key.raw())
        .verify(payload, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::trust::PublicKey;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn payload(reference: &str, digest: &str) -> Vec<u8> {
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{reference}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        )
        .into_bytes()
    }

    fn spki_p256(point: &[u8]) -> Vec<u8> {
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.extend_from_slice(point);
        der
    }

    fn p256() -> (EcdsaKeyPair, TrustedKey) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let key = TrustedKey {
            name: "k".into(),
            public_key: PublicKey::from_spki_der(&spki_p256(pair.public_key().as_ref())).unwrap(),
        };
        (pair, key)
    }

    #[test]
    fn an_ecdsa_signature_verifies_with_its_key_only() {
        let (pair, key) = p256();
        let (_, other) = p256();
        let p = payload("reg/a", DIGEST);
        let sig = pair.sign(&SystemRandom::new(), &p).unwrap();
        assert!(verifies(&key, &p, sig.as_ref()));
        assert!(!verifies(&other, &p, sig.as_ref()));
        let mut tampered = p.clone();
        tampered[10] ^= 1;
        assert!(!verifies(&key, &tampered, sig.as_ref()));
    }

    #[test]
    fn an_ed25519_signature_verifies() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(pair.public_key().as_ref());
        let key = TrustedKey {
            name: "e".into(),
            public_key: PublicKey::from_spki_der(&der).unwrap(),
        };
        let p = payload("reg/a", DIGEST);
        assert!(verifies(&key, &p, pair.sign(&p).as_ref()));
    }

    #[test]
    fn claims_must_name_the_digest_and_the_repository() {
        let d: Digest = DIGEST.parse().unwrap();
        let image: ImageRef = "reg.example/shop/api:1".parse().unwrap();
        let ok = payload("reg.example/shop/api", DIGEST);
        assert_eq!(check_claims(&ok, &d, &image, true), Claims::Match);
        let other_digest = payload(
            "reg.example/shop/api",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        );
        assert!(matches!(
            check_claims(&other_digest, &d, &image, true),
            Claims::Mismatch(m) if m.contains("another digest")
        ));
        let other_repo = payload("reg.example/shop/evil", DIGEST);
        assert!(matches!(
            check_claims(&other_repo, &d, &image, true),
            Claims::Mismatch(m) if m.contains("another repository")
        ));
        assert_eq!(check_claims(&other_repo, &d, &image, false), Claims::Match);
        assert!(matches!(
            check_claims(b"[]", &d, &image, true),
            Claims::Mismatch(_)
        ));
    }

    #[test]
    fn docker_hub_references_compare_normalised() {
        let d: Digest = DIGEST.parse().unwrap();
        let image: ImageRef = "busybox:1.36".parse().unwrap();
        let p = payload("index.docker.io/library/busybox", DIGEST);
        assert_eq!(check_claims(&p, &d, &image, true), Claims::Match);
    }

    #[test]
    fn reads_the_layers_of_a_signature_manifest() {
        let m = format!(
            r#"{{"schemaVersion":2,"layers":[{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"{DIGEST}","size":250,"annotations":{{"{SIGNATURE_ANNOTATION}":"AQID"}}}},{{"digest":"{DIGEST}","size":1}}]}}"#
        );
        let layers = signature_layers(m.as_bytes()).unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].signature.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(layers[1].signature, None);
        assert!(signature_layers(b"<html>").is_err());
        assert!(signature_layers(br#"{"layers":[{"digest":"md5:abc"}]}"#).is_err());
    }
}
