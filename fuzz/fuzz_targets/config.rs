//! The configuration loader: any text is a config or an error, never a panic; a loaded config
//! serialises to a document that loads to the same config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::from_yaml(s) {
        let yaml = serde_yaml::to_string(&c).expect("config serialises");
        let again = Config::from_yaml(&yaml).expect("serialised config loads");
        assert_eq!(c, again);
    }
});
