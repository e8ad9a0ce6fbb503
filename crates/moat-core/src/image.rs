//! Container image references, parsed by the distribution reference grammar with Docker's
//! normalisation.
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path-component { "/" path-component }
//! domain     := host [ ":" port ]
//! tag        := [\w][\w.-]{0,127}
//! digest     := algorithm ":" encoded
//! ```
//!
//! Normalisation follows Docker: a first component without `.` or `:` that is not `localhost`
//! is not a registry, so `busybox` is `docker.io/library/busybox`; `index.docker.io` is
//! `docker.io`. Repository paths are lower case; a port is never a tag.
//!
//! The registry is kept in one canonical spelling ([`canonical_registry`]): the kubelet and
//! containerd reach `Reg.Example.COM`, `reg.example.com:443` and `reg.example.com` alike (host
//! names are case-insensitive, 443 is the https port), so moat's rules, `allowedRegistries` and
//! credentials must see one registry there, not three. The reference the pod wrote is kept
//! by the caller (moat pins the pod's own spelling); only comparisons use the canonical one.
//!
//! ```
//! use moat_core::image::ImageRef;
//! let r: ImageRef = "busybox".parse().unwrap();
//! assert_eq!(r.to_string(), "docker.io/library/busybox");
//! assert!(r.tag().is_none());
//! let r: ImageRef = "localhost:5000/redis".parse().unwrap();
//! assert_eq!(r.domain(), "localhost:5000");
//! assert!(r.tag().is_none());
//! ```

use std::fmt;
use std::str::FromStr;

/// The registry Docker assumes when a reference names none.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Other names of Docker Hub: `index.docker.io` (Docker's legacy default, which its parser
/// normalises) and `registry-1.docker.io` (the API host containerd calls for `docker.io`).
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];
/// The port an `https` registry listens on when a reference names none.
const HTTPS_PORT: u16 = 443;
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// Longest repository name (domain and path) the grammar allows.
pub const MAX_NAME_LEN_CHARS: usize = 255;
/// Longest tag the grammar allows.
pub const MAX_TAG_LEN_CHARS: usize = 128;

/// Why a string is not an image reference. One variant per grammar rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageRefError {
    #[error("reference is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN_CHARS} characters")]
    NameTooLong,
    #[error("registry host '{0}' is not a valid host name, IP address or port")]
    InvalidDomain(String),
    #[error("repository name must be lower case: '{0}'")]
    UpperCasePath(String),
    #[error(
        "repository path component '{0}' is not valid (lower-case letters, digits and single separators . _ __ -)"
    )]
    InvalidPathComponent(String),
    #[error(
        "tag '{0}' is not valid (letters, digits, _ . -, at most {MAX_TAG_LEN_CHARS}, not starting with . or -)"
    )]
    InvalidTag(String),
    #[error("digest '{0}' is not valid (algorithm:hex, sha256 needs 64 lower-case hex digits)")]
    InvalidDigest(String),
}

/// A parsed, normalised image reference. Built only through [`FromStr`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// The registry in its canonical spelling ([`canonical_registry`]), with its port if any
    /// (`docker.io`, `localhost:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if the reference has one. A port is never a tag.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference is pinned by one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `domain/path`, without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                parse_digest(digest)?;
                (rest, Some(digest.to_owned()))
            }
            None => (s, None),
        };
        // A ':' after the last '/' separates the tag; one before it belongs to a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (name, tag) = rest.split_at(last_slash + i);
                let tag = &tag[1..];
                if !valid_tag(tag) {
                    return Err(ImageRefError::InvalidTag(tag.to_owned()));
                }
                (name, Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(ImageRefError::Empty);
        }
        let (domain, path) = split_domain(name);
        if !valid_domain(domain) {
            return Err(ImageRefError::InvalidDomain(domain.to_owned()));
        }
        if path.is_empty() {
            return Err(ImageRefError::InvalidPathComponent(String::new()));
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ImageRefError::UpperCasePath(path.to_owned()));
        }
        for component in path.split('/') {
            if !valid_path_component(component) {
                return Err(ImageRefError::InvalidPathComponent(component.to_owned()));
            }
        }
        let domain = canonical_registry(domain);
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_REPO_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        // The limit applies to the normalised name, as in Docker: `a…` may fit where
        // `docker.io/library/a…` does not.
        if domain.len() + 1 + path.len() > MAX_NAME_LEN_CHARS {
            return Err(ImageRefError::NameTooLong);
        }
        Ok(Self {
            domain,
            path,
            tag,
            digest,
        })
    }
}

