//! The solvers the LAN runs at every step, built on [`super::kernel`]'s passes: a search
//! over the scale for `bits`-bit linear levels, and an exact search over the support for
//! ternary levels that sorts only the few weights near its optimum.
//!
//! With separate scales (α⁺, α⁻) the positive and the negative weights are two
//! independent problems, each solved on a contiguous copy of its magnitudes (one pass
//! splits the tensor); with one scale they are one problem over every magnitude.

use super::kernel::{self, Half};

/// Runs `f` on the problems a tensor splits into, each over contiguous magnitudes in
/// tensor order, in buffers this thread reuses from call to call (a step quantizes every
/// tensor again, and fresh buffers would cost their page faults each time).
fn with_problems<R>(w: &[f32], d: &[f32], split_sign: bool, f: impl FnOnce(&[Half]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<[Half; 2]> = Default::default();
    }
    SCRATCH.with(|scratch| {
        // A solver re-entered on this thread (it is not) would get fresh buffers.
        let mut fresh = Default::default();
        let mut borrowed = scratch.try_borrow_mut();
        let halves: &mut [Half; 2] = match borrowed.as_deref_mut() {
            Ok(h) => h,
            Err(_) => &mut fresh,
        };
        if split_sign {
            kernel::split(w, d, halves);
            f(&halves[..])
        } else {
            let h = &mut halves[0];
            h.a.clear();
            h.a.extend(w.iter().map(|w| w.abs()));
            h.d.clear();
            h.d.extend_from_slice(d);
            h.extent = kernel::extent(&h.a, &h.d);
            f(&halves[..1])
        }
    })
}

/// A per-sign pair from one value per problem.
fn per_sign(v: &[f32]) -> [f32; 2] {
    match v {
        [p, n] => [*p, *n],
        [both] => [*both, *both],
        _ => unreachable!("one or two problems"),
    }
}

/// How much of the error `Σ d·a²` the best scale for an assignment removes:
/// `(Σ d·a·l)² / Σ d·l²`; larger is better, and 0 when the assignment is empty or the
/// sums are not finite (non-finite input), so it is never NaN.
fn gain(num: f64, den: f64) -> f64 {
    let g = num * num / den;
    if num > 0.0 && den > 0.0 && g.is_finite() {
        g
    } else {
        0.0
    }
}

/// `α = k·Σ d·a·l / Σ d·l²`, the scale that minimises the error of fixed levels `l`
/// (0 when they are all 0, or the sums are not finite).
fn optimal_scale([num, den]: [f64; 2], k: f32) -> f32 {
    if num > 0.0 && den > 0.0 && num.is_finite() && den.is_finite() {
        (f64::from(k) * num / den) as f32
    } else {
        0.0
    }
}

/// `k/α` (0 for a zero scale: every level is then 0).
fn inverse(k: f32, alpha: f32) -> f32 {
    if alpha > 0.0 { k / alpha } else { 0.0 }
}

/// Starting scales of the linear search, as fractions of the largest magnitude.
const GRID: [f32; 7] = [1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1];
/// The same with a scale above the largest magnitude, for few levels (at most
/// [`FEW_LEVELS`]), where a heavily weighted weight may be best on a low level.
const GRID_FEW_LEVELS: [f32; 8] = [1.5, 1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1];
/// See [`GRID_FEW_LEVELS`].
const FEW_LEVELS: f32 = 7.0;
/// Most alternating steps (levels at a scale, then the scale of those levels) after the
/// bracket search.
const ALTERNATIONS: u32 = 10;
/// Problems up to this size alternate while the error falls at all, and halve their
/// bracket [`SMALL_REFINE`] more times; larger ones stop alternating once a step gains
/// less than [`LARGE_GAIN`] of the error (a pass over them costs more, and their error
/// curve is smooth enough that the bracket search has done the work).
const SMALL: usize = 1 << 16;
/// See [`SMALL`].
const LARGE_GAIN: f64 = 1e-3;
/// See [`SMALL`].
const SMALL_REFINE: u32 = 4;

/// The best scale of one problem so far, its gain and moments, and the bracket around it.
#[derive(Debug, Clone, Copy)]
struct Best {
    lo: f32,
    alpha: f32,
    hi: f32,
    gain: f64,
    moments: [f64; 2],
}

