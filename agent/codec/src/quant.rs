//! Value quantizers for updates and gradients: fp32, fp16, bf16, unbiased stochastic m-bit
//! with buckets (QSGD-style, optional c·σ clipping), TernGrad and scaled sign.
//!
//! Each quantizer turns an `f32` slice into a [`Quantized`] (a wire [`Scheme`], scales and
//! payload bytes); [`dequantize`] is the exact inverse the receiver runs. Error feedback is
//! the caller's: subtract the dequantized values from the residual.

use crate::error::CodecError;
use crate::pack::{BitWriter, pack_into, packed_len, unpack};
use crate::rng::uniform_pair;
use half::{bf16, f16};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// How values are represented on the wire (what a receiver needs to decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Scheme {
    /// Raw little-endian `f32`.
    Fp32,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// `2^bits` evenly spaced levels on `[-s, s]`, one scale `s` per `bucket` values.
    Uniform {
        /// Bits per value, `1..=8`.
        bits: u8,
        /// Values per scale.
        bucket: u32,
    },
    /// TernGrad: `s · {-1, 0, +1}`, 2 bits a value, one scale.
    Ternary,
    /// Scaled sign: `±α`, 1 bit a value, one scale.
    Sign,
}

impl Scheme {
    /// Bits per value on the wire (before compression).
    pub fn bits(&self) -> u8 {
        match self {
            Self::Fp32 => 32,
            Self::Fp16 | Self::Bf16 => 16,
            Self::Uniform { bits, .. } => *bits,
            Self::Ternary => 2,
            Self::Sign => 1,
        }
    }

    /// Number of scales that accompany `n` values.
    pub fn scale_count(&self, n: usize) -> usize {
        match self {
            Self::Fp32 | Self::Fp16 | Self::Bf16 => 0,
            Self::Uniform { bucket, .. } => n.div_ceil((*bucket).max(1) as usize),
            Self::Ternary | Self::Sign => usize::from(n > 0),
        }
    }

    /// Payload bytes for `n` values.
    pub fn payload_len(&self, n: usize) -> usize {
        match self {
            Self::Fp32 => 4 * n,
            Self::Fp16 | Self::Bf16 => 2 * n,
            other => packed_len(n, other.bits()),
        }
    }

    /// Checks parameters that arrive from the wire.
    pub fn validate(&self) -> Result<(), CodecError> {
        if let Self::Uniform { bits, bucket } = self {
            if !(1..=8).contains(bits) {
                return Err(CodecError::Invalid(format!(
                    "uniform quantizer with {bits} bits (1..=8 allowed)"
                )));
            }
            if *bucket == 0 {
                return Err(CodecError::Invalid(
                    "uniform quantizer with bucket size 0".into(),
                ));
            }
        }
        Ok(())
    }
}

/// How to quantize (encode-side choices that the receiver does not need).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Quantizer {
    /// Lossless.
    Fp32,
    /// Round to nearest half.
    Fp16,
    /// Round to nearest bfloat16.
    Bf16,
    /// Unbiased stochastic rounding to `2^bits` levels per bucket; with `clip_sigma = Some(c)`
    /// values are first clipped to `±c·σ` of their bucket (biased, lower variance).
    Uniform {
        /// Bits per value, `1..=8`.
        bits: u8,
        /// Values per scale.
        bucket: u32,
        /// Optional clipping at `c·σ`.
        clip_sigma: Option<f32>,
    },
    /// TernGrad: scale `c·σ` (clipping larger values) when `clip_sigma = Some(c)` (2.5 is
    /// the paper's), else `max|x|` (unbiased).
    TernGrad {
        /// Optional clipping at `c·σ`.
        clip_sigma: Option<f32>,
    },
    /// `α·sign(x)` with `α = mean|x|`.
    Sign,
}

impl Quantizer {
    /// The wire scheme this quantizer produces.
    pub fn scheme(&self) -> Scheme {
        match *self {
            Self::Fp32 => Scheme::Fp32,
            Self::Fp16 => Scheme::Fp16,
            Self::Bf16 => Scheme::Bf16,
            Self::Uniform { bits, bucket, .. } => Scheme::Uniform { bits, bucket },
            Self::TernGrad { .. } => Scheme::Ternary,
            Self::Sign => Scheme::Sign,
        }
    }