/// The one spelling of a registry (`host[:port]`, already valid by the grammar) that moat
/// compares: lower case (DNS names and IPv6 hex are case-insensitive), the port written as a
/// number without leading zeros and dropped when it is 443 (what `https://host` reaches), and
/// Docker Hub's other names ([`DOCKER_HUB_ALIASES`]) as `docker.io`.
///
/// What it cannot know: other names of the same host (an IP address, a CNAME, an `/etc/hosts`
/// entry, a containerd mirror). Those are other registries to moat; see `docs/policies.md`
/// ("One registry, one name") for writing rules that cover them.
///
/// ```
/// use moat_core::image::canonical_registry;
/// assert_eq!(canonical_registry("Reg.Example.COM:443"), "reg.example.com");
/// assert_eq!(canonical_registry("reg.example.com:05000"), "reg.example.com:5000");
/// assert_eq!(canonical_registry("Registry-1.Docker.IO"), "docker.io");
/// ```
pub fn canonical_registry(domain: &str) -> String {
    // One allocation in the common case (no port, not an alias): the lower-cased copy is the
    // answer, cut or extended in place (every image of every review passes here).
    let mut name = domain.to_ascii_lowercase();
    // The port follows the last ':' after any bracketed IPv6 address.
    let host_end = name.rfind(']').map_or(0, |i| i + 1);
    if let Some(colon) = name[host_end..].rfind(':').map(|i| host_end + i) {
        let digits = name[colon + 1..].trim_start_matches('0');
        match digits.parse::<u16>() {
            Ok(HTTPS_PORT) => name.truncate(colon),
            Ok(n) => {
                let port = n.to_string();
                name.truncate(colon + 1);
                name.push_str(&port);
                return name;
            }
            // Zero: one digit. More digits than a port has: left as written (nothing listens
            // there).
            Err(_) if digits.is_empty() => {
                name.truncate(colon + 1);
                name.push('0');
                return name;
            }
            Err(_) => return name,
        }
    }
    if DOCKER_HUB_ALIASES.contains(&name.as_str()) {
        return DEFAULT_DOMAIN.to_owned();
    }
    name
}

/// Docker's rule: the first component is a registry only if it looks like a host.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6]:port
        match rest.split_once(']') {
            Some((v6, after)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match after {
                    "" => return true,
                    p => match p.strip_prefix(':') {
                        Some(port) => ("", Some(port)),
                        None => return false,
                    },
                }
            }
            None => return false,
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    if host.is_empty() {
        // Only reachable for a bracketed IPv6 host, already checked.
        return domain.starts_with('[');
    }
    host.split('.').all(|c| {
        let b = c.as_bytes();
        !b.is_empty()
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    })
}

/// `[a-z0-9]+ ( ( [._] | __ | -+ ) [a-z0-9]+ )*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN_CHARS
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

