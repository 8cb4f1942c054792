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
    a != 0.0 && (w == 0.0 || (a / w).abs() > tau)
}

/// Selects every `i` with `|acc_i / w_i| > tau`, or `w_i == 0` and `acc_i != 0`, hands the
/// values out and zeroes them in `acc`; what is not selected keeps accumulating.
/// (An element with nothing accumulated has nothing to send.)
pub fn significance_filter(acc: &mut [f32], w: &[f32], tau: f32) -> Selection {
    assert_eq!(
        acc.len(),
        w.len(),
        "accumulator and weights differ in length"
    );
    let mut out = Selection::default();
    for (i, (a, &w)) in acc.iter_mut().zip(w).enumerate() {
        if is_significant(*a, w, tau) {
            out.indices.push(i as u32);
            out.values.push(*a);
            *a = 0.0;
        }
    }
    out
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