    /// TernGrad with the paper's default scale, 2.5·σ.
    pub fn terngrad() -> Self {
        Self::TernGrad {
            clip_sigma: Some(2.5),
        }
    }

    /// Unbiased stochastic `bits`-bit quantization with the default bucket of 512.
    pub fn uniform(bits: u8) -> Self {
        Self::Uniform {
            bits,
            bucket: 512,
            clip_sigma: None,
        }
    }
}

/// Quantized values: the scheme, its scales, the payload bytes, and the values exactly as a
/// receiver will decode them (what error feedback subtracts).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Wire scheme.
    pub scheme: Scheme,
    /// Scales, [`Scheme::scale_count`] of them.
    pub scales: Vec<f32>,
    /// Payload, [`Scheme::payload_len`] bytes.
    pub payload: Vec<u8>,
    /// `dequantize(scheme, scales, payload)`, computed while encoding.
    pub decoded: Vec<f32>,
}

fn sigma(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    (x.iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt() as f32
}

/// The largest magnitude (NaNs ignored; 0 for none), in eight independent lanes so that
/// it vectorizes: `max` over non-NaN magnitudes gives the same value in any order.
fn max_abs(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// Fills `out` with uniforms in `[0, 1)`, two per 64-bit draw.
fn fill_uniforms<R: RngCore + ?Sized>(rng: &mut R, out: &mut [f32]) {
    let mut pairs = out.chunks_exact_mut(2);
    for p in &mut pairs {
        (p[0], p[1]) = uniform_pair(rng);
    }
    if let [last] = pairs.into_remainder() {
        *last = uniform_pair(rng).0;
    }
}

/// Decoded value of each uniform code `k`: `k · 2s/levels − s`.
fn uniform_levels(s: f32, bits: u8, lut: &mut [f32; 256]) {
    let levels = (1u32 << bits) - 1;
    let step = 2.0 * s / levels as f32;
    for (k, v) in lut.iter_mut().take(levels as usize + 1).enumerate() {
        *v = f32::from(k as u8) * step - s;
    }
}

/// Values a bucket of codes is processed in (the scratch buffers' size).
const BLOCK: usize = 4096;

/// A bucket's uniform levels: `s` its scale, `step = 2s/levels`, `inv_step` its inverse (0
/// for a zero scale).
#[derive(Clone, Copy)]
struct UniformGrid {
    s: f32,
    step: f32,
    inv_step: f32,
    levels: f32,
}

impl UniformGrid {
    /// Writes the codes of `block` under the dither `uniforms` (each in `[0, 1)`, as
    /// `fill_uniforms` draws them) and appends their decoded
    /// values to `decoded`; with AVX2 where the CPU has it, the same operations either way
    /// (so the same bits on every machine).
    fn codes(self, block: &[f32], uniforms: &[f32], codes: &mut [u8], decoded: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2() {
            // SAFETY: this CPU has AVX2 (checked just above).
            return unsafe { self.codes_avx2(block, uniforms, codes, decoded) };
        }
        self.codes_portable(block, uniforms, codes, decoded);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn codes_avx2(self, block: &[f32], uniforms: &[f32], codes: &mut [u8], decoded: &mut Vec<f32>) {
        self.codes_portable(block, uniforms, codes, decoded);
    }

    #[inline(always)]
    fn codes_portable(
        self,
        block: &[f32],
        uniforms: &[f32],
        codes: &mut [u8],
        decoded: &mut Vec<f32>,
    ) {
        let Self {
            s,
            step,
            inv_step,
            levels,
        } = self;
        for ((c, &v), &u) in codes.iter_mut().zip(block).zip(uniforms) {
            // Position on the level grid, then stochastic rounding: P(up) = fraction.
            // Truncation is floor here (the sum is non-negative); `min` guards the
            // rounding of `levels + u` up to `levels + 1` (`levels` is exact in f32).
            let pos = ((v + s) * inv_step).clamp(0.0, levels);
            let up = (pos + u).min(levels);
            // SAFETY: `up` is finite and in `0..=levels ⊆ 0..=255`: the clamp bounds `pos`
            // (a NaN stays NaN and `min` then gives `levels`), `u` is a uniform in `[0, 1)`
            // (every caller draws it with `fill_uniforms`) and `min` caps the sum.
            *c = unsafe { up.to_int_unchecked::<i32>() } as u8;
        }
        // Same expression as `uniform_levels`, so bit-identical to what decoding yields.
        decoded.extend(codes.iter().map(|&c| f32::from(c) * step - s));
    }
}

fn quantize_uniform<R: RngCore + ?Sized>(
    x: &[f32],
    bits: u8,
    bucket: u32,
    clip: Option<f32>,
    rng: &mut R,
    mut decoded: Vec<f32>,
) -> Quantized {
    let levels = ((1u32 << bits) - 1) as f32;
    let mut scales = Vec::with_capacity(x.len().div_ceil(bucket as usize));
    let mut payload = BitWriter::new(bits, x.len());
    decoded.clear();
    decoded.reserve(x.len());
    let mut codes = [0u8; BLOCK];
    let mut uniforms = [0f32; BLOCK];
    for chunk in x.chunks(bucket as usize) {
        let mut s = max_abs(chunk);
        if let Some(c) = clip {
            s = s.min(c * sigma(chunk));
        }
        let s = if s.is_finite() { s } else { 0.0 };
        scales.push(s);
        let step = 2.0 * s / levels;
        let inv_step = if s > 0.0 { levels / (2.0 * s) } else { 0.0 };
        let grid = UniformGrid {
            s,
            step,
            inv_step,
            levels,
        };
        for block in chunk.chunks(BLOCK) {
            let (codes, uniforms) = (&mut codes[..block.len()], &mut uniforms[..block.len()]);
            fill_uniforms(rng, uniforms);
            grid.codes(block, uniforms, codes, &mut decoded);
            payload.extend(codes);
        }
    }
    Quantized {
        scheme: Scheme::Uniform { bits, bucket },
        scales,
        payload: payload.finish(),
        decoded,
    }
}

/// Ternary codes: 0 is 0, 1 is +1, 2 is -1.
#[inline]
fn ternary_code(x: f32, inv_s: f32, u: f32) -> u8 {
    let p = (x.abs() * inv_s).min(1.0);
    if u < p {
        if x > 0.0 { 1 } else { 2 }
    } else {
        0
    }
}

const TERNARY: [f32; 3] = [0.0, 1.0, -1.0];

fn quantize_terngrad<R: RngCore + ?Sized>(
    x: &[f32],
    clip: Option<f32>,
    rng: &mut R,
    mut decoded: Vec<f32>,
) -> Quantized {
    let mut s = max_abs(x);
    if let Some(c) = clip {
        s = s.min(c * sigma(x));
    }
    let s = if s.is_finite() { s } else { 0.0 };
    let inv_s = if s > 0.0 { 1.0 / s } else { 0.0 };
    let mut payload = Vec::with_capacity(packed_len(x.len(), 2));
    decoded.clear();
    decoded.reserve(x.len());
    let mut codes = [0u8; BLOCK];
    let mut uniforms = [0f32; BLOCK];
    for block in x.chunks(BLOCK) {
        let (codes, uniforms) = (&mut codes[..block.len()], &mut uniforms[..block.len()]);
        fill_uniforms(rng, uniforms);
        for ((c, &v), &u) in codes.iter_mut().zip(block).zip(uniforms.iter()) {
            *c = ternary_code(v, inv_s, u);
        }
        decoded.extend(codes.iter().map(|&c| s * TERNARY[usize::from(c)]));
        pack_into(codes, 2, &mut payload);
    }
    Quantized {
        scheme: Scheme::Ternary,
        scales: if x.is_empty() { vec![] } else { vec![s] },
        payload,
        decoded,
    }
}

fn quantize_sign(x: &[f32], mut decoded: Vec<f32>) -> Quantized {
    let alpha = if x.is_empty() {
        0.0
    } else {
        (x.iter().map(|v| f64::from(v.abs())).sum::<f64>() / x.len() as f64) as f32
    };
    let codes: Vec<u8> = x.iter().map(|&v| u8::from(v >= 0.0)).collect();
    let mut payload = Vec::new();
    pack_into(&codes, 1, &mut payload);
    decoded.clear();
    decoded.extend(codes.iter().map(|&c| if c == 1 { alpha } else { -alpha }));
    Quantized {
        scheme: Scheme::Sign,
        scales: if x.is_empty() { vec![] } else { vec![alpha] },
        payload,
        decoded,
    }
}

fn floats(
    scheme: Scheme,
    x: &[f32],
    width: usize,
    to_bytes: fn(f32, &mut Vec<u8>) -> f32,
    mut decoded: Vec<f32>,
) -> Quantized {
    let mut payload = Vec::with_capacity(width * x.len());
    decoded.clear();
    decoded.extend(x.iter().map(|&v| to_bytes(v, &mut payload)));
    Quantized {
        scheme,
        scales: vec![],
        payload,
        decoded,
    }
}

/// Quantizes `x`; stochastic schemes draw from `rng`.
pub fn quantize<R: RngCore + ?Sized>(q: &Quantizer, x: &[f32], rng: &mut R) -> Quantized {
    quantize_reusing(q, x, rng, Vec::new())
}

/// [`quantize`], writing the decoded values into `spare` (cleared first) so that a caller
/// encoding the same tensor every round reuses one allocation instead of faulting in a
/// fresh one.
pub fn quantize_reusing<R: RngCore + ?Sized>(
    q: &Quantizer,
    x: &[f32],
    rng: &mut R,
    spare: Vec<f32>,
) -> Quantized {
    match *q {
        Quantizer::Fp32 => floats(
            Scheme::Fp32,
            x,
            4,
            |v, out| {
                out.extend_from_slice(&v.to_le_bytes());
                v
            },
            spare,
        ),
        Quantizer::Fp16 => floats(
            Scheme::Fp16,
            x,
            2,
            |v, out| {
                let h = f16::from_f32(v);
                out.extend_from_slice(&h.to_le_bytes());
                h.to_f32()
            },
            spare,
        ),
        Quantizer::Bf16 => floats(
            Scheme::Bf16,
            x,
            2,
            |v, out| {
                let h = bf16::from_f32(v);
                out.extend_from_slice(&h.to_le_bytes());
                h.to_f32()
            },
            spare,
        ),
        Quantizer::Uniform {
            bits,
            bucket,
            clip_sigma,
        } => quantize_uniform(x, bits.clamp(1, 8), bucket.max(1), clip_sigma, rng, spare),
        Quantizer::TernGrad { clip_sigma } => quantize_terngrad(x, clip_sigma, rng, spare),
        Quantizer::Sign => quantize_sign(x, spare),
    }
}

/// Decodes packed uniform codes bucket by bucket through a per-bucket table of levels.
fn dequantize_uniform(
    payload: &[u8],
    bits: u8,
    bucket: usize,
    scales: &[f32],
    n: usize,
    mut out: Vec<f32>,
) -> Result<Vec<f32>, CodecError> {
    out.clear();
    out.reserve(n);
    let mut lut = [0f32; 256];
    if (bucket * usize::from(bits)).is_multiple_of(8) && 8 % bits == 0 {
        // Buckets start on byte boundaries: decode straight from the packed bytes.
        let per = usize::from(8 / bits);
        let mask = ((1u16 << bits) - 1) as u8;
        let bucket_bytes = bucket / per;
        for (bytes, &s) in payload.chunks(bucket_bytes).zip(scales) {
            if bits == 8 {
                // A byte is its code: the level's own expression (as `uniform_levels`
                // writes it) vectorizes where a table lookup does not.
                let step = 2.0 * s / 255.0;
                out.extend(bytes.iter().map(|&b| f32::from(b) * step - s));
                continue;
            }
            uniform_levels(s, bits, &mut lut);
            for &b in bytes {
                for i in 0..per {
                    out.push(lut[usize::from((b >> (i * usize::from(bits))) & mask)]);
                }
            }
        }
        out.truncate(n);
    } else {
        let codes = unpack(payload, bits, n)?;
        for (chunk, &s) in codes.chunks(bucket).zip(scales) {
            uniform_levels(s, bits, &mut lut);
            out.extend(chunk.iter().map(|&k| lut[usize::from(k)]));
        }
    }
    Ok(out)
}

/// Reconstructs `n` values from a scheme, scales and payload, validating every length.
pub fn dequantize(
    scheme: &Scheme,
    scales: &[f32],
    payload: &[u8],
    n: usize,
) -> Result<Vec<f32>, CodecError> {
    dequantize_reusing(scheme, scales, payload, n, Vec::new())
}

/// [`dequantize`], reusing `spare`'s allocation for the dense uniform path (the hot one).
pub fn dequantize_reusing(
    scheme: &Scheme,
    scales: &[f32],
    payload: &[u8],
    n: usize,
    spare: Vec<f32>,
) -> Result<Vec<f32>, CodecError> {
    scheme.validate()?;
    if scales.len() != scheme.scale_count(n) {
        return Err(CodecError::Invalid(format!(
            "{scheme:?} for {n} values needs {} scales, got {}",
            scheme.scale_count(n),
            scales.len()
        )));
    }
    if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
        return Err(CodecError::Invalid(format!(
            "scale {bad} is not a finite non-negative number"
        )));
    }
    if payload.len() != scheme.payload_len(n) {
        return Err(CodecError::Invalid(format!(
            "{scheme:?} for {n} values needs {} payload bytes, got {}",
            scheme.payload_len(n),
            payload.len()
        )));
    }
    let floats = |width: usize, f: fn(&[u8]) -> f32| -> Result<Vec<f32>, CodecError> {
        let v: Vec<f32> = payload.chunks_exact(width).map(f).collect();
        match v.iter().find(|x| !x.is_finite()) {
            Some(bad) => Err(CodecError::Invalid(format!(
                "non-finite value {bad} in payload"
            ))),
            None => Ok(v),
        }
    };
    match *scheme {
        Scheme::Fp32 => floats(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        Scheme::Fp16 => floats(2, |c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        Scheme::Bf16 => floats(2, |c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        Scheme::Uniform { bits, bucket } => {
            dequantize_uniform(payload, bits, bucket as usize, scales, n, spare)
        }
        Scheme::Ternary => {
            let codes = unpack(payload, 2, n)?;
            let s = scales.first().copied().unwrap_or(0.0);
            if codes.contains(&3) {
                return Err(CodecError::Invalid("ternary code 3 is not defined".into()));
            }
            Ok(codes.iter().map(|&c| s * TERNARY[usize::from(c)]).collect())
        }
        Scheme::Sign => {
            let codes = unpack(payload, 1, n)?;
            let a = scales.first().copied().unwrap_or(0.0);
            Ok(codes.iter().map(|&c| if c == 1 { a } else { -a }).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::DitherRng;
    use proptest::prelude::*;
    use rand::RngCore;

    /// The AVX2 copy of the uniform quantizer's loop gives the portable copy's codes and
    /// decoded values, to the bit, on values that include zeros, NaNs and infinities.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn uniform_codes_with_avx2_are_the_portable_bits() {
        if !crate::simd::avx2() {
            return;
        }
        let mut rng = DitherRng::new(11);
        let specials = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40];
        let block: Vec<f32> = (0..1031)
            .map(|i| match specials.get(i % 61) {
                Some(&v) => v,
                None => (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 3.0,
            })
            .collect();
        let mut uniforms = vec![0f32; block.len()];
        fill_uniforms(&mut rng, &mut uniforms);
        for (s, bits) in [(1.0f32, 8u8), (0.7, 4), (1e-39, 8), (0.0, 3)] {
            let levels = ((1u32 << bits) - 1) as f32;
            let grid = UniformGrid {
                s,
                step: 2.0 * s / levels,
                inv_step: if s > 0.0 { levels / (2.0 * s) } else { 0.0 },
                levels,
            };
            let (mut codes, mut decoded) = (vec![0u8; block.len()], Vec::new());
            grid.codes_portable(&block, &uniforms, &mut codes, &mut decoded);
            let (mut codes_avx2, mut decoded_avx2) = (vec![0u8; block.len()], Vec::new());
            // SAFETY: this CPU has AVX2 (checked above).
            unsafe { grid.codes_avx2(&block, &uniforms, &mut codes_avx2, &mut decoded_avx2) };
            assert_eq!(codes, codes_avx2, "scale {s}, {bits} bits");
            assert!(codes.iter().all(|&c| f32::from(c) <= levels));
            let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits_of(&decoded), bits_of(&decoded_avx2));
        }
    }

    /// The lane-wise largest magnitude is the sequential one (NaNs ignored).
    #[test]
    fn max_abs_in_lanes_is_the_sequential_maximum() {
        let mut rng = DitherRng::new(3);
        for n in [0usize, 1, 7, 8, 9, 100, 513] {
            let mut x: Vec<f32> = (0..n)
                .map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5)
                .collect();
            if n > 3 {
                x[n / 2] = f32::NAN;
            }
            let sequential = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(max_abs(&x).to_bits(), sequential.to_bits(), "{n} values");
        }
    }

    fn roundtrip(q: &Quantizer, x: &[f32], seed: u64) -> Vec<f32> {
        let out = quantize(q, x, &mut DitherRng::new(seed));
        assert_eq!(out.payload.len(), out.scheme.payload_len(x.len()), "{q:?}");
        assert_eq!(out.scales.len(), out.scheme.scale_count(x.len()), "{q:?}");
        let back = dequantize(&out.scheme, &out.scales, &out.payload, x.len()).unwrap();
        assert_eq!(
            back, out.decoded,
            "{q:?}: decoded values must be what a receiver gets"
        );
        back
    }

    fn values() -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(crate::test_strategies::uniform(-1000.0, 1000.0), 0..600)
    }

    proptest! {
        #[test]
        fn fp32_is_lossless(x in proptest::collection::vec(any::<f32>().prop_filter("finite", |v| v.is_finite()), 0..300)) {
            prop_assert_eq!(roundtrip(&Quantizer::Fp32, &x, 0), x);
        }

        #[test]
        fn half_precisions_stay_within_their_rounding(x in values()) {
            for (q, rel) in [(Quantizer::Fp16, 1.0 / 2048.0), (Quantizer::Bf16, 1.0 / 256.0)] {
                let y = roundtrip(&q, &x, 0);
                for (a, b) in x.iter().zip(&y) {
                    // Half precision's subnormal floor is 2^-24; bf16 shares f32's range.
                    prop_assert!((a - b).abs() <= a.abs() * rel + 6.0e-8, "{q:?}: {a} -> {b}");
                }
            }
        }

        #[test]
        fn uniform_error_is_at_most_one_step(x in values(), bits in 1u8..=8, bucket in 1u32..100, seed in any::<u64>()) {
            let q = Quantizer::Uniform { bits, bucket, clip_sigma: None };
            let y = roundtrip(&q, &x, seed);
            let levels = ((1u32 << bits) - 1) as f32;
            for (chunk_x, chunk_y) in x.chunks(bucket as usize).zip(y.chunks(bucket as usize)) {
                let s = chunk_x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = 2.0 * s / levels;
                for (a, b) in chunk_x.iter().zip(chunk_y) {
                    prop_assert!((a - b).abs() <= step * 1.0001 + 1e-6, "{a} -> {b}, step {step}");
                    prop_assert!(b.abs() <= s * 1.0001 + 1e-6);
                }
            }
        }

        #[test]
        fn terngrad_and_sign_errors_are_bounded(x in values(), seed in any::<u64>()) {
            let s = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let y = roundtrip(&Quantizer::TernGrad { clip_sigma: None }, &x, seed);
            for (a, b) in x.iter().zip(&y) {
                prop_assert!((a - b).abs() <= s * 1.0001);
                prop_assert!(*b == 0.0 || b.signum() == a.signum());
            }
            let y = roundtrip(&Quantizer::Sign, &x, seed);
            let alpha = y.first().map_or(0.0, |v| v.abs());
            for (a, b) in x.iter().zip(&y) {
                prop_assert!((a - b).abs() <= a.abs() + alpha * 1.0001);
                prop_assert_eq!(b.abs(), alpha);
            }
        }

        #[test]
        fn encoded_sizes_match_the_formula(n in 0usize..2000, bits in 1u8..=8, bucket in 1u32..700) {
            let x = vec![0.5f32; n];
            let q = quantize(&Quantizer::Uniform { bits, bucket, clip_sigma: None }, &x, &mut DitherRng::new(1));
            prop_assert_eq!(q.payload.len(), (n * bits as usize).div_ceil(8));
            prop_assert_eq!(q.scales.len(), n.div_ceil(bucket as usize));
            prop_assert_eq!(quantize(&Quantizer::TernGrad { clip_sigma: None }, &x, &mut DitherRng::new(1)).payload.len(), n.div_ceil(4));
            prop_assert_eq!(quantize(&Quantizer::Sign, &x, &mut DitherRng::new(1)).payload.len(), n.div_ceil(8));
            prop_assert_eq!(quantize(&Quantizer::Fp16, &x, &mut DitherRng::new(1)).payload.len(), 2 * n);
        }
    }

    /// Mean of `draws` independent quantizations of `x`, compared with `x`.
    fn assert_unbiased(q: Quantizer, x: &[f32], step: f32) {
        let draws = 4000;
        let mut sum = vec![0f64; x.len()];
        for d in 0..draws {
            for (s, v) in sum.iter_mut().zip(roundtrip(&q, x, d)) {
                *s += f64::from(v);
            }
        }
        // Each draw has standard deviation at most step/2; allow six standard errors.
        let tol = 6.0 * f64::from(step) / 2.0 / (draws as f64).sqrt() + 1e-6;
        for (a, s) in x.iter().zip(&sum) {
            let mean = s / draws as f64;
            assert!(
                (mean - f64::from(*a)).abs() <= tol,
                "{q:?}: E[q({a})] = {mean}, tol {tol}"
            );
        }
    }

    #[test]
    fn stochastic_quantizers_are_unbiased() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 10.0)
            .collect();
        let s = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for bits in [1u8, 2, 3, 4, 8] {
            let step = 2.0 * s / ((1u32 << bits) - 1) as f32;
            assert_unbiased(
                Quantizer::Uniform {
                    bits,
                    bucket: 64,
                    clip_sigma: None,
                },
                &x,
                step,
            );
        }
        assert_unbiased(Quantizer::TernGrad { clip_sigma: None }, &x, 2.0 * s);
    }

    #[test]
    fn clipping_limits_the_scale() {
        let mut x = vec![0.1f32; 99];
        x.push(100.0);
        let q = quantize(
            &Quantizer::TernGrad {
                clip_sigma: Some(2.5),
            },
            &x,
            &mut DitherRng::new(0),
        );
        assert!(q.scales[0] < 100.0 && q.scales[0] > 0.1, "{:?}", q.scales);
        let q = quantize(
            &Quantizer::Uniform {
                bits: 4,
                bucket: 100,
                clip_sigma: Some(2.5),
            },
            &x,
            &mut DitherRng::new(0),
        );
        assert!(q.scales[0] < 100.0);
    }

    #[test]
    fn malformed_inputs_to_dequantize_are_errors() {
        let s = Scheme::Uniform { bits: 2, bucket: 4 };
        assert!(dequantize(&s, &[1.0], &[0, 0], 8).is_err(), "scale count");
        assert!(
            dequantize(&s, &[1.0, 1.0], &[0], 8).is_err(),
            "payload length"
        );
        assert!(
            dequantize(&s, &[1.0, f32::NAN], &[0, 0], 8).is_err(),
            "nan scale"
        );
        assert!(dequantize(&Scheme::Uniform { bits: 9, bucket: 4 }, &[], &[], 0).is_err());
        assert!(dequantize(&Scheme::Uniform { bits: 2, bucket: 0 }, &[], &[], 0).is_err());
        assert!(
            dequantize(&Scheme::Ternary, &[1.0], &[0xff], 4).is_err(),
            "code 3"
        );
        assert!(dequantize(&Scheme::Fp32, &[], &f32::INFINITY.to_le_bytes(), 1).is_err());
    }
}