fn parse_digest(d: &str) -> Result<(), ImageRefError> {
    let err = || ImageRefError::InvalidDigest(d.to_owned());
    let (algorithm, encoded) = d.split_once(':').ok_or_else(err)?;
    let alg_ok = !algorithm.is_empty()
        && algorithm.split(['+', '.', '_', '-']).all(|c| {
            c.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
                && c.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    let hex_ok = encoded.len() >= 32 && encoded.bytes().all(|b| b.is_ascii_hexdigit());
    if !alg_ok || !hex_ok {
        return Err(err());
    }
    let strict_len = match algorithm {
        "sha256" => Some(64),
        "sha384" => Some(96),
        "sha512" => Some(128),
        _ => None,
    };
    if let Some(len) = strict_len
        && (encoded.len() != len || encoded.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(err());
    }
    Ok(())
}

/// An entry of `images.allowedRegistries`: a registry, optionally with a repository path prefix
/// (`ghcr.io`, `registry.example.com:5000/team`). Matches on whole path components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryPrefix {
    domain: String,
    path: Option<String>,
}

impl RegistryPrefix {
    /// Whether `image` lives under this registry (and path prefix).
    pub fn contains(&self, image: &ImageRef) -> bool {
        image.domain() == self.domain
            && self.path.as_deref().is_none_or(|p| {
                image.path() == p
                    || image
                        .path()
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
    }
}

impl FromStr for RegistryPrefix {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim_end_matches('/');
        let (domain, path) = match s.split_once('/') {
            Some((d, p)) => (d, Some(p)),
            None => (s, None),
        };
        if domain.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if !valid_domain(domain) {
            return Err(ImageRefError::InvalidDomain(domain.to_owned()));
        }
        if let Some(path) = path
            && let Some(bad) = path.split('/').find(|c| !valid_path_component(c))
        {
            return Err(ImageRefError::InvalidPathComponent(bad.to_owned()));
        }
        Ok(Self {
            domain: canonical_registry(domain),
            path: path.map(str::to_owned),
        })
    }
}

impl fmt::Display for RegistryPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.domain)?;
        if let Some(p) = &self.path {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for RegistryPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RegistryPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_like_docker() {
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            // input, domain, path, tag
            ("busybox", "docker.io", "library/busybox", None),
            ("busybox:1.36", "docker.io", "library/busybox", Some("1.36")),
            (
                "library/busybox:latest",
                "docker.io",
                "library/busybox",
                Some("latest"),
            ),
            ("bitnami/redis:7", "docker.io", "bitnami/redis", Some("7")),
            (
                "index.docker.io/nginx:1",
                "docker.io",
                "library/nginx",
                Some("1"),
            ),
            ("localhost:5000/redis", "localhost:5000", "redis", None),
            ("localhost/redis:6", "localhost", "redis", Some("6")),
            ("host:5000/img:1.0", "host:5000", "img", Some("1.0")),
            (
                "ghcr.io/org/team/app:v1.2.3",
                "ghcr.io",
                "org/team/app",
                Some("v1.2.3"),
            ),
            ("[::1]:5000/app:v1", "[::1]:5000", "app", Some("v1")),
            (
                "Registry.Example.com/app:v1",
                "registry.example.com",
                "app",
                Some("v1"),
            ),
            ("reg.example:443/app:1", "reg.example", "app", Some("1")),
            ("REG.example:0443/app:1", "reg.example", "app", Some("1")),
            (
                "reg.example:5000/app:1",
                "reg.example:5000",
                "app",
                Some("1"),
            ),
            (
                "registry-1.docker.io/nginx:1",
                "docker.io",
                "library/nginx",
                Some("1"),
            ),
            (
                "Index.Docker.IO:443/bitnami/redis:7",
                "docker.io",
                "bitnami/redis",
                Some("7"),
            ),
            ("[::ABCD]:443/app:v1", "[::abcd]", "app", Some("v1")),
            ("a/b__c/d-e.f:x", "docker.io", "a/b__c/d-e.f", Some("x")),
        ];
        for (input, domain, path, tag) in cases {
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.domain(), *domain, "{input}");
            assert_eq!(r.path(), *path, "{input}");
            assert_eq!(r.tag(), *tag, "{input}");
            assert_eq!(r.digest(), None, "{input}");
        }
    }

    #[test]
    fn one_registry_has_one_canonical_name() {
        let cases: &[(&str, &str)] = &[
            ("reg.example.com", "reg.example.com"),
            ("Reg.Example.COM", "reg.example.com"),
            ("reg.example.com:443", "reg.example.com"),
            ("reg.example.com:00443", "reg.example.com"),
            ("reg.example.com:5000", "reg.example.com:5000"),
            ("reg.example.com:05000", "reg.example.com:5000"),
            ("reg.example.com:0", "reg.example.com:0"),
            ("reg.example.com:99999", "reg.example.com:99999"),
            ("LOCALHOST:5000", "localhost:5000"),
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io:443", "docker.io"),
            ("REGISTRY-1.DOCKER.IO", "docker.io"),
            // Another port of Docker Hub's hosts is not Docker Hub.
            ("index.docker.io:5000", "index.docker.io:5000"),
            ("[::1]", "[::1]"),
            ("[::1]:443", "[::1]"),
            ("[FE80::1]:5000", "[fe80::1]:5000"),
            // An IP address is another name moat cannot tie to a host name.
            ("10.0.0.1:443", "10.0.0.1"),
        ];
        for (input, want) in cases {
            assert_eq!(canonical_registry(input), *want, "{input}");
            // Idempotent.
            assert_eq!(canonical_registry(want), *want, "{want}");
        }
    }

    #[test]
    fn spellings_of_one_registry_fall_under_one_prefix() {
        for prefix in ["reg.example.com/shop", "REG.example.com:443/shop"] {
            let p: RegistryPrefix = prefix.parse().unwrap();
            assert_eq!(p.to_string(), "reg.example.com/shop");
            for image in [
                "reg.example.com/shop/api:1",
                "Reg.Example.Com/shop/api:1",
                "reg.example.com:443/shop/api:1",
                "REG.EXAMPLE.COM:0443/shop/api:1",
            ] {
                assert!(p.contains(&image.parse().unwrap()), "{prefix} vs {image}");
            }
            assert!(!p.contains(&"reg.example.com:5000/shop/api:1".parse().unwrap()));
        }
        let hub: RegistryPrefix = "docker.io/library".parse().unwrap();
        for image in [
            "nginx:1",
            "registry-1.docker.io/nginx:1",
            "Registry-1.Docker.io:443/library/nginx:1",
        ] {
            assert!(hub.contains(&image.parse().unwrap()), "{image}");
        }
    }

    #[test]
    fn parses_digests() {
        let r: ImageRef = format!("img@{SHA}").parse().unwrap();
        assert_eq!(r.digest(), Some(SHA));
        assert_eq!(r.tag(), None);
        assert_eq!(r.to_string(), format!("docker.io/library/img@{SHA}"));
        let r: ImageRef = format!("img:latest@{SHA}").parse().unwrap();
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), Some(SHA));
        let r: ImageRef = format!("localhost:5000/img@{SHA}").parse().unwrap();
        assert_eq!(r.domain(), "localhost:5000");
    }

    #[test]
    fn rejects_malformed_references() {
        let cases: &[(&str, ImageRefError)] = &[
            ("", ImageRefError::Empty),
            (":tag", ImageRefError::Empty),
            ("Busybox", ImageRefError::UpperCasePath("Busybox".into())),
            (
                "docker.io/Library/busybox",
                ImageRefError::UpperCasePath("Library/busybox".into()),
            ),
            ("busybox:", ImageRefError::InvalidTag(String::new())),
            ("busybox:.x", ImageRefError::InvalidTag(".x".into())),
            ("busybox:a b", ImageRefError::InvalidTag("a b".into())),
            (
                "bad..name",
                ImageRefError::InvalidPathComponent("bad..name".into()),
            ),
            ("-lead", ImageRefError::InvalidPathComponent("-lead".into())),
            ("a//b", ImageRefError::InvalidPathComponent(String::new())),
            (
                "host:port/img",
                ImageRefError::InvalidDomain("host:port".into()),
            ),
            (
                "-host.io/img",
                ImageRefError::InvalidDomain("-host.io".into()),
            ),
            (
                "img@sha256:abc",
                ImageRefError::InvalidDigest("sha256:abc".into()),
            ),
            (
                "img@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                ImageRefError::InvalidDigest(
                    "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef"
                        .into(),
                ),
            ),
            ("img@", ImageRefError::InvalidDigest(String::new())),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<ImageRef>().as_ref(), Err(want), "{input:?}");
        }
        let long = format!("{}:1", "a".repeat(MAX_NAME_LEN_CHARS + 1));
        assert_eq!(long.parse::<ImageRef>(), Err(ImageRefError::NameTooLong));
        // The limit is on the normalised name.
        let fits_raw = format!("{}:1", "a".repeat(MAX_NAME_LEN_CHARS - 4));
        assert_eq!(
            fits_raw.parse::<ImageRef>(),
            Err(ImageRefError::NameTooLong)
        );
        let long_tag = format!("a:{}", "t".repeat(MAX_TAG_LEN_CHARS + 1));
        assert!(matches!(
            long_tag.parse::<ImageRef>(),
            Err(ImageRefError::InvalidTag(_))
        ));
    }

    #[test]
    fn registry_prefixes_match_whole_components() {
        let cases: &[(&str, &str, bool)] = &[
            ("docker.io", "busybox:1", true),
            ("index.docker.io", "busybox:1", true),
            ("ghcr.io", "busybox:1", false),
            ("ghcr.io/acme", "ghcr.io/acme/app:1", true),
            ("ghcr.io/acme", "ghcr.io/acme:1", true),
            ("ghcr.io/acme", "ghcr.io/acme-evil/app:1", false),
            ("localhost:5000", "localhost:5000/redis:1", true),
            ("localhost", "localhost:5000/redis:1", false),
        ];
        for (prefix, image, want) in cases {
            let p: RegistryPrefix = prefix.parse().unwrap();
            let i: ImageRef = image.parse().unwrap();
            assert_eq!(p.contains(&i), *want, "{prefix} vs {image}");
        }
        assert!("".parse::<RegistryPrefix>().is_err());
        assert!("ghcr.io/Acme".parse::<RegistryPrefix>().is_err());
        assert!("bad host/x".parse::<RegistryPrefix>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "busybox",
            "host:5000/img:1.0",
            "ghcr.io/a/b:c",
            "[::1]:5000/app:v1",
        ] {
            let r: ImageRef = input.parse().unwrap();
            let again: ImageRef = r.to_string().parse().unwrap();
            assert_eq!(r, again);
        }
    }
}