/// `bits`-bit linear levels (`k` positive ones): per problem, evaluates the scales of
/// [`GRID`], then `refine` times halves the bracket around the best, then alternates (the
/// nearest levels, ties to even, at the best assignment's own optimal scale) while that
/// lowers the error; writes the last assignment to `levels` and returns `(α⁺, α⁻)`, each
/// the optimal scale of the levels written.
///
/// Every step keeps the best scale seen, so the result is at least as good as the best
/// grid point's, and an alternating step never increases the error.
pub(super) fn linear(
    w: &[f32],
    d: &[f32],
    k: i32,
    split_sign: bool,
    refine: u32,
    levels: &mut [i8],
) -> (f32, f32) {
    let kf = k as f32;
    let (scales, alphas): (Vec<f32>, Vec<f32>) = with_problems(w, d, split_sign, |problems| {
        problems.iter().map(|h| linear_scale(h, kf, refine)).unzip()
    });
    let [sp, sn] = per_sign(&scales);
    kernel::linear_levels(w, [inverse(kf, sp), inverse(kf, sn)], kf, levels);
    let [p, n] = per_sign(&alphas);
    (p, n)
}

/// One problem's best assignment (see [`linear`]) as `(scale, α)`: its levels are the
/// nearest at `scale`, and `α` is their optimal scale.
fn linear_scale(h: &Half, k: f32, refine: u32) -> (f32, f32) {
    let extent = h.extent;
    if extent.max == 0.0 {
        return (0.0, 0.0);
    }
    let small = h.a.len() <= SMALL;
    let fractions: &[f32] = if k <= FEW_LEVELS {
        &GRID_FEW_LEVELS
    } else {
        &GRID
    };
    let grid: Vec<[f64; 2]> = if k <= FEW_LEVELS {
        kernel::moments(h, &GRID_FEW_LEVELS.map(|f| inverse(k, extent.max * f)), k).to_vec()
    } else {
        kernel::moments(h, &GRID.map(|f| inverse(k, extent.max * f)), k).to_vec()
    };
    let mut best = Best {
        lo: 0.0,
        alpha: 0.0,
        hi: 0.0,
        gain: f64::NEG_INFINITY,
        moments: [0.0; 2],
    };
    for (c, m) in grid.iter().enumerate() {
        let v = gain(m[0], m[1]);
        if v > best.gain {
            let at = |c: usize| extent.max * fractions[c];
            best = Best {
                lo: if c + 1 < fractions.len() {
                    at(c + 1)
                } else {
                    0.0
                },
                alpha: at(c),
                hi: if c > 0 { at(c - 1) } else { at(c) * 1.2 },
                gain: v,
                moments: *m,
            };
        }
    }
    let refine = if small { refine + SMALL_REFINE } else { refine };
    for _ in 0..refine {
        let (below, above) = ((best.lo + best.alpha) / 2.0, (best.alpha + best.hi) / 2.0);
        let [ml, mu] = kernel::moments(h, &[inverse(k, below), inverse(k, above)], k);
        let (gl, gu) = (gain(ml[0], ml[1]), gain(mu[0], mu[1]));
        best = if gl > best.gain && gl >= gu {
            Best {
                lo: best.lo,
                alpha: below,
                hi: best.alpha,
                gain: gl,
                moments: ml,
            }
        } else if gu > best.gain {
            Best {
                lo: best.alpha,
                alpha: above,
                hi: best.hi,
                gain: gu,
                moments: mu,
            }
        } else {
            Best {
                lo: below,
                hi: above,
                ..best
            }
        };
    }
    // Alternate from the best assignment while the error (`Σ d·a² − gain`) falls: the
    // levels are the nearest at `level_scale`, their moments `moments`.
    let tolerance = if small { 0.0 } else { LARGE_GAIN };
    let (mut level_scale, mut moments) = (best.alpha, best.moments);
    for _ in 0..ALTERNATIONS {
        let next = optimal_scale(moments, k);
        if next <= 0.0 {
            break;
        }
        let [m] = kernel::moments(h, &[inverse(k, next)], k);
        let v = gain(m[0], m[1]);
        // (`gain` is never NaN.)
        if v <= best.gain {
            break;
        }
        let (before, after) = (extent.energy - best.gain, extent.energy - v);
        (level_scale, moments, best.gain) = (next, m, v);
        if after >= before * (1.0 - tolerance) {
            break;
        }
    }
    (level_scale, optimal_scale(moments, k))
}

