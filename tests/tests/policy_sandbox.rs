//! The policy sandbox against shipped policies (native and WebAssembly must agree) and
//! against a guest that misbehaves on request: each misbehaviour is contained with a clear
//! error while the last good policy keeps deciding.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weightgrad::policies::builtin;
use weightgrad::policy::{
    Breaker, DecisionSource, FailStrategy, PolicyFailure, PolicyRuntime, Sandbox, SandboxLimits,
    builtin_wasm, golden_input,
};
use weightgrad_sdk::{
    LanInput, LinkInput, LinkStats, PolicyInput, RoundContext, TensorRole, TensorStats,
};
use weightgrad_tests::guests::{self, UNRULY as UNRULY_WASM};

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
                        // Every role crosses the sandbox's boundary.
                        role: [
                            TensorRole::Weight,
                            TensorRole::Bias,
                            TensorRole::Embedding,
                            TensorRole::Attention,
                            TensorRole::Norm,
                        ][t % 5],
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

/// A runtime whose previous policy is full-sync and whose active one is the fixture; its
/// breaker never trips.
fn unruly_runtime(sb: &Arc<Sandbox>) -> PolicyRuntime {
    let rt = PolicyRuntime::with_breaker(
        sb.clone(),
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
        Breaker { rollback_after: 0 },
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
    assert!(err.contains("weightgrad:policy@3.0.0"), "{err}");
    // A component of the previous contract version, 2.0.0: refused by version, before any call.
    let err = rt
        .swap(weightgrad_tests::guests::WRONG_VERSION)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a valid weightgrad:policy@3.0.0 component"),
        "{err}"
    );
    assert!(err.contains("policy/policy@3.0.0"), "{err}");
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

/// The golden input at `round`.
fn at_round(round: u64) -> PolicyInput {
    let mut input = golden_input();
    input.context.round = round;
    input
}

/// A runtime with the shipped full-sync active, whose failures the last good policy decides.
fn full_sync_falling_back_to_last_good() -> PolicyRuntime {
    PolicyRuntime::new(
        sandbox(),
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
    )
    .unwrap()
}

#[test]
fn the_breaker_rolls_a_failing_policy_back_and_quarantines_it() {
    let rt = full_sync_falling_back_to_last_good();
    let full_sync = rt.active().digest.clone();
    // Its self-test (the golden input, round 8) passes: it fails from round 12 on.
    let bad = guests::unruly("panic@12");
    rt.swap(&bad).unwrap();
    let bad_digest = rt.active().digest.clone();
    for round in 1..12 {
        let d = rt.decide_round(&at_round(round));
        assert_eq!(d.source, DecisionSource::Active, "round {round}");
    }
    // Two failures: contained, the last good policy decides, still active.
    for round in 12..14 {
        let d = rt.decide_round(&at_round(round));
        assert_eq!(d.failure.as_ref().map(|f| f.kind()), Some("trap"));
        assert_eq!(d.source, DecisionSource::Previous);
        assert!(d.rolled_back.is_none());
        assert_eq!(rt.breaker().consecutive_failures, (round - 11) as u32);
    }
    // The third in a row trips the breaker: rolled back after this round's call.
    let d = rt.decide_round(&at_round(14));
    assert_eq!(d.source, DecisionSource::Previous);
    let report = d.rolled_back.expect("rolled back");
    assert_eq!(report.digest, full_sync);
    assert_eq!(report.previous_digest, bad_digest);
    assert_eq!(rt.active().digest, full_sync);
    assert!(
        rt.previous().is_none(),
        "the failed policy is no rollback target"
    );
    let b = rt.breaker();
    assert_eq!(b.rollbacks, 1);
    assert_eq!(b.consecutive_failures, 0);
    let q = &b.quarantined[0];
    assert_eq!(
        (
            q.digest.as_str(),
            q.kind,
            q.failures,
            q.first_failure_round,
            q.rolled_back_round
        ),
        (bad_digest.as_str(), "trap", 3, 12, 14)
    );
    assert!(q.reason.contains("unreachable"), "{}", q.reason);
    assert!(!q.reason.contains("wasm backtrace"), "{}", q.reason);
    // The next round is the previous policy's, without a failure.
    assert_eq!(
        rt.decide_round(&at_round(15)).source,
        DecisionSource::Active
    );
    // A push of the same component is refused, naming why; forced, it runs again.
    let err = rt.swap(&bad).unwrap_err();
    assert_eq!(err.kind(), "quarantined");
    assert!(err.to_string().contains("rolled back at round 14"), "{err}");
    assert_eq!(rt.active().digest, full_sync, "nothing changed");
    rt.swap_checked(&bad, true, |_| Ok(())).unwrap();
    assert_eq!(rt.active().digest, bad_digest);
    assert!(rt.breaker().quarantined.is_empty());
}

#[test]
fn a_success_between_failures_resets_the_breakers_count() {
    let rt = full_sync_falling_back_to_last_good();
    // Fails in rounds 12 and 13 only: two in a row, then a success.
    let bad = guests::unruly("panic@12-14");
    rt.swap(&bad).unwrap();
    let bad_digest = rt.active().digest.clone();
    for round in 1..12 {
        rt.decide_round(&at_round(round));
    }
    for round in 12..14 {
        let d = rt.decide_round(&at_round(round));
        assert_eq!(d.failure.as_ref().map(|f| f.kind()), Some("trap"));
        assert_eq!(rt.breaker().consecutive_failures, (round - 11) as u32);
    }
    let d = rt.decide_round(&at_round(14));
    assert_eq!(d.source, DecisionSource::Active, "{:?}", d.failure);
    assert_eq!(
        rt.breaker().consecutive_failures,
        0,
        "the success resets it"
    );
    for round in 15..30 {
        assert_eq!(
            rt.decide_round(&at_round(round)).source,
            DecisionSource::Active
        );
    }
    assert_eq!(rt.active().digest, bad_digest, "never rolled back");
    assert_eq!(rt.breaker().rollbacks, 0);
    assert!(rt.breaker().quarantined.is_empty());
}

#[test]
fn with_nothing_to_roll_back_to_the_breaker_suspends_the_policy_and_probes_it() {
    let sb = sandbox();
    // Fails in rounds 10..27, well before and after.
    let rt = PolicyRuntime::new(sb, &guests::unruly("panic@10-27"), FailStrategy::Closed).unwrap();
    let mut called = Vec::new();
    for round in 1..40 {
        let d = rt.decide_round(&at_round(round));
        if d.failure.is_some() || d.source == DecisionSource::Active {
            called.push(round);
        }
        if d.source != DecisionSource::Active {
            assert_eq!(d.source, DecisionSource::HeldAll, "round {round}");
        }
    }
    // Called every round until three failures (10, 11, 12), then at 13, 15, 19, 27 (probes
    // 1, 2, 4 and 8 rounds apart); at 27 it decides again and the breaker closes.
    let expected: Vec<u64> = (1..=12).chain([13, 15, 19]).chain(27..40).collect();
    assert_eq!(called, expected);
    assert_eq!(rt.breaker().suspended, None);
    assert_eq!(rt.breaker().rollbacks, 0);
}

#[test]
fn a_breaker_of_zero_never_trips() {
    let sb = sandbox();
    let rt = PolicyRuntime::with_breaker(
        sb,
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
        Breaker { rollback_after: 0 },
    )
    .unwrap();
    rt.swap(&guests::unruly("panic@10")).unwrap();
    for round in 10..30 {
        let d = rt.decide_round(&at_round(round));
        assert_eq!(d.source, DecisionSource::Previous);
        assert!(d.rolled_back.is_none());
    }
    assert_eq!(rt.active().info.name, "unruly");
}

#[test]
fn a_state_that_keeps_growing_is_oversized_at_every_call_once_over_its_limit() {
    let sb = sandbox();
    let rt = PolicyRuntime::with_breaker(
        sb.clone(),
        builtin_wasm("full-sync").unwrap(),
        FailStrategy::LastGood,
        Breaker { rollback_after: 0 },
    )
    .unwrap();
    rt.swap(&guests::unruly("double@1")).unwrap();
    let mut state = Vec::new();
    let mut kinds = Vec::new();
    for round in 1..25 {
        let mut input = at_round(round);
        input.state = state;
        let d = rt.decide_round(&input);
        kinds.push(d.failure.as_ref().map(|f| f.kind()));
        // A failed call leaves the policy's last good state as it was.
        if d.failure.is_some() {
            assert_eq!(d.output.state, input.state, "round {round}");
        }
        state = d.output.state;
    }
    // It grows from 2 KB by doubling: from the call that would pass 1 MiB on, every call
    // fails, as oversized.
    let first = kinds
        .iter()
        .position(Option::is_some)
        .expect("it outgrew its limit");
    assert!(first > 5, "{kinds:?}");
    assert!(
        kinds[first..].iter().all(|&k| k == Some("oversized")),
        "{kinds:?}"
    );
    // A state handed in over the limit (say, from a checkpoint of an agent with a larger
    // one) is refused by size, naming it.
    let unruly = sb.load(UNRULY_WASM).unwrap();
    let mut input = golden_input();
    input.state = vec![1; (1 << 20) + 1];
    let err = sb.decide(&unruly, &input).unwrap_err();
    assert_eq!(err.kind(), "oversized");
    assert!(err.to_string().contains("handed in"), "{err}");
}
