//! Gaia's significance filter: an accumulated update crosses the WAN only when it is
//! large relative to the weight it changes.

/// Elements taken out of an accumulator: ascending indices and their values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Indices into the tensor, strictly increasing.
    pub indices: Vec<u32>,
    /// The accumulator's values at those indices.
    pub values: Vec<f32>,
}

impl Selection {
    /// Number of selected elements.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True when nothing was selected.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// True when `a` is significant against weight `w` at threshold `tau`.
#[inline]
pub fn is_significant(a: f32, w: f32, tau: f32) -> bool {
    // `&` and `|`, not `&&` and `||`: no branch, so a pass over a tensor vectorizes.
    (a != 0.0) & ((w == 0.0) | ((a / w).abs() > tau))
}

/// Selects every `i` with `|acc_i / w_i| > tau`, or `w_i == 0` and `acc_i != 0`, hands the
/// values out and zeroes them in `acc`; what is not selected keeps accumulating.
/// (An element with nothing accumulated has nothing to send.)
pub fn significance_filter(acc: &mut [f32], w: &[f32], tau: f32) -> Selection {
    significant_top(acc, w, tau, usize::MAX)
}

/// [`significance_filter`] that takes at most `k` elements: of the significant ones, those
/// of largest `|acc_i|` (of equal magnitudes at the cut, the lower indices first). What is
/// not taken stays in `acc`, untouched.
///
/// It runs for every tensor and link every round, with `k` often a small share of the
/// tensor, so it reads the tensor once: a strided sample sets a floor that about twice
/// `k` magnitudes clear, one pass keeps those (and finds every significant one again only
/// when fewer than `k` cleared it), and the exact cut is made among them.
pub fn significant_top(acc: &mut [f32], w: &[f32], tau: f32, k: usize) -> Selection {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        #[target_feature(enable = "avx2")]
        fn with_avx2(acc: &mut [f32], w: &[f32], tau: f32, k: usize) -> Selection {
            significant_top_portable(acc, w, tau, k)
        }
        // SAFETY: this CPU has AVX2 (checked just above).
        return unsafe { with_avx2(acc, w, tau, k) };
    }
    significant_top_portable(acc, w, tau, k)
}