/// Thresholds of the ternary search's first pass, as fractions of the largest magnitude.
const FIRST_THRESHOLDS: [f32; 7] = [0.0, 0.04, 0.08, 0.13, 0.2, 0.3, 0.45];
/// Thresholds of the second pass (and most of any pass).
const THRESHOLDS: usize = 6;
/// Thresholds of a pass once few magnitudes remain (under [`FEW`]).
const FEW_THRESHOLDS: usize = 4;
/// See [`FEW_THRESHOLDS`].
const FEW: f64 = 8.0 * GATHER;
/// Magnitudes sorted at the end: the search stops narrowing once no more than these
/// remain in the intervals that may hold the optimum.
const GATHER: f64 = 8192.0;
/// Relative precision of the gains (their sums are `f32` within blocks): intervals whose
/// bound is within it of the best gain may hold the optimum.
const TOLERANCE: f64 = 1e-7;
/// Narrowing passes before the search sorts whatever remains.
const MAX_PASSES: usize = 6;

/// A threshold and the sums over the magnitudes above it: support `{a > t}`.
#[derive(Debug, Clone, Copy)]
struct Point {
    t: f32,
    s: f64,
    d: f64,
    n: f64,
}

/// Where a problem's optimal support ends: every magnitude above `t`, and of magnitude
/// exactly `tie.0` those at position `tie.1` of the problem or before.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SupportEnd {
    t: f32,
    tie: Option<(f32, usize)>,
}

/// Ternary levels, globally optimal: the best support is a prefix of the magnitudes
/// ordered by size (then position), and its gain is `(Σ d·a)² / Σ d`. Each pass gives the
/// gain at several thresholds at once; between two evaluated thresholds no prefix beats
/// [`interval_bound`], so only intervals whose bound beats the best gain are narrowed, and
/// once they hold at most [`GATHER`] magnitudes those are sorted and every prefix through
/// them is scanned. Writes `levels` and returns `(α⁺, α⁻)`; `None` when a magnitude is not
/// finite (the caller then sorts everything).
pub(super) fn ternary(
    w: &[f32],
    d: &[f32],
    split_sign: bool,
    levels: &mut [i8],
) -> Option<(f32, f32)> {
    if u32::try_from(w.len()).is_err() {
        // Positions are sorted as 32-bit keys.
        return None;
    }
    let solved: Option<Vec<(SupportEnd, f32)>> = with_problems(w, d, split_sign, |problems| {
        problems.iter().map(ternary_support).collect()
    });
    let (ends, alphas): (Vec<SupportEnd>, Vec<f32>) = solved?.into_iter().unzip();
    let problems = if split_sign { 2 } else { 1 };
    // Everything above each threshold, then the tied weights the support ends in.
    let thr: Vec<f32> = ends
        .iter()
        .zip(&alphas)
        .map(|(e, &a)| if a > 0.0 { e.t } else { f32::INFINITY })
        .collect();
    kernel::ternary_levels(w, per_sign(&thr), levels);
    for (p, (end, &alpha)) in ends.iter().zip(&alphas).enumerate() {
        let Some((v, last)) = end.tie.filter(|_| alpha > 0.0) else {
            continue;
        };
        // Positions count the weights of this problem, in tensor order.
        let mut position = 0;
        for (&w, l) in w.iter().zip(levels.iter_mut()) {
            if problems == 2 && usize::from(w.is_sign_negative()) != p {
                continue;
            }
            if position > last {
                break;
            }
            if w.abs() == v {
                *l = if w.is_sign_negative() { -1 } else { 1 };
            }
            position += 1;
        }
    }
    let [p, n] = per_sign(&alphas);
    Some((p, n))
}

