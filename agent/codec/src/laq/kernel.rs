//! The passes of the loss-aware quantizer's solvers: splitting a tensor by sign, the
//! moments of a scale's nearest-level assignment, the sums above a threshold, and writing
//! levels.
//!
//! Every pass is defined by one scalar formulation ([`portable`]) over eight lanes: element
//! `i` of a block of [`BLOCK`] goes to lane `i mod 8`, each lane sums in `f32` within the
//! block (with fused multiply-adds where a product is summed), and a block's lanes are
//! added in lane order into `f64` totals. The AVX2 version ([`avx2`], chosen at run time
//! where the CPU has AVX2 and FMA) performs the same operations in the same order on four
//! vectors of eight lanes at once, so both give the same bits (tested): a tensor quantizes identically on
//! every machine.

/// Lanes of a vector.
pub(super) const LANES: usize = 8;
/// Lanes of every sum: four vectors' worth, so that four independent chains of additions
/// keep the adder busy (one chain would wait on each addition's latency).
pub(super) const SUMS: usize = 4 * LANES;
/// Elements summed in `f32` before a lane's sum moves into `f64` (128 per lane).
pub(super) const BLOCK: usize = 4096;
/// `x + SHIFT − SHIFT` rounds `0 ≤ x < 2^22` to the nearest integer, ties to even.
const SHIFT: f32 = 8_388_608.0;

/// The level of `x = min(|w|·k/α, k)`: nearest integer, ties to even.
#[inline(always)]
fn round_level(x: f32) -> f32 {
    (x + SHIFT) - SHIFT
}

