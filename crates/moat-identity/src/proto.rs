//! Generated protobuf types (see `build.rs` and `proto/`).

#![allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]

/// The NRI plugin API, `nri.pkg.api.v1alpha1`.
pub mod nri {
    include!(concat!(env!("OUT_DIR"), "/nri.pkg.api.v1alpha1.rs"));
}

/// ttrpc's envelope.
pub mod ttrpc {
    include!(concat!(env!("OUT_DIR"), "/ttrpc.rs"));
}

/// SPIRE API types, `spire.api.types`.
pub mod spire_types {
    include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
}

/// The SPIRE agent's Delegated Identity API.
pub mod delegated {
    include!(concat!(
        env!("OUT_DIR"),
        "/spire.api.agent.delegatedidentity.v1.rs"
    ));
}
