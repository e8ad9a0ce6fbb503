//! SPIFFE IDs, and what moat reads from X.509 certificates (with `x509-parser`): where one
//! certificate ends in a concatenation (SPIRE sends a trust domain's roots back to back), a
//! certificate's URI SANs (the SVID's SPIFFE ID), and whether an SVID's chain holds together.
//! PEM output is the `pem` crate's.

use std::fmt;
use std::str::FromStr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE specification's limit).
pub const MAX_SPIFFE_ID_LEN_BYTES: usize = 2048;

/// A SPIFFE ID: `spiffe://<trust domain>[/<path>]`, checked against the SPIFFE ID rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    trust_domain_len: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID starts with 'spiffe://'")]
    Scheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain may hold only a-z, 0-9, '.', '-' and '_'")]
    TrustDomainChar,
    #[error("a path segment is empty (a doubled or trailing '/')")]
    EmptySegment,
    #[error("a path segment is '.' or '..'")]
    DotSegment,
    #[error("a path may hold only letters, digits, '.', '-', '_' and '/'")]
    PathChar,
    #[error("longer than {MAX_SPIFFE_ID_LEN_BYTES} bytes")]
    TooLong,
}

impl SpiffeId {
    /// The trust domain's name (`example.org`).
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.trust_domain_len]
    }

    /// The trust domain's own ID (`spiffe://example.org`), the key of SPIRE's bundle map.
    #[must_use]
    pub fn trust_domain_id(&self) -> &str {
        &self.id[..self.trust_domain_len]
    }

    /// The whole ID.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN_BYTES {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomainChar);
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ if !segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) =>
                    {
                        return Err(SpiffeIdError::PathChar);
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            id: s.to_owned(),
            trust_domain_len: "spiffe://".len() + td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// A certificate moat could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("no certificate")]
    Empty,
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("bytes follow the certificate")]
    Trailing,
    #[error("unreadable subjectAltName: {0}")]
    SubjectAltName(String),
}

/// Parses one DER certificate that is the whole of `der`.
fn certificate(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    if der.is_empty() {
        return Err(CertError::Empty);
    }
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Trailing);
    }
    Ok(cert)
}

/// Splits concatenated DER certificates (SPIRE's bundle values) into one slice each, every one a
/// certificate that parses.
///
/// # Errors
/// [`CertError`] when the bytes are not whole certificates, or there are none.
pub fn split_certificates(mut der: &[u8]) -> Result<Vec<&[u8]>, CertError> {
    if der.is_empty() {
        return Err(CertError::Empty);
    }
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let (cert, after) = der.split_at(der.len() - rest.len());
        out.push(cert);
        der = after;
    }
    Ok(out)
}

/// The URI SANs of a DER certificate.
///
/// # Errors
/// [`CertError`] when the certificate or its subjectAltName cannot be read.
pub fn uri_sans(cert: &[u8]) -> Result<Vec<String>, CertError> {
    uris(&certificate(cert)?)
}

fn uris(cert: &X509Certificate<'_>) -> Result<Vec<String>, CertError> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| CertError::SubjectAltName(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// Why a certificate chain is not an X.509-SVID's. Certificates are numbered from 0, the leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("the chain has no certificate")]
    Empty,
    #[error("certificate {index}: {source}")]
    Certificate { index: usize, source: CertError },
    #[error("the leaf certificate carries {0:?}, not one SPIFFE ID")]
    LeafId(Vec<String>),
    #[error("the leaf certificate is a CA")]
    LeafIsCa,
    #[error("certificate {index} is not a CA but signs the certificate before it")]
    IssuerNotCa { index: usize },
    #[error("certificate {index}'s issuer is not the subject of the certificate after it")]
    Order { index: usize },
    #[error("certificate {index}'s signature does not verify with the next certificate's key")]
    Signature { index: usize },
}

