//! Property-test strategies shared by the codec's tests.

use proptest::prelude::*;

/// Steps between the ends of a [`uniform`] range.
const STEPS: u32 = 1 << 24;

/// Floats uniform in `lo..hi` (on a grid of 2^24 steps), drawn from an integer: proptest's
/// own float-range sampler trips a debug assertion of its own on some seeds (proptest
/// 1.12, `float_samplers.rs`), which failed tests that had nothing wrong.
pub(crate) fn uniform(lo: f32, hi: f32) -> impl Strategy<Value = f32> + Clone {
    assert!(lo < hi, "an empty range {lo}..{hi}");
    (0..STEPS).prop_map(move |i| {
        let x = lo as f64 + (hi as f64 - lo as f64) * (i as f64 / STEPS as f64);
        // Rounding to f32 may reach `hi`, which the range excludes.
        (x as f32).clamp(lo, hi.next_down())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn draws_stay_in_the_half_open_range() {
        let mut runner = TestRunner::deterministic();
        for (lo, hi) in [(-1.0f32, 1.0), (1e-6, 2.0), (1e-8, 2.0), (-1000.0, 1000.0)] {
            let strategy = uniform(lo, hi);
            for _ in 0..2000 {
                let v = strategy.new_tree(&mut runner).unwrap().current();
                assert!(lo <= v && v < hi, "{v} outside {lo}..{hi}");
            }
        }
    }
}
