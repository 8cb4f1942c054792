//! The policy sandbox against shipped policies (native and WebAssembly must agree) and
//! against a guest that misbehaves on request: each misbehaviour is contained with a clear
//! error while the last good policy keeps deciding.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weightgrad::policies::builtin;
use weightgrad::policy::{
    DecisionSource, FailStrategy, PolicyFailure, PolicyRuntime, Sandbox, SandboxLimits,
    builtin_wasm, golden_input,
};
use weightgrad_sdk::{
    LanInput, LinkInput, LinkStats, PolicyInput, RoundContext, TensorRole, TensorStats,
};
use weightgrad_tests::guests::UNRULY as UNRULY_WASM;

fn random_input(rng: &mut ChaCha8Rng) -> PolicyInput {
    let links = rng.random_range(0..4);
    let tensors = rng.random_range(0..6);
    let base_lr = rng.random_range(1e-4f32..1e-1);
    PolicyInput {
        context: RoundContext {
            round: rng.random_range(0..1000),
            lr: base_lr * rng.random_range(0.0f32..1.0),
            base_lr,
            loss: rng.random_range(0.0f32..3.0),
            regions: links as u32 + 1,
            final_round: rng.random_bool(0.1),
        },
        thresholds: vec![0.001, 0.01, 0.1],
        links: (0..links)
            .map(|l| LinkInput {
                link: LinkStats {
                    peer: format!("peer-{l}"),
                    bandwidth_bps: rng.random_range(1e6..1e9),
                    rtt_s: rng.random_range(0.001..0.3),
                    loss: rng.random_range(0.0..0.05),
                    queued_bytes: rng.random_range(0..1 << 30),
                },
                tensors: (0..tensors)
                    .map(|t| TensorStats {
                        numel: rng.random_range(1..1 << 20),
                        role: if t % 2 == 0 {
                            TensorRole::Weight
                        } else {
                            TensorRole::Bias
                        },
                        update_l2: rng.random_range(0.0..10.0),
                        weight_l2: rng.random_range(0.0..10.0),
                        max_relative: rng.random_range(0.0..5.0),
                        significant_fraction: (0..3).map(|_| rng.random_range(0.0..1.0)).collect(),
                        rounds_since_sent: rng.random_range(0..50),
                    })
                    .collect(),
            })
            .collect(),
        lan: LanInput {
            workers: rng.random_range(1..9),
            batch_size: rng.random_range(1..512),
            sample_features: rng.random_range(1..4096),
            classes: rng.random_range(2..1000),
            tensor_sizes: (0..tensors).map(|_| rng.random_range(1..1 << 20)).collect(),
            data_mode_allowed: rng.random_bool(0.5),
        },
        state: (0..rng.random_range(0..16)).map(|_| rng.random()).collect(),
    }
}

/// Tests run many threads on a small machine: a generous deadline keeps well-behaved calls
/// from timing out under load, while an endless loop is still stopped well within a second.
const TEST_DEADLINE: Duration = Duration::from_millis(250);

fn sandbox() -> Arc<Sandbox> {
    Arc::new(
        Sandbox::new(SandboxLimits {
            deadline: TEST_DEADLINE,
            ..SandboxLimits::default()
        })
        .unwrap(),
    )
}

#[test]
fn shipped_policies_decide_identically_natively_and_as_webassembly() {
    let sb = sandbox();
    for name in weightgrad::policies::BUILTIN {
        let native = builtin(name).unwrap();
        let wasm = sb.load(builtin_wasm(name).unwrap()).unwrap();
        assert_eq!(wasm.info, native.info(), "{name}");
        let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64);
        for _ in 0..200 {
            let input = random_input(&mut rng);
            let expected = native.decide(&input);
            let got = sb.decide(&wasm, &input).unwrap();
            assert_eq!(got, expected, "{name} on {input:?}");
        }
    }
}