/// Checks an X.509-SVID's chain (leaf first, DER) and returns the leaf's SPIFFE ID: every
/// certificate parses; the leaf is not a CA and carries exactly one URI SAN, a SPIFFE ID; each
/// further certificate is a CA, is the subject the one before it names as issuer, and its key
/// verifies that one's signature.
///
/// The chain's link to a trust domain root is not checked here: the workload verifies it with
/// the bundle written beside the SVID.
///
/// # Errors
/// [`ChainError`] naming the first rule broken.
pub fn check_chain<B: AsRef<[u8]>>(chain: &[B]) -> Result<SpiffeId, ChainError> {
    let certs = chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            certificate(der.as_ref()).map_err(|source| ChainError::Certificate { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = certs.first().ok_or(ChainError::Empty)?;
    let sans = uris(leaf).map_err(|source| ChainError::Certificate { index: 0, source })?;
    let id = match sans.as_slice() {
        [san] => san.parse::<SpiffeId>().ok(),
        _ => None,
    }
    .ok_or_else(|| ChainError::LeafId(sans.clone()))?;
    if leaf.is_ca() {
        return Err(ChainError::LeafIsCa);
    }
    for (index, pair) in certs.windows(2).enumerate() {
        let [cert, issuer] = pair else { continue };
        let issuer_index = index + 1;
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(ChainError::Order { index });
        }
        if !issuer.is_ca() {
            return Err(ChainError::IssuerNotCa {
                index: issuer_index,
            });
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| ChainError::Signature { index })?;
    }
    Ok(id)
}

/// PEM-encodes DER blocks under `label` (`CERTIFICATE`, `PRIVATE KEY`): one block after another,
/// lines of 64 characters ending in `\n`.
#[must_use]
pub fn pem<B: AsRef<[u8]>>(label: &str, blocks: &[B]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    blocks
        .iter()
        .map(|block| pem::encode_config(&pem::Pem::new(label, block.as_ref()), config))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_by_the_rules() {
        let id: SpiffeId = "spiffe://example.org/ns/web/sa/api".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.trust_domain_id(), "spiffe://example.org");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/web/sa/api");
        let bare: SpiffeId = "spiffe://td".parse().unwrap();
        assert_eq!(bare.trust_domain_id(), "spiffe://td");
        let cases = [
            ("http://example.org/x", SpiffeIdError::Scheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://Example.org/x", SpiffeIdError::TrustDomainChar),
            (
                "spiffe://example.org:8080/x",
                SpiffeIdError::TrustDomainChar,
            ),
            ("spiffe://example.org/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a//b", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/../b", SpiffeIdError::DotSegment),
            ("spiffe://example.org/a b", SpiffeIdError::PathChar),
            ("spiffe://example.org/a?q", SpiffeIdError::PathChar),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN_BYTES));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }

    fn cert_with_uri(uri: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_uri_sans_of_a_real_certificate() {
        let der = cert_with_uri("spiffe://example.org/workload");
        assert_eq!(uri_sans(&der).unwrap(), ["spiffe://example.org/workload"]);
    }

    #[test]
    fn splits_concatenated_roots() {
        let a = cert_with_uri("spiffe://example.org");
        let b = cert_with_uri("spiffe://example.org");
        let joined = [a.clone(), b.clone()].concat();
        let parts = split_certificates(&joined).unwrap();
        assert_eq!(parts, [a.as_slice(), b.as_slice()]);
        assert_eq!(split_certificates(&a).unwrap().len(), 1);
    }

    #[test]
    fn rejects_broken_der() {
        let a = cert_with_uri("spiffe://example.org");
        assert_eq!(split_certificates(&[]), Err(CertError::Empty));
        for broken in [
            &a[..a.len() - 1],
            &[0x04, 0x00][..],
            &[0x30, 0x80, 0, 0][..],
            &[0x30][..],
        ] {
            assert!(
                matches!(split_certificates(broken), Err(CertError::Parse(_))),
                "{broken:x?}"
            );
            assert!(matches!(uri_sans(broken), Err(CertError::Parse(_))));
        }
        assert!(uri_sans(&a[..40]).is_err());
        let trailing = [a.as_slice(), &[0]].concat();
        assert_eq!(uri_sans(&trailing), Err(CertError::Trailing));
    }

    /// A CA (root or intermediate) and what it needs to sign.
    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        der: Vec<u8>,
    }

    fn ca_params(name: &str) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params
    }

    fn root(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params(name);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            der,
        }
    }

    fn intermediate(name: &str, by: &Ca) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params(name);
        let der = params.signed_by(&key, &by.issuer).unwrap().der().to_vec();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            der,
        }
    }

    fn leaf(uris: &[&str], is_ca: bool, by: &Ca) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.signed_by(&key, &by.issuer).unwrap().der().to_vec()
    }

    const WEB: &str = "spiffe://example.org/web";

    #[test]
    fn a_chain_that_holds_together_gives_the_leafs_spiffe_id() {
        let root = root("root");
        let alone = leaf(&[WEB], false, &root);
        assert_eq!(check_chain(&[&alone]).unwrap().as_str(), WEB);
        let mid = intermediate("intermediate", &root);
        let chain = [leaf(&[WEB], false, &mid), mid.der.clone(), root.der.clone()];
        assert_eq!(check_chain(&chain).unwrap().as_str(), WEB);
    }

    #[test]
    fn chains_that_break_a_rule_are_refused_naming_it() {
        let root = root("root");
        let mid = intermediate("intermediate", &root);
        let good = leaf(&[WEB], false, &mid);
        let no_chain: [&[u8]; 0] = [];
        assert_eq!(check_chain(&no_chain), Err(ChainError::Empty));
        assert!(matches!(
            check_chain(&[&good[..10]]),
            Err(ChainError::Certificate { index: 0, .. })
        ));
        assert!(matches!(
            check_chain(&[good.as_slice(), &mid.der[..10]]),
            Err(ChainError::Certificate { index: 1, .. })
        ));
        let two = [WEB, "spiffe://example.org/db"];
        assert_eq!(
            check_chain(&[leaf(&two, false, &mid)]),
            Err(ChainError::LeafId(two.map(str::to_owned).to_vec()))
        );
        assert_eq!(
            check_chain(&[leaf(&[], false, &mid)]),
            Err(ChainError::LeafId(Vec::new()))
        );
        assert_eq!(
            check_chain(&[leaf(&["https://example.org/web"], false, &mid)]),
            Err(ChainError::LeafId(vec!["https://example.org/web".into()]))
        );
        assert_eq!(
            check_chain(&[leaf(&[WEB], true, &mid)]),
            Err(ChainError::LeafIsCa)
        );
        // Out of order: the root where the intermediate should be.
        assert_eq!(
            check_chain(&[good.clone(), root.der.clone()]),
            Err(ChainError::Order { index: 0 })
        );
        // A leaf where a CA should be: it names itself nobody's issuer, but say it did.
        let signer_leaf = {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "not a ca");
            let der = params.self_signed(&key).unwrap().der().to_vec();
            Ca {
                issuer: rcgen::Issuer::new(params, key),
                der,
            }
        };
        let under_leaf = leaf(&[WEB], false, &signer_leaf);
        assert_eq!(
            check_chain(&[under_leaf, signer_leaf.der.clone()]),
            Err(ChainError::IssuerNotCa { index: 1 })
        );
        // Same issuer name, another key: the signature does not verify.
        let impostor = intermediate("intermediate", &root);
        assert_eq!(
            check_chain(&[good, impostor.der]),
            Err(ChainError::Signature { index: 0 })
        );
    }

    #[test]
    fn pem_wraps_at_64_columns_and_reads_back() {
        let text = pem("CERTIFICATE", &[[0u8; 100]]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(!text.contains('\r'));
        let two = pem("X", &[[1], [2]]);
        assert_eq!(two.matches("BEGIN X").count(), 2);
        assert!(!two.contains("\n\n"), "no blank line between blocks");
        let back: Vec<Vec<u8>> = ::pem::parse_many(&two)
            .unwrap()
            .into_iter()
            .map(::pem::Pem::into_contents)
            .collect();
        assert_eq!(back, [[1], [2]]);
    }
}
