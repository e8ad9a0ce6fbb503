//! Image references: never panic; what parses prints to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_core::image::{ImageRef, RegistryPrefix};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = s.parse::<ImageRef>() {
        let printed = r.to_string();
        let again: ImageRef = printed.parse().expect("printed reference parses");
        assert_eq!(r, again, "round trip of {s:?} via {printed:?}");
        assert_eq!(again.to_string(), printed);
    }
    if let Ok(p) = s.parse::<RegistryPrefix>() {
        let again: RegistryPrefix = p.to_string().parse().expect("printed prefix parses");
        assert_eq!(p, again);
    }
});
