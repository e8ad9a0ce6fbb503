//! The policies, one unit each: a check step that records reasons (and, for the policies that
//! change pods, what to change) and a mutate step over [`crate::fields::PodFields`]. The engine
//! ([`crate::engine`]) runs them in order; nothing here knows about enforcement, exemptions by
//! namespace, stages or patches.

pub(crate) mod identity;
pub(crate) mod images;
pub(crate) mod isolation;
pub(crate) mod runtime;