/// `min` as the AVX2 instruction defines it: the second operand when either is NaN.
#[inline(always)]
fn min_ps(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

/// `max` as the AVX2 instruction defines it: the second operand when either is NaN.
#[inline(always)]
fn max_ps(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// The weights of one sign as magnitudes, in their order, with their curvature and
/// their [`Extent`].
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Half {
    /// `|w|`.
    pub a: Vec<f32>,
    /// `d` of the same weights.
    pub d: Vec<f32>,
    /// Largest magnitude and `Σ d·a²`.
    pub extent: Extent,
}

impl Default for Half {
    fn default() -> Self {
        Self {
            a: Vec::new(),
            d: Vec::new(),
            extent: Extent {
                max: 0.0,
                energy: 0.0,
            },
        }
    }
}

/// A half's largest magnitude (0 when empty) and the error of quantizing it all to 0,
/// `Σ d·a²`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Extent {
    /// Largest magnitude.
    pub max: f32,
    /// `Σ d·a²`.
    pub energy: f64,
}

/// The scalar formulation every pass is defined by.
pub(super) mod portable {
    use super::*;

    /// Splits `(w, d)` into the positive and the negative weights (a negative zero counts
    /// as negative), each as magnitudes in their order, into `halves` (whose buffers are
    /// reused), with each half's [`Extent`]: its sums run over eight lanes by tensor
    /// position (`i mod 8` within blocks of [`BLOCK`]), each lane summing only the
    /// weights of its half.
    pub fn split(w: &[f32], d: &[f32], halves: &mut [Half; 2]) {
        for h in halves.iter_mut() {
            h.a.clear();
            h.d.clear();
        }
        let mut max = [[0f32; LANES]; 2];
        let mut energy = [0f64; 2];
        for (wb, db) in w.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            let mut acc = [[0f32; LANES]; 2];
            for (i, (&w, &d)) in wb.iter().zip(db).enumerate() {
                let j = i % LANES;
                let (a, negative) = (w.abs(), w.is_sign_negative());
                let h = usize::from(negative);
                halves[h].a.push(a);
                halves[h].d.push(d);
                max[0][j] = max_ps(max[0][j], if negative { 0.0 } else { a });
                max[1][j] = max_ps(max[1][j], if negative { a } else { 0.0 });
                acc[h][j] = (d * a).mul_add(a, acc[h][j]);
            }
            for (e, lanes) in energy.iter_mut().zip(&acc) {
                *e += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
            }
        }
        for (h, half) in halves.iter_mut().enumerate() {
            half.extent = Extent {
                max: max[h].iter().fold(0f32, |m, &v| max_ps(m, v)),
                energy: energy[h],
            };
        }
    }

    /// [`Extent`] of a half.
    pub fn extent(a: &[f32], d: &[f32]) -> Extent {
        let mut max = [0f32; SUMS];
        let mut energy = [0f64; 1];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            let mut acc = [[0f32; SUMS]; 1];
            for (i, (&a, &d)) in ab.iter().zip(db).enumerate() {
                let j = i % SUMS;
                max[j] = max_ps(max[j], a);
                acc[0][j] = (d * a).mul_add(a, acc[0][j]);
            }
            add_lanes(&mut energy, &acc);
        }
        Extent {
            max: max.iter().fold(0f32, |m, &v| max_ps(m, v)),
            energy: energy[0],
        }
    }

    /// `[Σ d·a·l, Σ d·l²]` of each scale `inv[c] = k/α` over a half, `l` the nearest level
    /// of `min(a·k/α, k)`.
    pub fn moments<const C: usize>(a: &[f32], d: &[f32], inv: &[f32; C], k: f32) -> [[f64; 2]; C] {
        let mut out = [[0f64; 2]; C];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            for c in 0..C {
                let mut acc = [[0f32; SUMS]; 2];
                for (i, (&a, &d)) in ab.iter().zip(db).enumerate() {
                    let j = i % SUMS;
                    let l = round_level(min_ps(a * inv[c], k));
                    let dl = d * l;
                    acc[0][j] = dl.mul_add(a, acc[0][j]);
                    acc[1][j] = dl.mul_add(l, acc[1][j]);
                }
                add_lanes(&mut out[c], &acc);
            }
        }
        out
    }

    /// `[Σ d·a, Σ d, count]` of each threshold over a half's magnitudes above it.
    pub fn support<const C: usize>(a: &[f32], d: &[f32], thr: &[f32; C]) -> [[f64; 3]; C] {
        let mut out = [[0f64; 3]; C];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            for c in 0..C {
                let mut acc = [[0f32; SUMS]; 2];
                let mut count = 0u32;
                for (i, (&a, &d)) in ab.iter().zip(db).enumerate() {
                    let j = i % SUMS;
                    if a > thr[c] {
                        acc[0][j] += d * a;
                        acc[1][j] += d;
                        count += 1;
                    }
                }
                let mut sums = [out[c][0], out[c][1]];
                add_lanes(&mut sums, &acc);
                out[c] = [sums[0], sums[1], out[c][2] + f64::from(count)];
            }
        }
        out
    }

    /// Each weight's signed level at the scale of its sign (`inv = [k/α⁺, k/α⁻]`).
    pub fn linear_levels(w: &[f32], inv: [f32; 2], k: f32, levels: &mut [i8]) {
        for (&w, l) in w.iter().zip(levels.iter_mut()) {
            let negative = w.is_sign_negative();
            let s = if negative { inv[1] } else { inv[0] };
            let level = round_level(min_ps(w.abs() * s, k)) as i8;
            *l = if negative { -level } else { level };
        }
    }

    /// Ternary levels: `±1` for the weights whose magnitude exceeds the threshold of their
    /// sign (`thr = [t⁺, t⁻]`), 0 for the others.
    pub fn ternary_levels(w: &[f32], thr: [f32; 2], levels: &mut [i8]) {
        for (&w, l) in w.iter().zip(levels.iter_mut()) {
            let negative = w.is_sign_negative();
            let t = if negative { thr[1] } else { thr[0] };
            *l = if w.abs() > t {
                if negative { -1 } else { 1 }
            } else {
                0
            };
        }
    }

    /// Positions of the magnitudes with `lo < a ≤ hi`, in order.
    pub fn between(a: &[f32], lo: f32, hi: f32) -> Vec<usize> {
        (0..a.len()).filter(|&i| a[i] > lo && a[i] <= hi).collect()
    }

    /// Adds a block's lanes to the `f64` totals: lane `j` into partial sum `j mod 4` in
    /// lane order, then `(p0 + p1) + (p2 + p3)` (four chains, so the additions overlap).
    pub(in super::super) fn add_lanes<const N: usize>(out: &mut [f64; N], acc: &[[f32; SUMS]; N]) {
        for (o, lanes) in out.iter_mut().zip(acc) {
            let mut partial = [0f64; 4];
            for quad in lanes.chunks_exact(4) {
                for (p, &v) in partial.iter_mut().zip(quad) {
                    *p += f64::from(v);
                }
            }
            *o += (partial[0] + partial[1]) + (partial[2] + partial[3]);
        }
    }
}

