//! SPIFFE IDs, and the few facts moat reads from X.509 DER: where one certificate ends in a
//! concatenation (SPIRE sends a trust domain's roots back to back), and a certificate's URI
//! SANs (the SVID's SPIFFE ID). A small DER reader is enough for both; nothing here verifies
//! signatures, which is the workload's job with the bundle moat writes beside the SVID.

use std::fmt;
use std::str::FromStr;

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

/// DER that moat could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DerError {
    #[error("truncated DER")]
    Truncated,
    #[error("DER length form not allowed")]
    Length,
    #[error("expected a SEQUENCE")]
    NotSequence,
    #[error("no certificate")]
    Empty,
}

/// One DER element: its tag, its content, and everything after it.
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError::Truncated)?;
    let (&first, mut rest) = rest.split_first().ok_or(DerError::Truncated)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        // Indefinite length (0x80) is BER, not DER; more than 4 length bytes is never a
        // certificate moat needs to read.
        if count == 0 || count > 4 {
            return Err(DerError::Length);
        }
        if rest.len() < count {
            return Err(DerError::Truncated);
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return Err(DerError::Truncated);
    }
    let (content, after) = rest.split_at(len);
    Ok((tag, content, after))
}

const SEQUENCE: u8 = 0x30;

/// Splits concatenated DER certificates (SPIRE's bundle values) into one slice each.
///
/// # Errors
/// [`DerError`] when the bytes are not whole DER SEQUENCEs, or there are none.
pub fn split_certificates(mut der: &[u8]) -> Result<Vec<&[u8]>, DerError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (tag, _, rest) = element(der)?;
        if tag != SEQUENCE {
            return Err(DerError::NotSequence);
        }
        out.push(&der[..der.len() - rest.len()]);
        der = rest;
    }
    if out.is_empty() {
        return Err(DerError::Empty);
    }
    Ok(out)
}

/// The subjectAltName extension's OID, 2.5.29.17, as DER content bytes.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The URI SANs of a DER certificate.
///
/// # Errors
/// [`DerError`] when the certificate's structure cannot be read.
pub fn uri_sans(cert: &[u8]) -> Result<Vec<String>, DerError> {
    let (tag, certificate, _) = element(cert)?;
    if tag != SEQUENCE {
        return Err(DerError::NotSequence);
    }
    let (tag, mut tbs, _) = element(certificate)?;
    if tag != SEQUENCE {
        return Err(DerError::NotSequence);
    }
    let mut uris = Vec::new();
    while !tbs.is_empty() {
        let (tag, content, rest) = element(tbs)?;
        tbs = rest;
        // extensions [3] EXPLICIT Extensions
        if tag != 0xa3 {
            continue;
        }
        let (_, mut extensions, _) = element(content)?;
        while !extensions.is_empty() {
            let (_, extension, rest) = element(extensions)?;
            extensions = rest;
            let (_, oid, mut fields) = element(extension)?;
            if oid != OID_SUBJECT_ALT_NAME {
                continue;
            }
            // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            let (mut tag, mut value, rest) = element(fields)?;
            if tag == 0x01 {
                fields = rest;
                (tag, value, _) = element(fields)?;
            }
            if tag != 0x04 {
                return Err(DerError::NotSequence);
            }
            let (_, mut names, _) = element(value)?;
            while !names.is_empty() {
                let (tag, name, rest) = element(names)?;
                names = rest;
                // uniformResourceIdentifier [6] IA5String
                if tag == 0x86 {
                    uris.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Ok(uris)
}

/// PEM-encodes DER blocks under `label` (`CERTIFICATE`, `PRIVATE KEY`).
#[must_use]
pub fn pem<B: AsRef<[u8]>>(label: &str, blocks: &[B]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for block in blocks {
        out.push_str("-----BEGIN ");
        out.push_str(label);
        out.push_str("-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(block.as_ref());
        for line in b64.as_bytes().chunks(64) {
            // Base64 output is ASCII.
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END ");
        out.push_str(label);
        out.push_str("-----\n");
    }
    out
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
        assert_eq!(split_certificates(&[]), Err(DerError::Empty));
        assert_eq!(
            split_certificates(&a[..a.len() - 1]),
            Err(DerError::Truncated)
        );
        assert_eq!(
            split_certificates(&[0x04, 0x00]),
            Err(DerError::NotSequence)
        );
        assert_eq!(
            split_certificates(&[0x30, 0x80, 0, 0]),
            Err(DerError::Length)
        );
        assert!(uri_sans(&a[..40]).is_err());
        assert!(uri_sans(&[0x30]).is_err());
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let text = pem("CERTIFICATE", &[[0u8; 100]]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert_eq!(pem("X", &[[1], [2]]).matches("BEGIN X").count(), 2);
    }
}
