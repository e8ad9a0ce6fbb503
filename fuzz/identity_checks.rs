//! The properties the identity agent's fuzz targets check, shared with the seed-replay test
//! (`crates/moat-identity/tests/fuzz_seeds.rs`).

use std::path::Component;

use moat_identity::annotations::{Defaults, parse};
use moat_identity::spiffe::{SpiffeId, check_chain, pem, split_certificates, uri_sans};

/// Annotations: any value is an entry list or an error, never a panic; every accepted entry
/// keeps its paths absolute and inside no `..`, and its file names plain.
pub(crate) fn annotation(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = parse("identity.noderesource.dev/pod", s, &Defaults::default()) else {
        return;
    };
    for e in entries {
        assert!(e.cert_dir.is_absolute() && e.cert_dir.as_os_str() != "/");
        assert!(
            e.cert_dir
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        );
        assert_eq!(
            e.spire_agent_address,
            Defaults::default().spire_agent_address
        );
        for name in [
            &e.svid_file_name,
            &e.svid_key_file_name,
            &e.svid_bundle_file_name,
        ] {
            assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..");
        }
        if let Some(id) = e.spiffe_id {
            let again: SpiffeId = id.as_str().parse().unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(again, id);
        }
    }
}

/// DER: splitting never panics, and the pieces put back together are the input; each piece
/// printed as PEM reads back as itself; reading URI SANs and checking the pieces as an SVID
/// chain never panic, and a chain that passes names a SPIFFE ID that parses back to itself.
pub(crate) fn der(data: &[u8]) {
    if let Ok(parts) = split_certificates(data) {
        assert_eq!(parts.concat(), data);
        let printed = pem("CERTIFICATE", &parts);
        let read: Vec<Vec<u8>> = ::pem::parse_many(&printed)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(::pem::Pem::into_contents)
            .collect();
        assert_eq!(read, parts);
        for part in &parts {
            let _ = uri_sans(part);
        }
        if let Ok(id) = check_chain(&parts) {
            let again: SpiffeId = id.as_str().parse().unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(again, id);
        }
    }
    let _ = uri_sans(data);
}
