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
    }
}
