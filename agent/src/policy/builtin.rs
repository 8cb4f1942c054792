//! The shipped policies as WebAssembly components, built by `agent/build.rs` from
//! `policies/<name>/` and embedded in the binary.

/// (name, component bytes) of every shipped policy.
pub const BUILTIN_WASM: [(&str, &[u8]); 8] = [
    (
        "full-sync",
        include_bytes!(concat!(env!("OUT_DIR"), "/full-sync.wasm")),
    ),
    (
        "gaia",
        include_bytes!(concat!(env!("OUT_DIR"), "/gaia.wasm")),
    ),
    (
        "terngrad",
        include_bytes!(concat!(env!("OUT_DIR"), "/terngrad.wasm")),
    ),
    (
        "qsgd",
        include_bytes!(concat!(env!("OUT_DIR"), "/qsgd.wasm")),
    ),
    (
        "topk",
        include_bytes!(concat!(env!("OUT_DIR"), "/topk.wasm")),
    ),
    (
        "weightgrad",
        include_bytes!(concat!(env!("OUT_DIR"), "/weightgrad.wasm")),
    ),
    (
        "diloco",
        include_bytes!(concat!(env!("OUT_DIR"), "/diloco.wasm")),
    ),
    (
        "adaptive",
        include_bytes!(concat!(env!("OUT_DIR"), "/adaptive.wasm")),
    ),
];

/// The component bytes of a shipped policy.
pub fn builtin_wasm(name: &str) -> Option<&'static [u8]> {
    BUILTIN_WASM
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}
