//! Loss-aware weight quantization (Hou & Kwok): per tensor, choose scales `α` and integer
//! levels `b` minimising the curvature-weighted error `Σ d_i (w_i − α·b_i/k)²`, where `d`
//! is a diagonal curvature estimate (`sqrt(v) + ε` from Adam's second moment `v`) and `k`
//! is the number of positive levels (`k = 1` is ternary).
//!
//! Solvers:
//! - [`LaqSolver::TernaryExact`]: the optimal support is `{|w_i| > α/2}`, a prefix of the
//!   weights sorted by magnitude, so scanning every prefix finds the global optimum.
//! - [`LaqSolver::TernaryApprox`]: the alternating scheme (α from b, b from α).
//! - [`LaqSolver::Linear`]: `bits`-bit linear levels. For a fixed α each weight's best level
//!   is the nearest one, and it only changes where `|w_i|·k/α` crosses a half-level, so a sweep
//!   of α over those breakpoints (updating `Σ d w b` and `Σ d b²` one event at a time) visits
//!   every candidate assignment and finds the global optimum in `O(n·k·log(n·k))`. Tensors
//!   with more than [`LINEAR_EXACT_BUDGET`] breakpoints use alternating minimisation from
//!   several starting scales instead.
//!
//! With `split_sign`, positive and negative weights get their own scale (α⁺, α⁻): the
//! objective separates, and each half is solved on its own.

use serde::{Deserialize, Serialize};

/// Largest `n·k` (weights × positive levels) solved exactly by the breakpoint sweep.
pub const LINEAR_EXACT_BUDGET: usize = 1 << 22;

/// Which solver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LaqSolver {
    /// Ternary, globally optimal.
    TernaryExact,
    /// Ternary, alternating approximation with at most `iters` rounds.
    TernaryApprox {
        /// Maximum alternations.
        iters: u32,
    },
    /// `bits`-bit linear levels (`2^(bits-1) − 1` per sign): exact breakpoint sweep up to
    /// [`LINEAR_EXACT_BUDGET`], alternating beyond.
    Linear {
        /// Bits per weight, `2..=8`.
        bits: u8,
        /// Maximum alternations per start.
        iters: u32,
    },
    /// `bits`-bit linear levels by alternating minimisation only: cheaper per call, for
    /// re-quantizing weights every training step.
    LinearApprox {
        /// Bits per weight, `2..=8`.
        bits: u8,
        /// Maximum alternations per start.
        iters: u32,
    },
}

impl LaqSolver {
    /// Positive levels `k`: weights take values `α·j/k`, `j ∈ -k..=k`.
    pub fn levels(&self) -> i32 {
        match self {
            Self::TernaryExact | Self::TernaryApprox { .. } => 1,
            Self::Linear { bits, .. } | Self::LinearApprox { bits, .. } => {
                (1i32 << (bits.clamp(&2, &8) - 1)) - 1
            }
        }
    }
}

/// Quantized weights: `ŵ_i = α_± · level_i / k`.
#[derive(Debug, Clone, PartialEq)]
pub struct LaqWeights {
    /// Scale for positive levels.
    pub alpha_pos: f32,
    /// Scale for negative levels (equal to `alpha_pos` without `split_sign`).
    pub alpha_neg: f32,
    /// Positive levels `k`.
    pub k: i32,
    /// Level per weight, in `-k..=k`.
    pub levels: Vec<i8>,
}

impl LaqWeights {
    /// The quantized weights.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.k as f32;
        self.levels
            .iter()
            .map(|&l| {
                let a = if l >= 0 {
                    self.alpha_pos
                } else {
                    self.alpha_neg
                };
                a * f32::from(l) / k
            })
            .collect()
    }
}

/// `Σ d_i (w_i − q_i)²` in f64.
pub fn weighted_error(w: &[f32], d: &[f32], q: &[f32]) -> f64 {
    w.iter()
        .zip(d)
        .zip(q)
        .map(|((&w, &d), &q)| f64::from(d) * (f64::from(w) - f64::from(q)).powi(2))
        .sum()
}

