//! Test doubles of the two peers the agent talks to, speaking their published protocols over
//! real Unix sockets, so tests, benchmarks and the end-to-end harness drive the production code
//! path unchanged: [`spire::SpireDouble`] (the SPIRE agent's Delegated Identity API) and
//! [`runtime::RuntimeDouble`] (the runtime side of the NRI socket).

pub mod runtime;
pub mod spire;