/// [`significant_top`] as written: compiled once as is and once with AVX2.
#[inline(always)]
fn significant_top_portable(acc: &mut [f32], w: &[f32], tau: f32, k: usize) -> Selection {
    assert_eq!(
        acc.len(),
        w.len(),
        "accumulator and weights differ in length"
    );
    if k == 0 {
        return Selection::default();
    }
    if k >= acc.len() {
        return take_significant(acc, w, tau);
    }
    // A significant element's magnitude as its bits (non-negative floats order as their
    // bits do, as `total_cmp` orders them, NaN above infinity); 0 when not significant.
    let key = |a: f32, w: f32| {
        if is_significant(a, w, tau) {
            a.abs().to_bits()
        } else {
            0
        }
    };
    let floor = sampled_floor(acc, w, key, k);
    let mut kept = keys_from(acc, w, key, floor, k);
    if kept.len() < k && floor > 1 {
        kept = keys_from(acc, w, key, 1, k);
    }
    if kept.len() > k {
        let mut keys: Vec<u32> = kept.iter().map(|&(_, key)| key).collect();
        let (_, &mut kth, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let mut ties = k - kept.iter().filter(|&&(_, key)| key > kth).count();
        kept.retain(|&(_, key)| {
            let tie = key == kth && ties > 0;
            ties -= usize::from(tie);
            key > kth || tie
        });
    }
    let mut out = Selection {
        indices: Vec::with_capacity(kept.len()),
        values: Vec::with_capacity(kept.len()),
    };
    for (i, _) in kept {
        out.indices.push(i);
        out.values.push(std::mem::take(&mut acc[i as usize]));
    }
    out
}

/// The `(index, key)` of every element whose key reaches `floor`, in index order (room
/// for about `2k`). Inlined into both copies of [`significant_top`]: it is their one pass
/// over the whole tensor.
#[inline(always)]
fn keys_from(
    acc: &[f32],
    w: &[f32],
    key: impl Fn(f32, f32) -> u32,
    floor: u32,
    k: usize,
) -> Vec<(u32, u32)> {
    let mut kept = Vec::with_capacity(2 * k + 16);
    // A block's keys in registers, its elements looked at one by one only when one of them
    // clears the floor: most blocks have none.
    let (blocks, w_blocks) = (acc.chunks(KEY_BLOCK), w.chunks(KEY_BLOCK));
    for (b, (ab, wb)) in blocks.zip(w_blocks).enumerate() {
        let mut keys = [0u32; KEY_BLOCK];
        for ((key_of, &a), &w) in keys.iter_mut().zip(ab).zip(wb) {
            *key_of = key(a, w);
        }
        if keys.iter().copied().max().unwrap_or(0) < floor {
            continue;
        }
        for (j, &key) in keys.iter().enumerate().take(ab.len()) {
            if key >= floor {
                kept.push(((b * KEY_BLOCK + j) as u32, key));
            }
        }
    }
    kept
}

/// Takes every significant element out of `acc` (counted first, so the selection is
/// allocated once).
#[inline(always)]
fn take_significant(acc: &mut [f32], w: &[f32], tau: f32) -> Selection {
    let n = acc
        .iter()
        .zip(w)
        .map(|(&a, &w)| usize::from(is_significant(a, w, tau)))
        .sum::<usize>();
    let mut out = Selection {
        indices: Vec::with_capacity(n),
        values: Vec::with_capacity(n),
    };
    for (i, (a, &w)) in acc.iter_mut().zip(w).enumerate() {
        if is_significant(*a, w, tau) {
            out.indices.push(i as u32);
            out.values.push(std::mem::take(a));
        }
    }
    out
}

/// Elements whose keys [`significant_top`] computes together (a few vector registers).
const KEY_BLOCK: usize = 16;

/// Elements of the strided sample that set [`significant_top`]'s floor.
const SAMPLE: usize = 4096;

/// A key that about `2k` of `acc`'s keys reach, read from a strided sample of them; 1 (every
/// significant element) when the sample cannot tell.
#[inline(always)]
fn sampled_floor(acc: &[f32], w: &[f32], key: impl Fn(f32, f32) -> u32, k: usize) -> u32 {
    let n = acc.len();
    let taken = SAMPLE.min(n);
    // The sample's rank that stands for the `2k`-th of the tensor.
    let rank = (2 * k).saturating_mul(taken).div_ceil(n);
    if rank >= taken {
        return 1;
    }
    let mut sample: Vec<u32> = (0..taken)
        .map(|j| {
            let i = j * n / taken;
            key(acc[i], w[i])
        })
        .collect();
    let (_, &mut at_rank, _) = sample.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    at_rank.max(1)
}

/// Fraction of elements of `acc` that are significant at each threshold in `taus`
/// (statistics for policies; `acc` is not modified).
pub fn significant_fractions(acc: &[f32], w: &[f32], taus: &[f32]) -> Vec<f32> {
    let n = acc.len().max(1) as f32;
    taus.iter()
        .map(|&t| {
            acc.iter()
                .zip(w)
                .filter(|&(&a, &w)| is_significant(a, w, t))
                .count() as f32
                / n
        })
        .collect()
}

/// What a policy reads about one tensor's accumulated update on one link: its L2 norm,
/// its largest `|acc_i / w_i|` over non-zero weights, and the fraction of elements
/// significant at each threshold (as [`significant_fractions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateStats {
    /// L2 norm of the accumulator.
    pub update_l2: f32,
    /// Largest `|acc_i / w_i|` over the elements whose weight is not zero (0 when none).
    pub max_relative: f32,
    /// For each threshold, the fraction of elements significant at it.
    pub significant_fraction: Vec<f32>,
}

/// Lanes of the fused passes: independent accumulators the compiler keeps in vector
/// registers, so a pass runs at memory speed instead of one add's latency per element.
const LANES: usize = 8;

