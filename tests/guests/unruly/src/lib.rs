//! A test fixture policy. It behaves like `full-sync`, unless asked to misbehave: by its
//! state blob (`loop`, `grow`, `panic`, `bits77`, `nan`, `count`, `huge`, or
//! `double…`, a state that doubles at every call), or by the mode written into its
//! [`MODE`] marker (`KIND@ROUND`: the same misbehaviour from round `ROUND` on, so that it
//! passes admission and fails later in a run; `KIND@FROM-TO`: in rounds `FROM..TO`). The test harness rewrites the marker in the
//! core module to make each variant (`weightgrad_tests::guests::unruly`).

use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// The marker's prefix, which the harness finds in the core module.
pub const MODE_PREFIX: &[u8; 24] = b"weightgrad-unruly-mode:=";

/// The mode: the prefix, then `KIND@ROUND` padded with zero bytes (none by default).
#[used]
pub static MODE: [u8; 64] = {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < MODE_PREFIX.len() {
        m[i] = MODE_PREFIX[i];
        i += 1;
    }
    m
};

/// The fixture.
#[derive(Debug, Default)]
pub struct Unruly;

/// The misbehaviour the marker asks for at `round`, if any.
fn marked(round: u64) -> Option<Vec<u8>> {
    // Read through a volatile load, so the compiler cannot fold the default in.
    let mode: [u8; 64] = unsafe { std::ptr::read_volatile(&MODE) };
    let text = &mode[MODE_PREFIX.len()..];
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    let text = std::str::from_utf8(text).ok()?;
    let (kind, rounds) = text.split_once('@')?;
    let (from, to) = match rounds.split_once('-') {
        Some((from, to)) => (from.parse::<u64>().ok()?, to.parse::<u64>().ok()?),
        None => (rounds.parse::<u64>().ok()?, u64::MAX),
    };
    (from..to)
        .contains(&round)
        .then(|| kind.as_bytes().to_vec())
}

impl Policy for Unruly {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "unruly".into(),
            version: "0.0.0".into(),
            description: "misbehaves on request (test fixture)".into(),
        }
    }

    fn decide(&self, input: &PolicyInput) -> PolicyOutput {
        let mut plan = TensorPlan {
            send: true,
            tau: 0.0,
            bits: 32,
            top_fraction: 1.0,
        };
        let asked = marked(input.context.round).unwrap_or_else(|| input.state.clone());
        match asked.as_slice() {
            b"loop" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"panic" => panic!("the fixture was asked to panic"),
            b"bits77" => plan.bits = 77,
            b"nan" => plan.tau = f32::NAN,
            b"count" => {
                let mut out = PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION);
                out.links.pop();
                return out;
            }
            b"huge" => {
                let mut out = PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION);
                out.state = vec![7u8; 4 << 20];
                return out;
            }
            s if s.starts_with(b"double") => {
                // The state it was handed, twice (from the marker: its first state).
                let mut out = PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION);
                let mut state = if input.state.starts_with(b"double") {
                    input.state.clone()
                } else {
                    b"double".repeat(170)
                };
                state.extend_from_within(..);
                out.state = state;
                return out;
            }
            _ => {}
        }
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(Unruly);