/// Curvature weights `sqrt(v) + eps` from Adam's (bias-corrected) second moment.
pub fn curvature_from_adam(v: &[f32], eps: f32) -> Vec<f32> {
    v.iter().map(|&v| v.max(0.0).sqrt() + eps).collect()
}

/// Quantizes `w` weighted by `d` (same length, `d > 0`).
pub fn laq_quantize(w: &[f32], d: &[f32], solver: LaqSolver, split_sign: bool) -> LaqWeights {
    assert_eq!(w.len(), d.len(), "weights and curvature differ in length");
    let k = solver.levels();
    let mut levels = vec![0i8; w.len()];
    let (alpha_pos, alpha_neg) = if split_sign {
        let pos: Vec<usize> = (0..w.len()).filter(|&i| w[i] > 0.0).collect();
        let neg: Vec<usize> = (0..w.len()).filter(|&i| w[i] < 0.0).collect();
        let a = solve_subset(w, d, &pos, solver, &mut levels);
        let b = solve_subset(w, d, &neg, solver, &mut levels);
        (a, b)
    } else {
        let all: Vec<usize> = (0..w.len()).collect();
        let a = solve_subset(w, d, &all, solver, &mut levels);
        (a, a)
    };
    LaqWeights {
        alpha_pos,
        alpha_neg,
        k,
        levels,
    }
}

/// Solves for one scale over the weights at `idx`, writing their levels; returns α.
fn solve_subset(w: &[f32], d: &[f32], idx: &[usize], solver: LaqSolver, levels: &mut [i8]) -> f32 {
    match solver {
        LaqSolver::TernaryExact => ternary_exact(w, d, idx, levels),
        LaqSolver::TernaryApprox { iters } => ternary_alternating(w, d, idx, iters, levels),
        LaqSolver::LinearApprox { iters, .. } => {
            linear_alternating(w, d, idx, solver.levels(), iters, levels)
        }
        LaqSolver::Linear { iters, .. } => {
            let k = solver.levels();
            if idx.len().saturating_mul(k as usize) <= LINEAR_EXACT_BUDGET {
                linear_sweep(w, d, idx, k, levels)
            } else {
                linear_alternating(w, d, idx, k, iters, levels)
            }
        }
    }
}