/// The optimal support of one problem and its scale `Σ d·a / Σ d`.
fn ternary_support(h: &Half) -> Option<(SupportEnd, f32)> {
    let extent = h.extent;
    if !extent.max.is_finite() {
        return None;
    }
    // Above the largest magnitude nothing.
    let mut points = vec![Point {
        t: extent.max,
        s: 0.0,
        d: 0.0,
        n: 0.0,
    }];
    let mut thresholds: Vec<f32> = FIRST_THRESHOLDS.iter().map(|&f| extent.max * f).collect();
    let mut survivors = Vec::new();
    let mut previous_gain = f64::NEG_INFINITY;
    for pass in 0..=MAX_PASSES {
        evaluate(h, &thresholds, &mut points);
        let (best_gain, best) = points
            .iter()
            .map(|p| (gain(p.s, p.d), *p))
            .fold((0.0, points[0]), |b, x| if x.0 > b.0 { x } else { b });
        survivors = points
            .windows(2)
            .map(|pair| (pair[0], pair[1]))
            .filter(|&(hi, lo)| {
                lo.n > hi.n && interval_bound(hi, lo) > best_gain * (1.0 - TOLERANCE)
            })
            .collect::<Vec<_>>();
        let count = |s: &[(Point, Point)]| s.iter().map(|(hi, lo)| lo.n - hi.n).sum::<f64>();
        let improved = best_gain > previous_gain * (1.0 + TOLERANCE);
        if count(&survivors) > GATHER && !improved {
            // The gains around the optimum no longer differ by more than the sums'
            // rounding: narrow on beside the best threshold only.
            survivors.retain(|(hi, lo)| hi.t == best.t || lo.t == best.t);
        }
        previous_gain = best_gain;
        let remaining = count(&survivors);
        if remaining <= GATHER || pass == MAX_PASSES {
            break;
        }
        let budget = if remaining < FEW {
            FEW_THRESHOLDS
        } else {
            THRESHOLDS
        };
        thresholds = propose(&survivors, &points, budget);
        if thresholds.is_empty() {
            break;
        }
    }
    // Sort what remains and scan every prefix through it.
    let (mut best_gain, mut best_end, mut best_sums) = (
        0.0,
        SupportEnd {
            t: extent.max,
            tie: None,
        },
        [0.0; 2],
    );
    for p in &points {
        let v = gain(p.s, p.d);
        if v > best_gain {
            (best_gain, best_end, best_sums) = (v, SupportEnd { t: p.t, tie: None }, [p.s, p.d]);
        }
    }
    let bottom = survivors
        .iter()
        .map(|(_, lo)| lo.t)
        .fold(f32::INFINITY, f32::min);
    let top = survivors
        .iter()
        .map(|(hi, _)| hi.t)
        .fold(f32::NEG_INFINITY, f32::max);
    let near: Vec<usize> = if survivors.is_empty() {
        Vec::new()
    } else {
        kernel::between(&h.a, bottom, top)
    };
    // By magnitude, largest first, then by position: magnitudes are non-negative finite
    // floats, whose bits order as they do, so one integer key sorts both.
    let mut keys: Vec<u64> = near
        .iter()
        .map(|&i| u64::from(!h.a[i].to_bits()) << 32 | i as u64)
        .collect();
    keys.sort_unstable();
    let near: Vec<usize> = keys.iter().map(|&k| (k & 0xffff_ffff) as usize).collect();
    for &(hi, lo) in &survivors {
        let (mut s, mut dsum) = (hi.s, hi.d);
        let inside: Vec<usize> = near
            .iter()
            .copied()
            .filter(|&i| h.a[i] <= hi.t && h.a[i] > lo.t)
            .collect();
        for (j, &i) in inside.iter().enumerate() {
            s += f64::from(h.d[i]) * f64::from(h.a[i]);
            dsum += f64::from(h.d[i]);
            let v = gain(s, dsum);
            if v > best_gain {
                let a = h.a[i];
                // A prefix that ends inside a group of equal magnitudes needs the position;
                // one that ends with its group is every magnitude ≥ a, i.e. above the next
                // float below a.
                let mid_group = inside.get(j + 1).is_some_and(|&n| h.a[n] == a);
                best_end = if mid_group {
                    SupportEnd {
                        t: a,
                        tie: Some((a, i)),
                    }
                } else {
                    SupportEnd {
                        t: f32::from_bits(a.to_bits() - 1),
                        tie: None,
                    }
                };
                best_gain = v;
                best_sums = [s, dsum];
            }
        }
    }
    let alpha = if best_sums[0] > 0.0 && best_sums[1] > 0.0 {
        (best_sums[0] / best_sums[1]) as f32
    } else {
        0.0
    };
    Some((best_end, alpha))
}