/// [`UpdateStats`] of `acc` against weights `w`, in one pass over both: one division per
/// element, where computing each statistic on its own reads the tensors once per
/// statistic and divides once per threshold. Called for every tensor and link every round.
pub fn update_stats(acc: &[f32], w: &[f32], taus: &[f32]) -> UpdateStats {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        #[target_feature(enable = "avx2")]
        fn with_avx2(acc: &[f32], w: &[f32], taus: &[f32]) -> UpdateStats {
            update_stats_portable(acc, w, taus)
        }
        // SAFETY: this CPU has AVX2 (checked just above).
        return unsafe { with_avx2(acc, w, taus) };
    }
    update_stats_portable(acc, w, taus)
}

/// [`update_stats`] as written: compiled once as is and once with AVX2.
#[inline(always)]
fn update_stats_portable(acc: &[f32], w: &[f32], taus: &[f32]) -> UpdateStats {
    assert_eq!(
        acc.len(),
        w.len(),
        "accumulator and weights differ in length"
    );
    let mut squares = [0f64; LANES];
    let mut max = [0f32; LANES];
    let mut counts = vec![[0u32; LANES]; taus.len()];
    // Per element: the ratio its significance is judged by (−∞ for nothing accumulated,
    // +∞ for a zero weight, as `is_significant` rules), and the one its maximum takes.
    let lane = |a: f32, w: f32| -> (f32, f32) {
        let q = (a / w).abs();
        let judged = if a == 0.0 {
            f32::NEG_INFINITY
        } else if w == 0.0 {
            f32::INFINITY
        } else {
            q
        };
        (judged, if w == 0.0 { 0.0 } else { q })
    };
    let (acc_chunks, w_chunks) = (acc.chunks_exact(LANES), w.chunks_exact(LANES));
    let (acc_rest, w_rest) = (acc_chunks.remainder(), w_chunks.remainder());
    for (ac, wc) in acc_chunks.zip(w_chunks) {
        let mut judged = [0f32; LANES];
        for k in 0..LANES {
            let (j, m) = lane(ac[k], wc[k]);
            judged[k] = j;
            max[k] = max[k].max(m);
            squares[k] += f64::from(ac[k]) * f64::from(ac[k]);
        }
        for (count, &tau) in counts.iter_mut().zip(taus) {
            for k in 0..LANES {
                count[k] += u32::from(judged[k] > tau);
            }
        }
    }
    for (k, (&a, &w)) in acc_rest.iter().zip(w_rest).enumerate() {
        let (j, m) = lane(a, w);
        max[k] = max[k].max(m);
        squares[k] += f64::from(a) * f64::from(a);
        for (count, &tau) in counts.iter_mut().zip(taus) {
            count[k] += u32::from(j > tau);
        }
    }
    let n = acc.len().max(1) as f32;
    UpdateStats {
        update_l2: squares.iter().sum::<f64>().sqrt() as f32,
        max_relative: max.iter().copied().fold(0.0, f32::max),
        significant_fraction: counts
            .iter()
            .map(|c| c.iter().map(|&x| u64::from(x)).sum::<u64>() as f32 / n)
            .collect(),
    }
}

/// L2 norm of `x`, summed in f64 over [`LANES`] accumulators.
pub fn l2_norm(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        #[target_feature(enable = "avx2")]
        fn with_avx2(x: &[f32]) -> f32 {
            l2_norm_portable(x)
        }
        // SAFETY: this CPU has AVX2 (checked just above).
        return unsafe { with_avx2(x) };
    }
    l2_norm_portable(x)
}

