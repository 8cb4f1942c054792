//! Policy guests the suite pushes to agents, built from `tests/guests/` by this crate's
//! build script.

/// A policy that misbehaves on request (`tests/guests/unruly`): its state blob names the
/// misbehaviour.
pub const UNRULY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/unruly.wasm"));

/// A component exporting the policy interface of the previous contract version, 1.0.0
/// (functions that only trap): the host must refuse it by version.
pub const WRONG_VERSION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wrong-version.wasm"));

/// The fixture's core module, before it is made a component.
const UNRULY_CORE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/unruly-core.wasm"));

/// The prefix of the fixture's mode marker (`tests/guests/unruly`).
const MODE_PREFIX: &[u8] = b"weightgrad-unruly-mode:=";

/// The fixture with `mode` written into its marker, as a component: `KIND@ROUND` makes it
/// misbehave as `KIND` (`loop`, `grow`, `panic`, `bits77`, `nan`, `count`, `huge`,
/// `double`) from round `ROUND` on, `KIND@FROM-TO` in rounds `FROM..TO`. Each mode is its
/// own component, with its own digest.
pub fn unruly(mode: &str) -> Vec<u8> {
    let mut module = UNRULY_CORE.to_vec();
    let at = module
        .windows(MODE_PREFIX.len())
        .position(|w| w == MODE_PREFIX)
        .expect("the fixture carries its mode marker")
        + MODE_PREFIX.len();
    let room = 64 - MODE_PREFIX.len();
    assert!(
        mode.len() <= room,
        "mode {mode:?} is longer than {room} bytes"
    );
    module[at..at + room].fill(0);
    module[at..at + mode.len()].copy_from_slice(mode.as_bytes());
    weightgrad_sdk_build::componentize(&module).expect("the fixture makes a component")
}
