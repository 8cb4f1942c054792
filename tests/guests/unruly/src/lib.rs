//! A test fixture policy. It behaves like `full-sync`, unless its state blob names a
//! misbehaviour: `loop`, `grow`, `panic`, `bits77`, `nan`, `count`, `huge` or `err`.
//! The host's containment tests drive it.

use weightgrad_sdk::{LanPlan, Policy, PolicyInfo, PolicyInput, PolicyOutput, TensorPlan};

/// The fixture.
#[derive(Debug, Default)]
pub struct Unruly;

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
        match input.state.as_slice() {
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
            _ => {}
        }
        PolicyOutput::uniform(input, plan, LanPlan::FULL_PRECISION)
    }
}

#[cfg(target_arch = "wasm32")]
weightgrad_sdk::export_policy!(Unruly);