/// The same passes with AVX2 and FMA, eight lanes at once.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the AVX2 passes (checked once).
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: [__m256; 4]) -> [f32; SUMS] {
        let mut out = [0f32; SUMS];
        for (q, v) in v.into_iter().enumerate() {
            // SAFETY: `out[8q..]` holds eight f32; the store is unaligned.
            unsafe { _mm256_storeu_ps(out[q * LANES..].as_mut_ptr(), v) };
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load_sums(v: &[f32; SUMS]) -> [__m256; 4] {
        std::array::from_fn(|q| load(&v[q * LANES..]))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(v: &[f32]) -> __m256 {
        assert!(v.len() >= LANES);
        // SAFETY: `v` holds at least eight f32; the load is unaligned.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// For each 8-bit lane mask, the lane indices that move the selected lanes to the
    /// front, in order (the rest follow in any order).
    const COMPACT: [[i32; LANES]; 256] = {
        let mut table = [[0i32; LANES]; 256];
        let mut mask = 0;
        while mask < 256 {
            let mut next = 0;
            let mut lane = 0;
            while lane < LANES {
                if mask >> lane & 1 == 1 {
                    table[mask][next] = lane as i32;
                    next += 1;
                }
                lane += 1;
            }
            mask += 1;
        }
        table
    };

    /// See [`portable::split`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn split(w: &[f32], d: &[f32], halves: &mut [Half; 2]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let zero = _mm256_setzero_ps();
        for h in halves.iter_mut() {
            h.a.clear();
            h.d.clear();
            // Room for a whole vector past the last element written.
            h.a.reserve(w.len() + LANES);
            h.d.reserve(w.len() + LANES);
        }
        let mut count = [0usize; 2];
        let (mut max_pos, mut max_neg) = (zero, zero);
        let mut energy = [0f64; 2];
        let mut tail = Vec::new();
        {
            let [pos, neg] = &mut *halves;
            let out = [
                [pos.a.as_mut_ptr(), pos.d.as_mut_ptr()],
                [neg.a.as_mut_ptr(), neg.d.as_mut_ptr()],
            ];
            for (wb, db) in w.chunks(BLOCK).zip(d.chunks(BLOCK)) {
                let body = wb.len() / LANES * LANES;
                let (mut ep, mut en) = (zero, zero);
                for (wc, dc) in wb[..body]
                    .chunks_exact(LANES)
                    .zip(db[..body].chunks_exact(LANES))
                {
                    let (wv, dv) = (load(wc), load(dc));
                    let a = _mm256_and_ps(wv, abs_mask);
                    // blendv picks its second operand where the sign bit of `wv` is set.
                    max_pos = _mm256_max_ps(max_pos, _mm256_blendv_ps(a, zero, wv));
                    max_neg = _mm256_max_ps(max_neg, _mm256_blendv_ps(zero, a, wv));
                    let e = _mm256_mul_ps(dv, a);
                    ep = _mm256_blendv_ps(_mm256_fmadd_ps(e, a, ep), ep, wv);
                    en = _mm256_blendv_ps(en, _mm256_fmadd_ps(e, a, en), wv);
                    let negative = _mm256_movemask_ps(wv) as usize;
                    for (h, mask) in [(0, !negative & 0xff), (1, negative)] {
                        // SAFETY: the table row holds eight i32; the load is unaligned.
                        let idx = unsafe { _mm256_loadu_si256(COMPACT[mask].as_ptr().cast()) };
                        // SAFETY: `count[h]` is at most the elements read so far, so eight
                        // floats from it are within the capacity reserved above; the stores
                        // are unaligned. Only the first `count` elements are kept, all
                        // written.
                        unsafe {
                            _mm256_storeu_ps(
                                out[h][0].add(count[h]),
                                _mm256_permutevar8x32_ps(a, idx),
                            );
                            _mm256_storeu_ps(
                                out[h][1].add(count[h]),
                                _mm256_permutevar8x32_ps(dv, idx),
                            );
                        }
                        count[h] += mask.count_ones() as usize;
                    }
                }
                let mut acc = [lanes8(ep), lanes8(en)];
                if body < wb.len() {
                    // Only the last block is ragged.
                    let (mut mp, mut mn) = (lanes8(max_pos), lanes8(max_neg));
                    for (j, (&w, &d)) in wb[body..].iter().zip(&db[body..]).enumerate() {
                        let (a, negative) = (w.abs(), w.is_sign_negative());
                        mp[j] = max_ps(mp[j], if negative { 0.0 } else { a });
                        mn[j] = max_ps(mn[j], if negative { a } else { 0.0 });
                        let h = usize::from(negative);
                        acc[h][j] = (d * a).mul_add(a, acc[h][j]);
                        tail.push((a, d, h));
                    }
                    (max_pos, max_neg) = (load(&mp), load(&mn));
                }
                for (e, lanes) in energy.iter_mut().zip(&acc) {
                    *e += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
                }
            }
            for (half, n) in [(&mut *pos, count[0]), (&mut *neg, count[1])] {
                // SAFETY: the first `n` elements were written above.
                unsafe {
                    half.a.set_len(n);
                    half.d.set_len(n);
                }
            }
        }
        for (a, d, h) in tail {
            halves[h].a.push(a);
            halves[h].d.push(d);
        }
        for (half, (max, energy)) in halves
            .iter_mut()
            .zip([(max_pos, energy[0]), (max_neg, energy[1])])
        {
            half.extent = Extent {
                max: lanes8(max).iter().fold(0f32, |m, &v| max_ps(m, v)),
                energy,
            };
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes8(v: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` holds eight f32; the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// See [`portable::extent`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn extent(a: &[f32], d: &[f32]) -> Extent {
        let zero = _mm256_setzero_ps();
        let mut max = [zero; 4];
        let mut energy = [0f64; 1];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            let body = ab.len() / SUMS * SUMS;
            let mut e = [zero; 4];
            for (ac, dc) in ab[..body]
                .chunks_exact(SUMS)
                .zip(db[..body].chunks_exact(SUMS))
            {
                for q in 0..4 {
                    let (av, dv) = (load(&ac[q * LANES..]), load(&dc[q * LANES..]));
                    max[q] = _mm256_max_ps(max[q], av);
                    e[q] = _mm256_fmadd_ps(_mm256_mul_ps(dv, av), av, e[q]);
                }
            }
            let mut acc = [lanes(e)];
            if body < ab.len() {
                let mut m = lanes(max);
                for (j, (&a, &d)) in ab[body..].iter().zip(&db[body..]).enumerate() {
                    m[j] = max_ps(m[j], a);
                    acc[0][j] = (d * a).mul_add(a, acc[0][j]);
                }
                max = load_sums(&m);
            }
            portable::add_lanes(&mut energy, &acc);
        }
        Extent {
            max: lanes(max).iter().fold(0f32, |m, &v| max_ps(m, v)),
            energy: energy[0],
        }
    }

    /// See [`portable::moments`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn moments<const C: usize>(
        a: &[f32],
        d: &[f32],
        inv: &[f32; C],
        k: f32,
    ) -> [[f64; 2]; C] {
        let zero = _mm256_setzero_ps();
        let shift = _mm256_set1_ps(SHIFT);
        let kv = _mm256_set1_ps(k);
        let mut out = [[0f64; 2]; C];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            let body = ab.len() / SUMS * SUMS;
            for c in 0..C {
                let s = _mm256_set1_ps(inv[c]);
                let (mut num, mut den) = ([zero; 4], [zero; 4]);
                for (ac, dc) in ab[..body]
                    .chunks_exact(SUMS)
                    .zip(db[..body].chunks_exact(SUMS))
                {
                    for q in 0..4 {
                        let (av, dv) = (load(&ac[q * LANES..]), load(&dc[q * LANES..]));
                        let x = _mm256_min_ps(_mm256_mul_ps(av, s), kv);
                        let l = _mm256_sub_ps(_mm256_add_ps(x, shift), shift);
                        let dl = _mm256_mul_ps(dv, l);
                        num[q] = _mm256_fmadd_ps(dl, av, num[q]);
                        den[q] = _mm256_fmadd_ps(dl, l, den[q]);
                    }
                }
                let mut acc = [lanes(num), lanes(den)];
                for (j, (&a, &d)) in ab[body..].iter().zip(&db[body..]).enumerate() {
                    let l = round_level(min_ps(a * inv[c], k));
                    let dl = d * l;
                    acc[0][j] = dl.mul_add(a, acc[0][j]);
                    acc[1][j] = dl.mul_add(l, acc[1][j]);
                }
                portable::add_lanes(&mut out[c], &acc);
            }
        }
        out
    }

    /// See [`portable::support`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn support<const C: usize>(a: &[f32], d: &[f32], thr: &[f32; C]) -> [[f64; 3]; C] {
        let zero = _mm256_setzero_ps();
        let mut out = [[0f64; 3]; C];
        for (ab, db) in a.chunks(BLOCK).zip(d.chunks(BLOCK)) {
            let body = ab.len() / SUMS * SUMS;
            for c in 0..C {
                let t = _mm256_set1_ps(thr[c]);
                let (mut s, mut dd) = ([zero; 4], [zero; 4]);
                // Lanes count down by one (an all-ones mask is -1) for each magnitude above.
                let mut n = _mm256_setzero_si256();
                for (ac, dc) in ab[..body]
                    .chunks_exact(SUMS)
                    .zip(db[..body].chunks_exact(SUMS))
                {
                    for q in 0..4 {
                        let (av, dv) = (load(&ac[q * LANES..]), load(&dc[q * LANES..]));
                        let inside = _mm256_cmp_ps::<_CMP_GT_OQ>(av, t);
                        s[q] = _mm256_add_ps(s[q], _mm256_and_ps(_mm256_mul_ps(dv, av), inside));
                        dd[q] = _mm256_add_ps(dd[q], _mm256_and_ps(dv, inside));
                        n = _mm256_add_epi32(n, _mm256_castps_si256(inside));
                    }
                }
                let mut acc = [lanes(s), lanes(dd)];
                let mut lanes_n = [0i32; LANES];
                // SAFETY: `lanes_n` holds eight i32; the store is unaligned.
                unsafe { _mm256_storeu_si256(lanes_n.as_mut_ptr().cast(), n) };
                let mut count = lanes_n.iter().map(|&v| v.unsigned_abs()).sum::<u32>();
                for (j, (&a, &d)) in ab[body..].iter().zip(&db[body..]).enumerate() {
                    if a > thr[c] {
                        acc[0][j] += d * a;
                        acc[1][j] += d;
                        count += 1;
                    }
                }
                let mut sums = [out[c][0], out[c][1]];
                portable::add_lanes(&mut sums, &acc);
                out[c] = [sums[0], sums[1], out[c][2] + f64::from(count)];
            }
        }
        out
    }

    /// See [`portable::linear_levels`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn linear_levels(w: &[f32], inv: [f32; 2], k: f32, levels: &mut [i8]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let shift = _mm256_set1_ps(SHIFT);
        let kv = _mm256_set1_ps(k);
        let (sp, sn) = (_mm256_set1_ps(inv[0]), _mm256_set1_ps(inv[1]));
        let body = w.len() / SUMS * SUMS;
        for (wc, lc) in w[..body]
            .chunks_exact(SUMS)
            .zip(levels[..body].chunks_exact_mut(SUMS))
        {
            let signed: [__m256i; 4] = std::array::from_fn(|q| {
                let wv = load(&wc[q * LANES..]);
                let a = _mm256_and_ps(wv, abs_mask);
                // blendv picks its second operand where the sign bit of `wv` is set.
                let s = _mm256_blendv_ps(sp, sn, wv);
                let x = _mm256_min_ps(_mm256_mul_ps(a, s), kv);
                let l = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(x, shift), shift));
                let sign = _mm256_srai_epi32(_mm256_castps_si256(wv), 31);
                _mm256_sub_epi32(_mm256_xor_si256(l, sign), sign)
            });
            store_levels(signed, lc);
        }
        portable::linear_levels(&w[body..], inv, k, &mut levels[body..]);
    }

    /// Writes four vectors of eight i32 in -127..=127 as 32 i8, in lane order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store_levels(v: [__m256i; 4], out: &mut [i8]) {
        assert!(out.len() >= SUMS);
        // Packing works within 128-bit halves: i16 [v0 0-3, v1 0-3 | v0 4-7, v1 4-7], then
        // i8 [v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, ...]; a permutation of 32-bit
        // groups restores the order.
        let p01 = _mm256_packs_epi32(v[0], v[1]);
        let p23 = _mm256_packs_epi32(v[2], v[3]);
        let packed = _mm256_packs_epi16(p01, p23);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let bytes = _mm256_permutevar8x32_epi32(packed, order);
        // SAFETY: `out` holds at least 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) };
    }

    /// See [`portable::ternary_levels`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ternary_levels(w: &[f32], thr: [f32; 2], levels: &mut [i8]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (tp, tn) = (_mm256_set1_ps(thr[0]), _mm256_set1_ps(thr[1]));
        let body = w.len() / SUMS * SUMS;
        for (wc, lc) in w[..body]
            .chunks_exact(SUMS)
            .zip(levels[..body].chunks_exact_mut(SUMS))
        {
            let level: [__m256i; 4] = std::array::from_fn(|q| {
                let wv = load(&wc[q * LANES..]);
                let a = _mm256_and_ps(wv, abs_mask);
                let t = _mm256_blendv_ps(tp, tn, wv);
                // 1 inside, 0 outside (the mask is -1 inside), then the weight's sign.
                let inside = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, t));
                let magnitude = _mm256_sub_epi32(_mm256_setzero_si256(), inside);
                let sign = _mm256_srai_epi32(_mm256_castps_si256(wv), 31);
                _mm256_sub_epi32(_mm256_xor_si256(magnitude, sign), sign)
            });
            store_levels(level, lc);
        }
        portable::ternary_levels(&w[body..], thr, &mut levels[body..]);
    }

    /// See [`portable::between`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA ([`available`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn between(a: &[f32], lo: f32, hi: f32) -> Vec<usize> {
        let (lov, hiv) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let body = a.len() / LANES * LANES;
        let mut out = Vec::new();
        for (v, ac) in a[..body].chunks_exact(LANES).enumerate() {
            let av = load(ac);
            let inside = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(av, lov),
                _mm256_cmp_ps::<_CMP_LE_OQ>(av, hiv),
            );
            let mut mask = _mm256_movemask_ps(inside) as u32;
            while mask != 0 {
                out.push(v * LANES + mask.trailing_zeros() as usize);
                mask &= mask - 1;
            }
        }
        out.extend(
            portable::between(&a[body..], lo, hi)
                .into_iter()
                .map(|i| body + i),
        );
        out
    }
}

/// Runs the AVX2 version of a pass where the CPU has it, the portable one otherwise.
macro_rules! dispatch {
    ($name:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { avx2::$name($($arg),*) };
        }
        portable::$name($($arg),*)
    }};
}

/// [`portable::split`], on AVX2 where the CPU has it.
pub(super) fn split(w: &[f32], d: &[f32], halves: &mut [Half; 2]) {
    dispatch!(split(w, d, halves))
}

/// [`portable::extent`], on AVX2 where the CPU has it.
pub(super) fn extent(a: &[f32], d: &[f32]) -> Extent {
    dispatch!(extent(a, d))
}

/// [`portable::moments`], on AVX2 where the CPU has it.
pub(super) fn moments<const C: usize>(h: &Half, inv: &[f32; C], k: f32) -> [[f64; 2]; C] {
    dispatch!(moments(&h.a, &h.d, inv, k))
}

/// [`portable::support`], on AVX2 where the CPU has it.
pub(super) fn support<const C: usize>(h: &Half, thr: &[f32; C]) -> [[f64; 3]; C] {
    dispatch!(support(&h.a, &h.d, thr))
}

/// [`portable::linear_levels`], on AVX2 where the CPU has it.
pub(super) fn linear_levels(w: &[f32], inv: [f32; 2], k: f32, levels: &mut [i8]) {
    dispatch!(linear_levels(w, inv, k, levels))
}

/// [`portable::ternary_levels`], on AVX2 where the CPU has it.
pub(super) fn ternary_levels(w: &[f32], thr: [f32; 2], levels: &mut [i8]) {
    dispatch!(ternary_levels(w, thr, levels))
}

/// [`portable::between`], on AVX2 where the CPU has it.
pub(super) fn between(a: &[f32], lo: f32, hi: f32) -> Vec<usize> {
    dispatch!(between(a, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => crate::test_strategies::uniform(-1.0, 1.0),
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => (-8i32..=8).prop_map(|h| h as f32 * 0.125),
        ]
    }

    fn tensor() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        // Lengths across block and lane boundaries.
        (0usize..2600).prop_flat_map(|n| {
            (
                proptest::collection::vec(value(), n),
                proptest::collection::vec(crate::test_strategies::uniform(1e-6, 2.0), n),
            )
        })
    }

    fn bits<const N: usize>(v: &[[f64; N]]) -> Vec<u64> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_avx2_passes_give_the_portable_bits(
            (w, d) in tensor(),
            scale in crate::test_strategies::uniform(0.01, 4.0),
            k in prop_oneof![Just(1.0f32), Just(3.0), Just(7.0), Just(127.0)],
        ) {
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                // SAFETY (every call below): the CPU supports AVX2 and FMA.
                let mut halves = [Half::default(), Half::default()];
                let mut plain = [Half { a: vec![5.0; 3], ..Half::default() }, Half::default()];
                unsafe { avx2::split(&w, &d, &mut halves) };
                portable::split(&w, &d, &mut plain);
                prop_assert_eq!(halves[0].a.len() + halves[1].a.len(), w.len());
                for (fast, plain) in halves.iter().zip(&plain) {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&fast.a), bits(&plain.a));
                    prop_assert_eq!(bits(&fast.d), bits(&plain.d));
                    prop_assert_eq!(fast.extent.max.to_bits(), plain.extent.max.to_bits());
                    prop_assert_eq!(fast.extent.energy.to_bits(), plain.extent.energy.to_bits());
                }
                for h in &halves {
                    let (fast, plain) = (unsafe { avx2::extent(&h.a, &h.d) }, portable::extent(&h.a, &h.d));
                    prop_assert_eq!(fast.max.to_bits(), plain.max.to_bits());
                    prop_assert_eq!(fast.energy.to_bits(), plain.energy.to_bits());
                    let inv = [k / scale, k / (scale * 0.7), 0.0];
                    let fast = unsafe { avx2::moments(&h.a, &h.d, &inv, k) };
                    prop_assert_eq!(bits(&fast), bits(&portable::moments(&h.a, &h.d, &inv, k)));
                    let thr = [scale * 0.1, 0.0, f32::INFINITY, scale];
                    let fast = unsafe { avx2::support(&h.a, &h.d, &thr) };
                    prop_assert_eq!(bits(&fast), bits(&portable::support(&h.a, &h.d, &thr)));
                    let fast = unsafe { avx2::between(&h.a, scale * 0.05, scale * 0.5) };
                    prop_assert_eq!(fast, portable::between(&h.a, scale * 0.05, scale * 0.5));
                }
                let (mut lf, mut lp) = (vec![9i8; w.len()], vec![9i8; w.len()]);
                let inv = [k / scale, k / (scale * 1.3)];
                unsafe { avx2::linear_levels(&w, inv, k, &mut lf) };
                portable::linear_levels(&w, inv, k, &mut lp);
                prop_assert_eq!(&lf, &lp);
                unsafe { avx2::ternary_levels(&w, [scale * 0.1, scale * 0.3], &mut lf) };
                portable::ternary_levels(&w, [scale * 0.1, scale * 0.3], &mut lp);
                prop_assert_eq!(&lf, &lp);
            }
            let _ = (w, d, scale, k);
        }
    }

    #[test]
    fn levels_are_nearest_ties_to_even_and_saturate() {
        let w = [0.5f32, 1.5, 2.5, -2.5, 0.49, 200.0, -200.0, -0.0, 0.0];
        let mut levels = [0i8; 9];
        portable::linear_levels(&w, [1.0, 1.0], 127.0, &mut levels);
        assert_eq!(levels, [0, 2, 2, -2, 0, 127, -127, 0, 0]);
        let mut halves = [Half::default(), Half::default()];
        portable::split(&w, &[1.0; 9], &mut halves);
        let [pos, neg] = halves;
        assert_eq!(pos.a, [0.5, 1.5, 2.5, 0.49, 200.0, 0.0]);
        assert_eq!(neg.a, [2.5, 200.0, 0.0]);
        let m = portable::moments(&pos.a, &pos.d, &[1.0], 127.0);
        // Σ d·a·l and Σ d·l² of the positive weights.
        assert_eq!(m[0][0], f64::from(1.5f32 * 2.0 + 2.5 * 2.0 + 200.0 * 127.0));
        assert_eq!(m[0][1], 4.0 + 4.0 + 127.0 * 127.0);
    }
}