/// A runtime whose previous policy is full-sync and whose active one is the fixture.
fn unruly_runtime(sb: &Arc<Sandbox>) -> PolicyRuntime {
    let rt = PolicyRuntime::new(
        sb.clone(),
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
    )
    .unwrap();
    rt.swap(UNRULY_WASM).unwrap();
    assert_eq!(rt.active().info.name, "unruly");
    rt
}

fn asking(misbehaviour: &str) -> PolicyInput {
    PolicyInput {
        state: misbehaviour.as_bytes().to_vec(),
        ..golden_input()
    }
}

#[test]
fn misbehaving_guests_are_contained_and_the_last_good_policy_decides() {
    let sb = sandbox();
    let rt = unruly_runtime(&sb);
    let cases: [(&str, &str); 7] = [
        ("loop", "timeout"),
        ("grow", "memory"),
        ("panic", "trap"),
        ("bits77", "invalid"),
        ("nan", "invalid"),
        ("count", "invalid"),
        ("huge", "oversized"),
    ];
    for (ask, kind) in cases {
        let started = Instant::now();
        let d = rt.decide_round(&asking(ask));
        let failure = d
            .failure
            .unwrap_or_else(|| panic!("{ask}: expected a failure"));
        assert_eq!(failure.kind(), kind, "{ask}: {failure}");
        assert_eq!(
            d.source,
            DecisionSource::Previous,
            "{ask}: the last good policy decides"
        );
        assert!(weightgrad_sdk::validate_output(&asking(ask), &d.output).is_ok());
        assert!(
            started.elapsed() < TEST_DEADLINE * 4,
            "{ask} took {:?}",
            started.elapsed()
        );
    }
    let failures = rt.failures();
    assert_eq!(failures["invalid"], 3);
    assert_eq!(failures["timeout"], 1);
    // A well-behaved round still uses the active policy afterwards.
    assert_eq!(
        rt.decide_round(&golden_input()).source,
        DecisionSource::Active
    );
}