/// Exact `k`-level solver: sweep α upwards over the breakpoints where a level drops by one.
fn linear_sweep(w: &[f32], d: &[f32], idx: &[usize], k: i32, levels: &mut [i8]) -> f32 {
    let kf = f64::from(k);
    // Event: (α at which element `pos` drops from level j+1 to j, pos).
    let mut events: Vec<(f64, u32)> = Vec::with_capacity(idx.len() * k as usize);
    let (mut num, mut den) = (0f64, 0f64);
    for (pos, &i) in idx.iter().enumerate() {
        let a = f64::from(w[i].abs());
        if a == 0.0 {
            continue;
        }
        for j in 0..k {
            events.push((a * kf / (f64::from(j) + 0.5), pos as u32));
        }
        // As α → 0 every non-zero weight sits at level ±k.
        num += f64::from(d[i]) * a;
        den += f64::from(d[i]);
    }
    events.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut cur: Vec<i32> = idx
        .iter()
        .map(|&i| if w[i] != 0.0 { k } else { 0 })
        .collect();
    // Reduction of the error for the current assignment with its optimal α: num² / den.
    let score = |num: f64, den: f64| {
        if den > 0.0 && num > 0.0 {
            num * num / den
        } else {
            0.0
        }
    };
    let (mut best, mut best_events) = (score(num, den), 0usize);
    let mut e = 0;
    while e < events.len() {
        // Apply every event at this α together (ties change the assignment at once).
        let at = events[e].0;
        while e < events.len() && events[e].0 == at {
            let pos = events[e].1 as usize;
            let i = idx[pos];
            let (a, di) = (f64::from(w[i].abs()), f64::from(d[i]));
            let (old, new) = (f64::from(cur[pos]) / kf, f64::from(cur[pos] - 1) / kf);
            num += di * a * (new - old);
            den += di * (new * new - old * old);
            cur[pos] -= 1;
            e += 1;
        }
        let s = score(num, den);
        if s > best {
            best = s;
            best_events = e;
        }
    }
    // Replay the best prefix of events to recover its assignment and α.
    let mut cur: Vec<i32> = idx
        .iter()
        .map(|&i| if w[i] != 0.0 { k } else { 0 })
        .collect();
    for &(_, pos) in &events[..best_events] {
        cur[pos as usize] -= 1;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (pos, &i) in idx.iter().enumerate() {
        let b = f64::from(cur[pos]) / kf;
        num += f64::from(d[i]) * f64::from(w[i].abs()) * b;
        den += f64::from(d[i]) * b * b;
        levels[i] = (cur[pos] * i32::from(sign(w[i]))) as i8;
    }
    if den > 0.0 && num > 0.0 {
        (num / den) as f32
    } else {
        levels_clear(idx, levels);
        0.0
    }
}

fn levels_clear(idx: &[usize], levels: &mut [i8]) {
    for &i in idx {
        levels[i] = 0;
    }
}

fn ternary_exact(w: &[f32], d: &[f32], idx: &[usize], levels: &mut [i8]) -> f32 {
    let mut order: Vec<usize> = idx.to_vec();
    order.sort_unstable_by(|&a, &b| w[b].abs().total_cmp(&w[a].abs()));
    // Support = first m by magnitude; objective reduction (Σ d|w|)² / Σ d.
    let (mut sw, mut sd) = (0f64, 0f64);
    let (mut best, mut best_m, mut best_alpha) = (0f64, 0usize, 0f64);
    for (m, &i) in order.iter().enumerate() {
        sw += f64::from(d[i]) * f64::from(w[i].abs());
        sd += f64::from(d[i]);
        if sd > 0.0 && sw * sw / sd > best {
            best = sw * sw / sd;
            best_m = m + 1;
            best_alpha = sw / sd;
        }
    }
    for (m, &i) in order.iter().enumerate() {
        levels[i] = if m < best_m { sign(w[i]) } else { 0 };
    }
    best_alpha as f32
}

fn sign(v: f32) -> i8 {
    if v > 0.0 {
        1
    } else if v < 0.0 {
        -1
    } else {
        0
    }
}

fn ternary_alternating(w: &[f32], d: &[f32], idx: &[usize], iters: u32, levels: &mut [i8]) -> f32 {
    for &i in idx {
        levels[i] = sign(w[i]);
    }
    let mut alpha = 0f32;
    for _ in 0..iters.max(1) {
        let (mut sw, mut sd) = (0f64, 0f64);
        for &i in idx {
            if levels[i] != 0 {
                sw += f64::from(d[i]) * f64::from(w[i].abs());
                sd += f64::from(d[i]);
            }
        }
        alpha = if sd > 0.0 { (sw / sd) as f32 } else { 0.0 };
        let mut changed = false;
        for &i in idx {
            let l = if w[i].abs() > alpha / 2.0 {
                sign(w[i])
            } else {
                0
            };
            changed |= l != levels[i];
            levels[i] = l;
        }
        if !changed {
            break;
        }
    }
    alpha
}

/// Starting scales of the alternating solver, as fractions of the largest `|w|`.
const STARTS: [f32; 6] = [1.0, 0.85, 0.7, 0.55, 0.4, 0.25];

/// Alternating minimisation from each of [`STARTS`]; the start with the least error wins
/// (the first on a tie).
///
/// The starts are independent, so they advance in lockstep: one pass over the weights
/// updates all six sums at once, six independent chains of additions where one start alone
/// would wait on each addition. Each start's own arithmetic is unchanged and in the same
/// order, so the result is the same to the bit as running the starts one after another
/// (`tests::linear_alternating_matches_the_plain_formulation`). The subset is read from
/// contiguous copies and rounded without a libm call, so the level passes vectorise.
fn linear_alternating(
    w: &[f32],
    d: &[f32],
    idx: &[usize],
    k: i32,
    iters: u32,
    levels: &mut [i8],
) -> f32 {
    let ws: Vec<f32> = idx.iter().map(|&i| w[i]).collect();
    let max = ws.iter().fold(0f32, |m, &v| m.max(v.abs()));
    if max == 0.0 {
        levels_clear(idx, levels);
        return 0.0;
    }
    let ds: Vec<f32> = idx.iter().map(|&i| d[i]).collect();
    // `d·w` in f64, the first product of every numerator term.
    let dw: Vec<f64> = ws
        .iter()
        .zip(&ds)
        .map(|(&w, &d)| f64::from(d) * f64::from(w))
        .collect();
    let kf = k as f32;
    let mut alpha = STARTS.map(|s| max * s);
    let mut active = [true; STARTS.len()];
    let mut ls: [Vec<i8>; STARTS.len()] = std::array::from_fn(|_| vec![0i8; ws.len()]);
    for _ in 0..iters.max(1) {
        if !active.contains(&true) {
            break;
        }
        for s in 0..STARTS.len() {
            if active[s] {
                assign_levels(&ws, kf, alpha[s], &mut ls[s]);
            }
        }
        // α = Σ d w (b/k) / Σ d (b/k)², per start (finished starts' sums go unused).
        let (num, den) = moments(&dw, &ds, &ls, k);
        for s in 0..STARTS.len() {
            if !active[s] {
                continue;
            }
            let next = if den[s] > 0.0 {
                (num[s] / den[s]) as f32
            } else {
                alpha[s]
            };
            let converged = (next - alpha[s]).abs() <= alpha[s] * 1e-6;
            active[s] = !converged;
            alpha[s] = next;
        }
    }
    for (l, &a) in ls.iter_mut().zip(&alpha) {
        assign_levels(&ws, kf, a, l);
    }
    let errors = level_errors(&ws, &ds, &ls, &alpha, k);
    let mut best: Option<usize> = None;
    for s in 0..STARTS.len() {
        if errors[s] < best.map_or(f64::INFINITY, |b| errors[b]) {
            best = Some(s);
        }
    }
    let Some(best) = best else {
        // No start has a finite error (non-finite input): levels stay as they were.
        return 0.0;
    };
    for (&i, &l) in idx.iter().zip(&ls[best]) {
        levels[i] = l;
    }
    alpha[best]
}

/// `(Σ d w b, Σ d b²)` with `b = level / k`, for every start's levels, in one pass.
fn moments(
    dw: &[f64],
    ds: &[f32],
    ls: &[Vec<i8>; STARTS.len()],
    k: i32,
) -> ([f64; STARTS.len()], [f64; STARTS.len()]) {
    // `b = level / k` in f64, by level + k.
    let ratio: Vec<f64> = (-k..=k).map(|l| f64::from(l) / f64::from(k)).collect();
    let n = dw.len();
    let ls: [&[i8]; STARTS.len()] = std::array::from_fn(|s| &ls[s][..n]);
    let (mut num, mut den) = ([0f64; STARTS.len()], [0f64; STARTS.len()]);
    for (i, (&dw, &d)) in dw.iter().zip(&ds[..n]).enumerate() {
        let d = f64::from(d);
        for s in 0..STARTS.len() {
            let b = ratio[(i32::from(ls[s][i]) + k) as usize];
            num[s] += dw * b;
            den[s] += d * b * b;
        }
    }
    (num, den)
}

/// `Σ d (w − α·level/k)²` for every start's levels and scale, in one pass.
fn level_errors(
    ws: &[f32],
    ds: &[f32],
    ls: &[Vec<i8>; STARTS.len()],
    alpha: &[f32; STARTS.len()],
    k: i32,
) -> [f64; STARTS.len()] {
    let kf = k as f32;
    // `α·level/k` in f32, by start, by level + k.
    let value: Vec<Vec<f32>> = alpha
        .iter()
        .map(|&a| (-k..=k).map(|l| a * l as f32 / kf).collect())
        .collect();
    let n = ws.len();
    let ls: [&[i8]; STARTS.len()] = std::array::from_fn(|s| &ls[s][..n]);
    let mut err = [0f64; STARTS.len()];
    for (i, (&w, &d)) in ws.iter().zip(&ds[..n]).enumerate() {
        let d = f64::from(d);
        for s in 0..STARTS.len() {
            err[s] += d * f64::from(w - value[s][(i32::from(ls[s][i]) + k) as usize]).powi(2);
        }
    }
    err
}

/// Each weight's nearest level at scale `alpha`: `(w·k/α).round().clamp(-k, k)`.
fn assign_levels(ws: &[f32], kf: f32, alpha: f32, out: &mut [i8]) {
    for (l, &w) in out.iter_mut().zip(ws) {
        *l = nearest_level(w * kf / alpha, kf);
    }
}

/// `v.round().clamp(-k, k) as i8` (ties away from zero; NaN gives 0) in float and integer
/// arithmetic that vectorises, where `round` is a libm call and a saturating float-to-`i8`
/// cast is not vectorised. Clamping first changes nothing, as `k` is an integer. For
/// `0 ≤ a < 2^22`, `(a + 2^23) − 2^23` is `a` rounded to the nearest integer, ties to even
/// (the sum's unit in the last place is 1); a remainder of exactly one half then moves it
/// away from zero. An integer `r` with `|r| < 2^22` is the low bits of `r + 1.5·2^23`.
fn nearest_level(v: f32, kf: f32) -> i8 {
    const SHIFT: f32 = 8_388_608.0; // 2^23
    const BIAS: f32 = 12_582_912.0; // 1.5·2^23
    let c = v.clamp(-kf, kf);
    let a = if c.is_nan() { 0.0 } else { c.abs() };
    let even = (a + SHIFT) - SHIFT;
    let away = if a - even == 0.5 { even + 1.0 } else { even };
    let r = away.copysign(c) + BIAS;
    (r.to_bits().wrapping_sub(BIAS.to_bits())) as i8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    /// Minimum of Σ d (w − α b/k)² over every level vector b and the optimal α ≥ 0 for each.
    fn brute_force(w: &[f32], d: &[f32], k: i32, split: bool) -> f64 {
        let n = w.len();
        let choices = (2 * k + 1) as usize;
        let total = choices.pow(n as u32);
        let mut best = f64::INFINITY;
        let closed_form = |sel: &dyn Fn(usize) -> bool, b: &[f64]| -> f64 {
            // Error over the selected elements with the best α ≥ 0 for fixed b.
            let (mut num, mut den, mut ww) = (0f64, 0f64, 0f64);
            for i in (0..n).filter(|&i| sel(i)) {
                let (wi, di) = (f64::from(w[i]), f64::from(d[i]));
                num += di * wi * b[i];
                den += di * b[i] * b[i];
                ww += di * wi * wi;
            }
            if den > 0.0 && num > 0.0 {
                ww - num * num / den
            } else {
                ww
            }
        };
        for code in 0..total {
            let mut c = code;
            let b: Vec<f64> = (0..n)
                .map(|_| {
                    let l = (c % choices) as i32 - k;
                    c /= choices;
                    f64::from(l) / f64::from(k)
                })
                .collect();
            let e = if split {
                // Positive weights use α⁺ and non-negative levels; negative ones α⁻.
                if (0..n).any(|i| {
                    (w[i] > 0.0 && b[i] < 0.0)
                        || (w[i] < 0.0 && b[i] > 0.0)
                        || (w[i] == 0.0 && b[i] != 0.0)
                }) {
                    continue;
                }
                closed_form(&|i| w[i] > 0.0, &b) + closed_form(&|i| w[i] < 0.0, &b) + 0.0
            } else {
                closed_form(&|_| true, &b)
            };
            best = best.min(e);
        }
        best
    }

    fn small_problem() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (2usize..=6).prop_flat_map(|n| {
            (
                proptest::collection::vec(-2.0f32..2.0, n),
                proptest::collection::vec(0.01f32..3.0, n),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn ternary_exact_matches_brute_force((w, d) in small_problem(), split in any::<bool>()) {
            let q = laq_quantize(&w, &d, LaqSolver::TernaryExact, split);
            let got = weighted_error(&w, &d, &q.dequantize());
            let want = brute_force(&w, &d, 1, split);
            prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want), "exact {got} vs brute force {want}");
        }

        #[test]
        fn ternary_approx_is_never_better_than_optimal((w, d) in small_problem(), split in any::<bool>()) {
            let q = laq_quantize(&w, &d, LaqSolver::TernaryApprox { iters: 20 }, split);
            let got = weighted_error(&w, &d, &q.dequantize());
            let opt = brute_force(&w, &d, 1, split);
            prop_assert!(got >= opt - 1e-4 * (1.0 + opt));
            // Unquantized error (all zeros) bounds any sensible solution.
            prop_assert!(got <= weighted_error(&w, &d, &vec![0.0; w.len()]) + 1e-6);
        }
    }

    #[test]
    fn ternary_approx_is_close_to_optimal_on_average() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut approx, mut exact) = (0f64, 0f64);
        for _ in 0..300 {
            let (w, d) = small_problem().new_tree(&mut runner).unwrap().current();
            let q = laq_quantize(&w, &d, LaqSolver::TernaryApprox { iters: 20 }, false);
            approx += weighted_error(&w, &d, &q.dequantize());
            exact += brute_force(&w, &d, 1, false);
        }
        assert!(approx <= exact * 1.10, "approx {approx} vs exact {exact}");
    }

    #[test]
    fn linear_sweep_matches_brute_force() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for bits in [2u8, 3, 4] {
            let k = (1 << (bits - 1)) - 1;
            for case in 0..100 {
                let (w, d) = small_problem().new_tree(&mut runner).unwrap().current();
                let n = w.len().min(if bits == 4 { 4 } else { 5 });
                let (w, d) = (&w[..n], &d[..n]);
                let split = case % 2 == 0;
                let q = laq_quantize(w, d, LaqSolver::Linear { bits, iters: 30 }, split);
                assert!(q.levels.iter().all(|&l| i32::from(l).abs() <= k));
                let got = weighted_error(w, d, &q.dequantize());
                let opt = brute_force(w, d, k, split);
                assert!(
                    (got - opt).abs() <= 1e-4 * (1.0 + opt),
                    "bits {bits}: sweep {got} vs brute force {opt}"
                );
            }
        }
    }

    #[test]
    fn linear_alternating_is_bounded_by_the_optimum() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut alt_sum, mut opt_sum) = (0f64, 0f64);
        for _ in 0..150 {
            let (w, d) = small_problem().new_tree(&mut runner).unwrap().current();
            let n = w.len().min(5);
            let (w, d) = (&w[..n], &d[..n]);
            let idx: Vec<usize> = (0..n).collect();
            let mut levels = vec![0i8; n];
            let alpha = linear_alternating(w, d, &idx, 3, 30, &mut levels);
            let q = LaqWeights {
                alpha_pos: alpha,
                alpha_neg: alpha,
                k: 3,
                levels,
            };
            let alt = weighted_error(w, d, &q.dequantize());
            let opt = brute_force(w, d, 3, false);
            assert!(alt >= opt - 1e-4 * (1.0 + opt));
            alt_sum += alt;
            opt_sum += opt;
        }
        // The fallback for very large tensors: 1.094× the optimum on these cases when written.
        assert!(
            alt_sum <= opt_sum * 1.25,
            "alternating {alt_sum} vs optimum {opt_sum}"
        );
    }

    /// The alternating solver as first written: gathers through `idx` and calls `round`
    /// on every pass. The solver must give the same bits, so every recorded training figure
    /// stays what it was.
    fn linear_alternating_plain(
        w: &[f32],
        d: &[f32],
        idx: &[usize],
        k: i32,
        iters: u32,
        levels: &mut [i8],
    ) -> f32 {
        let max = idx.iter().fold(0f32, |m, &i| m.max(w[i].abs()));
        if max == 0.0 {
            levels_clear(idx, levels);
            return 0.0;
        }
        let kf = k as f32;
        let assign = |alpha: f32, out: &mut Vec<i8>| {
            out.clear();
            out.extend(
                idx.iter()
                    .map(|&i| (w[i] * kf / alpha).round().clamp(-kf, kf) as i8),
            );
        };
        let error = |alpha: f32, ls: &[i8]| -> f64 {
            idx.iter()
                .zip(ls)
                .map(|(&i, &l)| {
                    f64::from(d[i]) * f64::from(w[i] - alpha * f32::from(l) / kf).powi(2)
                })
                .sum()
        };
        let mut best = (f64::INFINITY, 0f32, Vec::new());
        let mut ls = Vec::with_capacity(idx.len());
        for start in [1.0f32, 0.85, 0.7, 0.55, 0.4, 0.25] {
            let mut alpha = max * start;
            for _ in 0..iters.max(1) {
                assign(alpha, &mut ls);
                let (mut num, mut den) = (0f64, 0f64);
                for (&i, &l) in idx.iter().zip(&ls) {
                    let b = f64::from(l) / f64::from(k);
                    num += f64::from(d[i]) * f64::from(w[i]) * b;
                    den += f64::from(d[i]) * b * b;
                }
                let next = if den > 0.0 { (num / den) as f32 } else { alpha };
                if (next - alpha).abs() <= alpha * 1e-6 {
                    alpha = next;
                    break;
                }
                alpha = next;
            }
            assign(alpha, &mut ls);
            let e = error(alpha, &ls);
            if e < best.0 {
                best = (e, alpha, ls.clone());
            }
        }
        for (&i, &l) in idx.iter().zip(&best.2) {
            levels[i] = l;
        }
        best.1
    }

    /// Weights of a trained layer's spread, with exact zeros, multiples of 1/80 and
    /// outliers, over a random subset of positions.
    fn layer_like() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, Vec<usize>)> {
        (1usize..400).prop_flat_map(|n| {
            (
                proptest::collection::vec(
                    prop_oneof![
                        6 => -0.1f32..0.1,
                        1 => Just(0.0f32),
                        1 => (-8i32..=8).prop_map(|h| h as f32 * 0.0125),
                        1 => -5.0f32..5.0,
                    ],
                    n,
                ),
                proptest::collection::vec(1e-8f32..2.0, n),
                proptest::collection::vec(any::<bool>(), n),
            )
                .prop_map(|(w, d, keep)| {
                    let idx = (0..w.len()).filter(|&i| keep[i]).collect();
                    (w, d, idx)
                })
        })
    }

    /// `(α, levels)` from the solver and from the plain formulation, each writing over the
    /// same marker levels (7), so that levels left untouched compare too.
    fn solve_both(
        w: &[f32],
        d: &[f32],
        idx: &[usize],
        k: i32,
        iters: u32,
    ) -> ((f32, Vec<i8>), (f32, Vec<i8>)) {
        let (mut fast, mut plain) = (vec![7i8; w.len()], vec![7i8; w.len()]);
        let a = linear_alternating(w, d, idx, k, iters, &mut fast);
        let b = linear_alternating_plain(w, d, idx, k, iters, &mut plain);
        ((a, fast), (b, plain))
    }

    /// Weights whose largest magnitude is `k` and whose others sit on half-levels
    /// `±(j + 0.5)`: the first start (α = max) meets exact ties on its first pass, where
    /// `w·k/α` is exactly `j + 0.5`.
    fn exact_ties() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, i32)> {
        (2u8..=8).prop_flat_map(|bits| {
            let k = (1i32 << (bits - 1)) - 1;
            (
                proptest::collection::vec((0..k, any::<bool>()), 1..60),
                proptest::collection::vec(0.01f32..2.0, 61),
            )
                .prop_map(move |(halves, d)| {
                    let mut w = vec![k as f32];
                    w.extend(halves.iter().map(|&(j, negative)| {
                        let v = j as f32 + 0.5;
                        if negative { -v } else { v }
                    }));
                    let d = d[..w.len()].to_vec();
                    (w, d, k)
                })
        })
    }

    /// Values a broken upstream could hand the solver: non-finite, zero, negative, tiny.
    fn special_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            3 => -1.0f32..1.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => Just(f32::MIN_POSITIVE),
            1 => Just(f32::MAX),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn linear_alternating_matches_the_plain_formulation(
            (w, d, idx) in layer_like(),
            bits in 2u8..=8,
            iters in 1u32..12,
        ) {
            let k = (1i32 << (bits - 1)) - 1;
            let ((a, fast), (b, plain)) = solve_both(&w, &d, &idx, k, iters);
            prop_assert_eq!(a.to_bits(), b.to_bits());
            prop_assert_eq!(fast, plain);
        }

        #[test]
        fn linear_alternating_matches_the_plain_formulation_on_exact_ties(
            (w, d, k) in exact_ties(),
            iters in 1u32..12,
        ) {
            let idx: Vec<usize> = (0..w.len()).collect();
            let ((a, fast), (b, plain)) = solve_both(&w, &d, &idx, k, iters);
            prop_assert_eq!(a.to_bits(), b.to_bits());
            prop_assert_eq!(fast, plain);
        }

        #[test]
        fn linear_alternating_matches_the_plain_formulation_on_non_finite_input(
            w in proptest::collection::vec(special_f32(), 1..40),
            d in proptest::collection::vec(special_f32(), 40),
            bits in 2u8..=8,
            iters in 1u32..6,
        ) {
            let k = (1i32 << (bits - 1)) - 1;
            let d = &d[..w.len()];
            let idx: Vec<usize> = (0..w.len()).collect();
            let ((a, fast), (b, plain)) = solve_both(&w, d, &idx, k, iters);
            prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{a} vs {b}");
            prop_assert_eq!(fast, plain);
        }

        #[test]
        fn nearest_level_rounds_as_round_and_clamp(v in any::<f32>(), bits in 2u8..=8) {
            let kf = ((1i32 << (bits - 1)) - 1) as f32;
            prop_assert_eq!(nearest_level(v, kf), v.round().clamp(-kf, kf) as i8);
        }
    }

    #[test]
    fn nearest_level_rounds_halves_away_from_zero_and_saturates() {
        let k = 127.0;
        for (v, want) in [
            (0.5f32, 1i8),
            (-0.5, -1),
            (0.499_999_97, 0),
            (-0.499_999_97, 0),
            (2.5, 3),
            (-2.5, -3),
            (126.5, 127),
            (1e30, 127),
            (f32::NEG_INFINITY, -127),
            (f32::NAN, 0),
            (-0.0, 0),
        ] {
            assert_eq!(nearest_level(v, k), want, "{v}");
            assert_eq!(nearest_level(v, k), v.round().clamp(-k, k) as i8, "{v}");
        }
        // Every quarter-step over and beyond the level range, for every level count.
        for bits in 2..=8 {
            let k = ((1i32 << (bits - 1)) - 1) as f32;
            for q in -600..=600 {
                let v = q as f32 / 4.0;
                assert_eq!(
                    nearest_level(v, k),
                    v.round().clamp(-k, k) as i8,
                    "{v}, k {k}"
                );
            }
        }
    }

    #[test]
    fn curvature_weighting_changes_the_solution() {
        // A heavily weighted small weight pulls α down towards it.
        let w = [1.0f32, 0.4, 0.35];
        let flat = laq_quantize(&w, &[1.0, 1.0, 1.0], LaqSolver::TernaryExact, false);
        let skew = laq_quantize(&w, &[0.01, 10.0, 10.0], LaqSolver::TernaryExact, false);
        assert!(
            skew.alpha_pos < flat.alpha_pos,
            "{} vs {}",
            skew.alpha_pos,
            flat.alpha_pos
        );
        assert_eq!(
            curvature_from_adam(&[4.0, -1.0], 1e-8),
            vec![2.0 + 1e-8, 1e-8]
        );
    }
}