/// [`l2_norm`] as written: compiled once as is and once with AVX2.
#[inline(always)]
fn l2_norm_portable(x: &[f32]) -> f32 {
    let mut squares = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    for (k, &v) in chunks.remainder().iter().enumerate() {
        squares[k] += f64::from(v) * f64::from(v);
    }
    for c in chunks {
        for k in 0..LANES {
            squares[k] += f64::from(c[k]) * f64::from(c[k]);
        }
    }
    squares.iter().sum::<f64>().sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Where the CPU has AVX2, the passes run their AVX2 copy: it gives the portable
    /// copy's results to the bit, on values that include zeros, NaNs and infinities.
    #[test]
    fn the_avx2_copies_give_the_portable_results() {
        let mut state = 9u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32 - 0.5
        };
        let specials = [0.0, -0.0, f32::NAN, f32::INFINITY, -1e-39];
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| match specials.get(i % 89) {
                    Some(&v) => v,
                    None => next(),
                })
                .collect()
        };
        let (acc, w) = (values(10_007), values(10_007));
        let taus = [0.0, 0.01, 0.5, 3.0];
        let stats = update_stats(&acc, &w, &taus);
        let portable = update_stats_portable(&acc, &w, &taus);
        assert_eq!(stats.update_l2.to_bits(), portable.update_l2.to_bits());
        assert_eq!(
            stats.max_relative.to_bits(),
            portable.max_relative.to_bits()
        );
        assert_eq!(stats.significant_fraction, portable.significant_fraction);
        assert_eq!(l2_norm(&w).to_bits(), l2_norm_portable(&w).to_bits());
        for k in [1, 100, 5000, usize::MAX] {
            let (mut a1, mut a2) = (acc.clone(), acc.clone());
            let top = significant_top(&mut a1, &w, 0.01, k);
            let portable = significant_top_portable(&mut a2, &w, 0.01, k);
            assert_eq!(top.indices, portable.indices, "k = {k}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&top.values), bits(&portable.values));
            assert_eq!(bits(&a1), bits(&a2));
        }
    }

    #[test]
    fn selects_relative_changes_and_zero_weights() {
        let mut acc = vec![0.02, 0.5, 0.001, 0.3, 0.0];
        let w = [1.0, 1.0, 0.0, -10.0, 0.0];
        let s = significance_filter(&mut acc, &w, 0.01);
        assert_eq!(s.indices, vec![0, 1, 2, 3]);
        assert_eq!(s.values, vec![0.02, 0.5, 0.001, 0.3]);
        assert_eq!(acc, vec![0.0; 5]);
        let mut acc = vec![0.005, 0.05];
        let s = significance_filter(&mut acc, &[1.0, 1.0], 0.01);
        assert_eq!(s.indices, vec![1]);
        assert_eq!(acc, vec![0.005, 0.0]);
    }

    /// [`significant_top`] takes what filtering everything and then keeping the `k`
    /// largest magnitudes (lower index first among equals) takes, and loses nothing.
    fn check_top(acc: &[f32], w: &[f32], tau: f32, k: usize) {
        let mut everything = acc.to_vec();
        let all = significance_filter(&mut everything, w, tau);
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by(|&x, &y| {
            all.values[y]
                .abs()
                .total_cmp(&all.values[x].abs())
                .then(x.cmp(&y))
        });
        order.truncate(k);
        order.sort_unstable();
        let want_indices: Vec<u32> = order.iter().map(|&j| all.indices[j]).collect();
        let want_values: Vec<f32> = order.iter().map(|&j| all.values[j]).collect();
        let mut after = acc.to_vec();
        let got = significant_top(&mut after, w, tau, k);
        assert_eq!(got.indices, want_indices, "k {k}");
        assert_eq!(got.values, want_values, "k {k}");
        let mut rebuilt = after.clone();
        for (&i, &v) in got.indices.iter().zip(&got.values) {
            assert_eq!(rebuilt[i as usize], 0.0);
            rebuilt[i as usize] = v;
        }
        assert_eq!(rebuilt, acc);
    }

    #[test]
    fn significant_top_is_exact_beyond_its_sample_and_where_the_sample_misleads() {
        let n = 50_000;
        let w = vec![1.0f32; n];
        // Spread magnitudes, ties included: the sample's floor is a fair guess.
        let spread: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * if i % 2 == 0 { 1e-3 } else { -1e-3 })
            .collect();
        for k in [1, 100, 2_000, 24_999, 49_999] {
            check_top(&spread, &w, 0.05, k);
        }
        // Large only where the sample looks (every `n / SAMPLE`-th element): its floor
        // lets through fewer than `k`, and the filter goes back for every significant one.
        let taken = SAMPLE.min(n);
        let mut lopsided = vec![0.2f32; n];
        for j in 0..taken {
            lopsided[j * n / taken] = 10.0;
        }
        for k in [100, taken, 6_000] {
            check_top(&lopsided, &w, 0.05, k);
        }
    }

    proptest! {
        #[test]
        fn nothing_is_lost(acc in proptest::collection::vec(crate::test_strategies::uniform(-1.0, 1.0), 0..200), tau in crate::test_strategies::uniform(0.0, 2.0)) {
            let w: Vec<f32> = (0..acc.len()).map(|i| (i % 7) as f32 - 3.0).collect();
            let before = acc.clone();
            let mut after = acc.clone();
            let s = significance_filter(&mut after, &w, tau);
            let mut rebuilt = after.clone();
            for (&i, &v) in s.indices.iter().zip(&s.values) {
                prop_assert_eq!(rebuilt[i as usize], 0.0);
                rebuilt[i as usize] = v;
            }
            prop_assert_eq!(rebuilt, before);
            prop_assert!(s.indices.windows(2).all(|p| p[0] < p[1]));
            let frac = significant_fractions(&acc, &w, &[tau])[0];
            prop_assert!((frac - s.len() as f32 / acc.len().max(1) as f32).abs() < 1e-6);
        }

        /// The top-`k` filter on small tensors (the sample is all of them), ties at
        /// the cut included: see [`check_top`].
        #[test]
        fn significant_top_takes_the_largest_significant_and_loses_nothing(
            pairs in proptest::collection::vec(
                // A few values repeat, so there are ties at the cut.
                (prop_oneof![crate::test_strategies::uniform(-1.0, 1.0), Just(0.5f32), Just(-0.5f32), Just(0.0f32)],
                 prop_oneof![crate::test_strategies::uniform(-2.0, 2.0), Just(0.0f32)]),
                0..300,
            ),
            tau in crate::test_strategies::uniform(0.0, 1.0),
            k in 0usize..320,
        ) {
            let (acc, w): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            check_top(&acc, &w, tau, k);
        }

        /// The fused pass gives what each statistic's own definition gives: the same
        /// maximum and fractions, and the norm to f64 rounding.
        #[test]
        fn update_stats_match_their_definitions(
            pairs in proptest::collection::vec(
                (crate::test_strategies::uniform(-1.0, 1.0), crate::test_strategies::uniform(-2.0, 2.0), 0u8..4),
                0..300,
            ),
            taus in proptest::collection::vec(crate::test_strategies::uniform(-0.1, 3.0), 0..5),
        ) {
            // Some accumulated values and weights exactly zero, as in real tensors.
            let acc: Vec<f32> = pairs.iter().map(|&(a, _, z)| if z == 1 || z == 3 { 0.0 } else { a }).collect();
            let w: Vec<f32> = pairs.iter().map(|&(_, w, z)| if z >= 2 { 0.0 } else { w }).collect();
            let stats = update_stats(&acc, &w, &taus);
            let l2 = acc.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            prop_assert!((f64::from(stats.update_l2) - l2).abs() <= l2 * 1e-6);
            prop_assert!((f64::from(l2_norm(&acc)) - l2).abs() <= l2 * 1e-6);
            let max_relative = acc
                .iter()
                .zip(&w)
                .filter(|(_, w)| **w != 0.0)
                .map(|(a, w)| (a / w).abs())
                .fold(0.0, f32::max);
            prop_assert_eq!(stats.max_relative, max_relative);
            let fractions = significant_fractions(&acc, &w, &taus);
            prop_assert_eq!(stats.significant_fraction.len(), fractions.len());
            prop_assert_eq!(stats.significant_fraction, fractions);
        }
    }
}