#[test]
fn error_messages_name_the_problem() {
    let sb = sandbox();
    let unruly = sb.load(UNRULY_WASM).unwrap();
    let err = sb
        .decide(&unruly, &asking("bits77"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("77 bits is not allowed"), "{err}");
    let err = sb.decide(&unruly, &asking("nan")).unwrap_err().to_string();
    assert!(err.contains("tau NaN"), "{err}");
    let err = sb
        .decide(&unruly, &asking("count"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("link plans for 2 links"), "{err}");
    let err = sb.decide(&unruly, &asking("loop")).unwrap_err().to_string();
    assert!(err.contains("deadline"), "{err}");
    let err = sb.decide(&unruly, &asking("grow")).unwrap_err().to_string();
    assert!(err.contains("memory cap"), "{err}");
    let err = sb
        .decide(&unruly, &asking("panic"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("trapped"), "{err}");
}

#[test]
fn bad_components_are_refused_and_nothing_changes() {
    let sb = sandbox();
    let rt = PolicyRuntime::new(
        sb.clone(),
        builtin_wasm("weightgrad").unwrap(),
        FailStrategy::LastGood,
    )
    .unwrap();
    let before = rt.active().digest.clone();
    // Not WebAssembly at all.
    let err = rt.swap(b"definitely not wasm").unwrap_err();
    assert!(matches!(err, PolicyFailure::Load(_)), "{err}");
    // An empty component: valid WebAssembly that exports nothing.
    let empty_component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    let err = rt.swap(&empty_component).unwrap_err().to_string();
    assert!(err.contains("weightgrad:policy@2.0.0"), "{err}");
    // A component of the previous contract version, 1.0.0: refused by version, before any call.
    let err = rt
        .swap(weightgrad_tests::guests::WRONG_VERSION)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a valid weightgrad:policy@2.0.0 component"),
        "{err}"
    );
    assert!(err.contains("policy/policy@2.0.0"), "{err}");
    // Oversized.
    let small = Sandbox::new(SandboxLimits {
        max_component_bytes: 1000,
        ..SandboxLimits::default()
    })
    .unwrap();
    let err = small
        .load(builtin_wasm("gaia").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the 1000-byte limit"), "{err}");
    assert_eq!(rt.active().digest, before);
    assert_eq!(rt.swaps(), 0);
}

#[test]
fn swap_and_rollback_keep_one_policy_active_at_all_times() {
    let sb = sandbox();
    let rt = PolicyRuntime::new(
        sb,
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
    )
    .unwrap();
    assert!(rt.rollback().is_err(), "nothing to roll back to yet");
    let report = rt.swap(builtin_wasm("weightgrad").unwrap()).unwrap();
    assert_eq!(report.active.name, "weightgrad");
    assert_eq!(rt.previous().unwrap().info.name, "full-sync");
    let back = rt.rollback().unwrap();
    assert_eq!(back.active.name, "full-sync");
    assert_eq!(rt.active().info.name, "full-sync");
    assert_eq!(rt.previous().unwrap().info.name, "weightgrad");
    assert_eq!(rt.swaps(), 2);
}

#[test]
fn fail_closed_and_fail_open_strategies() {
    let sb = sandbox();
    for (strategy, source, send) in [
        (FailStrategy::Closed, DecisionSource::HeldAll, false),
        (FailStrategy::Open, DecisionSource::SentAll, true),
    ] {
        let rt = PolicyRuntime::new(sb.clone(), UNRULY_WASM, strategy).unwrap();
        let d = rt.decide_round(&asking("panic"));
        assert_eq!(d.source, source);
        assert!(
            d.output
                .links
                .iter()
                .flat_map(|l| &l.tensors)
                .all(|p| p.send == send)
        );
    }
    // Last-good with no previous policy holds everything.
    let rt = PolicyRuntime::new(sb, UNRULY_WASM, FailStrategy::LastGood).unwrap();
    assert_eq!(
        rt.decide_round(&asking("panic")).source,
        DecisionSource::HeldAll
    );
}

/// Swaps the runtime's policy between two rounds, after a given number of decisions.
struct SwapMidRun {
    runtime: PolicyRuntime,
    calls: std::sync::atomic::AtomicUsize,
    swap_at: usize,
    next: &'static [u8],
}

impl weightgrad_sdk::Policy for SwapMidRun {
    fn info(&self) -> weightgrad_sdk::PolicyInfo {
        self.runtime.info()
    }

    fn decide(&self, input: &PolicyInput) -> weightgrad_sdk::PolicyOutput {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == self.swap_at {
            self.runtime.swap(self.next).expect("swap");
        }
        self.runtime.decide(input)
    }
}

#[test]
fn a_hot_swap_mid_run_loses_nothing_and_applies_nothing_twice() {
    use weightgrad::sim::{SimConfig, run};
    let data = weightgrad::train::dataset::embedded_digits().unwrap();
    let cfg = SimConfig {
        epochs: 2,
        ..SimConfig::demo(2, 3)
    };
    let policy = SwapMidRun {
        runtime: PolicyRuntime::new(
            sandbox(),
            builtin_wasm("full-sync").unwrap(),
            FailStrategy::LastGood,
        )
        .unwrap(),
        calls: Default::default(),
        swap_at: 25,
        next: builtin_wasm("weightgrad").unwrap(),
    };
    let report = run(&cfg, &policy, &data, &mut |_, _| {}).unwrap();
    assert_eq!(policy.runtime.swaps(), 1);
    assert_eq!(policy.runtime.active().info.name, "weightgrad");
    assert_eq!(
        report.rejected, 0,
        "no frame was refused as a duplicate or as malformed"
    );
    for r in &report.regions {
        assert!(r.test_accuracy > 0.8, "{}: {}", r.name, r.test_accuracy);
    }
}
