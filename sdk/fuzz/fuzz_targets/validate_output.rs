//! Arbitrary policy inputs and outputs through `validate_output`: it must never panic, and an
//! output it accepts must keep every bound the SDK documents, checked here independently.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use weightgrad_sdk::*;

fn f32_any(u: &mut Unstructured) -> Result<f32> {
    // Often a special value: NaN, infinities, zero, negative zero, one.
    Ok(match u.int_in_range(0..=7)? {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => 0.0,
        4 => -0.0,
        5 => 1.0,
        _ => f32::from_bits(u.arbitrary()?),
    })
}

fn bits(u: &mut Unstructured) -> Result<u8> {
    Ok(if u.arbitrary()? {
        *u.choose(&[1u8, 2, 3, 4, 8, 16, 32])?
    } else {
        u.arbitrary()?
    })
}

fn input(u: &mut Unstructured) -> Result<PolicyInput> {
    let mut input = golden_input();
    let template: TensorStats = input.links[0].tensors[0].clone();
    let links = u.int_in_range(0..=3)?;
    let tensors = u.int_in_range(0..=4)?;
    input.links = (0..links)
        .map(|l| {
            Ok(LinkInput {
                link: LinkStats {
                    peer: format!("peer-{l}"),
                    bandwidth_bps: 1e8,
                    rtt_s: 0.1,
                    loss: 0.0,
                    queued_bytes: 0,
                },
                tensors: (0..tensors).map(|_| template.clone()).collect(),
            })
        })
        .collect::<Result<_>>()?;
    input.lan.data_mode_allowed = u.arbitrary()?;
    Ok(input)
}

fn output(u: &mut Unstructured, input: &PolicyInput) -> Result<PolicyOutput> {
    // Mostly the right shape, so validation gets past the counts to the values.
    let links = if u.ratio(1, 8)? { u.int_in_range(0..=4)? } else { input.links.len() };
    let tensors = input.links.first().map_or(0, |l| l.tensors.len());
    let plans = (0..links)
        .map(|_| {
            let n = if u.ratio(1, 8)? { u.int_in_range(0..=5)? } else { tensors };
            Ok(LinkPlan {
                tensors: (0..n)
                    .map(|_| {
                        Ok(TensorPlan {
                            send: u.arbitrary()?,
                            tau: f32_any(u)?,
                            bits: bits(u)?,
                            top_fraction: f32_any(u)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<_>>()?;
    let gradient_bits = if u.arbitrary()? {
        Vec::new()
    } else {
        let n = if u.ratio(1, 8)? { u.int_in_range(0..=5)? } else { tensors };
        (0..n).map(|_| bits(u)).collect::<Result<_>>()?
    };
    let mode = if u.arbitrary()? {
        LanMode::Gradient
    } else {
        LanMode::Data(DataPlan {
            feature_bits: bits(u)?,
            scale: if u.arbitrary()? { DataScale::PerFeature } else { DataScale::PerSample },
            refine_bits: u.int_in_range(0..=40)?,
        })
    };
    Ok(PolicyOutput {
        links: plans,
        lan: LanPlan { gradient_bits, weight_bits: bits(u)?, mode },
        state: Vec::new(),
    })
}

/// Every bound an accepted output must keep (the SDK's documentation, restated).
fn assert_within_bounds(input: &PolicyInput, out: &PolicyOutput) {
    assert_eq!(out.links.len(), input.links.len());
    for (plan, link) in out.links.iter().zip(&input.links) {
        assert_eq!(plan.tensors.len(), link.tensors.len());
        for p in &plan.tensors {
            assert!(ALLOWED_BITS.contains(&p.bits), "bits {}", p.bits);
            assert!(p.tau.is_finite() && p.tau >= 0.0, "tau {}", p.tau);
            assert!(
                p.top_fraction > 0.0 && p.top_fraction <= 1.0,
                "top_fraction {}",
                p.top_fraction
            );
        }
    }
    let tensors = input.links.first().map_or(0, |l| l.tensors.len());
    assert!(out.lan.gradient_bits.is_empty() || out.lan.gradient_bits.len() == tensors);
    assert!(out.lan.gradient_bits.iter().all(|b| matches!(b, 1..=8 | 32)));
    assert!(matches!(out.lan.weight_bits, 2..=8 | 32));
    if let LanMode::Data(d) = out.lan.mode {
        assert!(input.lan.data_mode_allowed);
        assert!((1..=8).contains(&d.feature_bits));
        assert!(d.refine_bits <= 8);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(input) = input(&mut u) else { return };
    let Ok(out) = output(&mut u, &input) else { return };
    if validate_output(&input, &out).is_ok() {
        assert_within_bounds(&input, &out);
    }
});
