//! Policy guests the suite pushes to agents, built from `tests/guests/` by this crate's
//! build script.

/// A policy that misbehaves on request (`tests/guests/unruly`): its state blob names the
/// misbehaviour.
pub const UNRULY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/unruly.wasm"));

/// A component exporting the policy interface of the previous contract version, 1.0.0
/// (functions that only trap): the host must refuse it by version.
pub const WRONG_VERSION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wrong-version.wasm"));