/// The largest gain of any support that holds everything above `hi.t` and the top part
/// (by magnitude) of the magnitudes in `(lo.t, hi.t]`.
///
/// Those hold `ΔS = lo.s − hi.s` over `ΔD = lo.d − hi.d`, each magnitude in
/// `(lo.t, hi.t]`, so a top part of weight `y` holds at most `u(y) = min(hi.t·y,
/// ΔS − lo.t·(ΔD − y))`. On each of the two linear pieces of `u`, `(hi.s + u)² / (hi.d + y)`
/// is quasi-convex in `y`, so the bound is its largest value at the ends of the pieces.
fn interval_bound(hi: Point, lo: Point) -> f64 {
    let (ds, dd) = (lo.s - hi.s, lo.d - hi.d);
    let (th, tl) = (f64::from(hi.t), f64::from(lo.t));
    let at = |y: f64| gain(hi.s + (th * y).min(ds - tl * (dd - y)), hi.d + y);
    let mut bound = at(0.0).max(gain(lo.s, lo.d));
    if th > tl {
        let knee = (ds - tl * dd) / (th - tl);
        if knee > 0.0 && knee < dd {
            bound = bound.max(at(knee));
        }
    }
    bound
}

/// Adds the sums above every threshold to `points`, kept in decreasing order of
/// threshold (one pass per eight).
fn evaluate(h: &Half, thresholds: &[f32], points: &mut Vec<Point>) {
    /// The sums of a chunk of up to eight thresholds, in one pass.
    fn sums(h: &Half, t: &[f32]) -> Vec<[f64; 3]> {
        macro_rules! exactly {
            ($($n:literal)*) => {
                match t.len() {
                    $($n => kernel::support::<$n>(h, t.try_into().expect("length checked")).to_vec(),)*
                    _ => unreachable!("chunks of at most eight"),
                }
            };
        }
        exactly!(1 2 3 4 5 6 7 8)
    }
    for chunk in thresholds.chunks(8) {
        for (&t, [s, d, n]) in chunk.iter().zip(sums(h, chunk)) {
            points.push(Point { t, s, d, n });
        }
    }
    points.sort_by(|a, b| b.t.total_cmp(&a.t));
    points.dedup_by(|a, b| a.t == b.t);
}

/// The next pass's thresholds, at most `budget`: half of them at and around the fixed
/// point of the support (the threshold equal to half the support's scale, where a
/// weight's best level changes: near it lies the optimum), estimated from the evaluated
/// thresholds by interpolating `S/(2D) − t` between the two where it changes sign; the
/// rest spread over the intervals that may hold the optimum by the magnitudes they hold.
fn propose(intervals: &[(Point, Point)], points: &[Point], budget: usize) -> Vec<f32> {
    let inside = |t: f32| intervals.iter().any(|(hi, lo)| t > lo.t && t < hi.t);
    let mut out = Vec::with_capacity(budget);
    // Points run from the largest threshold down; `S/(2D) − t` rises as `t` falls.
    let excess = |p: &Point| (p.d > 0.0).then(|| p.s / p.d / 2.0 - f64::from(p.t));
    let bracket = points.windows(2).find_map(|pair| {
        let (hi, lo) = (pair[0], pair[1]);
        match (excess(&hi), excess(&lo)) {
            (Some(eh), Some(el)) if eh <= 0.0 && el > 0.0 => Some((hi, lo, eh, el)),
            (None, Some(el)) if el > 0.0 => Some((hi, lo, -f64::from(hi.t), el)),
            _ => None,
        }
    });
    if let Some((hi, lo, eh, el)) = bracket {
        let (th, tl) = (f64::from(hi.t), f64::from(lo.t));
        let root = tl + el * (th - tl) / (el - eh);
        let width = th - tl;
        let near = [0.0, -0.03, 0.03, -0.12, 0.12, -0.3, 0.3];
        for o in near.iter().take(budget / 2 + 1) {
            let t = (root + o * width) as f32;
            if inside(t) && out.len() < budget && !out.contains(&t) {
                out.push(t);
            }
        }
    }
    let total: f64 = intervals.iter().map(|(hi, lo)| lo.n - hi.n).sum();
    for &(hi, lo) in intervals {
        let free = budget - out.len();
        let share = ((lo.n - hi.n) / total * free as f64).ceil() as usize;
        for j in 1..=share.min(free) {
            let t = lo.t + (hi.t - lo.t) * j as f32 / (share + 1) as f32;
            if t > lo.t && t < hi.t && out.len() < budget {
                out.push(t);
            }
        }
    }
    out
}
