//! Data mode's wire format (Hanna et al., "Quantizing data for distributed learning"): a
//! worker's minibatch with every feature quantized to `bits` bits by stochastic rounding
//! inside a min–max range (one range per feature over the batch, or one per sample), plus
//! the labels. Stochastic rounding keeps `E[Q(x)] = x` element by element.
//!
//! Layout: magic `WGDB`, version byte, CBOR header length (u32 LE), the CBOR header, then
//! the codes packed at `bits` bits, row-major.

use crate::error::CodecError;
use crate::frame::{Limits, PREAMBLE, split_preamble};
use crate::pack::{pack_into, packed_len, unpack};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// First four bytes of a data batch.
pub const MAGIC: [u8; 4] = *b"WGDB";
/// Data batch format version this build writes and reads.
pub const VERSION: u8 = 1;

/// Which values share a quantization range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeAxis {
    /// One `[lo, hi]` per feature (column), over the batch's samples.
    PerFeature,
    /// One `[lo, hi]` per sample (row).
    PerSample,
}

/// The CBOR header of a data batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Worker that sent the batch.
    pub sender: String,
    /// Step the batch belongs to.
    pub clock: u64,
    /// Samples.
    pub rows: u32,
    /// Features per sample.
    pub cols: u32,
    /// Bits per feature value, 1..=8.
    pub bits: u8,
    /// What shares a range.
    pub axis: RangeAxis,
    /// Lower end of each range.
    pub lo: Vec<f32>,
    /// Upper end of each range.
    pub hi: Vec<f32>,
    /// One label per sample.
    pub labels: Vec<u32>,
}

/// An encoded batch: the bytes for the wire and the features exactly as the receiver will
/// decode them.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedBatch {
    /// Wire bytes.
    pub bytes: Vec<u8>,
    /// `Q(x)`, row-major.
    pub decoded: Vec<f32>,
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch {
    /// Sender name.
    pub sender: String,
    /// Step.
    pub clock: u64,
    /// Samples.
    pub rows: usize,
    /// Features per sample.
    pub cols: usize,
    /// `Q(x)`, row-major.
    pub features: Vec<f32>,
    /// One label per sample.
    pub labels: Vec<u32>,
}

/// Highest code at `bits` bits.
fn top_code(bits: u8) -> f64 {
    f64::from((1u32 << bits) - 1)
}

/// The value code `q` stands for in the range `[lo, hi]` (in f64, so that ranges as wide as
/// f32 allows cannot overflow; the result lies in `[lo, hi]`).
fn level(lo: f32, hi: f32, bits: u8, q: u8) -> f32 {
    if hi > lo {
        let (lo, hi) = (f64::from(lo), f64::from(hi));
        (lo + f64::from(q) * ((hi - lo) / top_code(bits))).clamp(lo, hi) as f32
    } else {
        lo
    }
}

/// Quantizes `features` (`labels.len()` rows of `cols` values, row-major) to `bits` bits and
/// encodes the batch. Fails on empty or ragged input, non-finite features or bad widths.
#[allow(clippy::too_many_arguments)]
pub fn encode_batch<R: RngCore + ?Sized>(
    sender: &str,
    clock: u64,
    features: &[f32],
    cols: usize,
    labels: &[u32],
    bits: u8,
    axis: RangeAxis,
    rng: &mut R,
) -> Result<EncodedBatch, CodecError> {
    let rows = labels.len();
    if !(1..=8).contains(&bits) {
        return Err(CodecError::Invalid(format!(
            "{bits} bits per feature is not in 1..=8"
        )));
    }
    if cols == 0 || features.len() != rows * cols {
        return Err(CodecError::Invalid(format!(
            "{} feature values for {rows} samples of {cols} features",
            features.len()
        )));
    }
    if rows > u32::MAX as usize || cols > u32::MAX as usize {
        return Err(CodecError::Invalid("batch too large".into()));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::Invalid(format!(
            "feature {} of sample {} is not finite",
            i % cols,
            i / cols
        )));
    }
    let ranges = match axis {
        RangeAxis::PerFeature => cols,
        RangeAxis::PerSample => rows,
    };
    let mut lo = vec![f32::INFINITY; ranges];
    let mut hi = vec![f32::NEG_INFINITY; ranges];
    for (i, &v) in features.iter().enumerate() {
        let r = range_of(axis, i, cols);
        lo[r] = lo[r].min(v);
        hi[r] = hi[r].max(v);
    }
    let top = top_code(bits);
    let mut codes = Vec::with_capacity(features.len());
    let mut decoded = Vec::with_capacity(features.len());
    for (i, &v) in features.iter().enumerate() {
        let r = range_of(axis, i, cols);
        let (l, h) = (lo[r], hi[r]);
        let q = if h > l {
            // Stochastic rounding: up with probability equal to the fractional part.
            let t = ((f64::from(v) - f64::from(l)) / (f64::from(h) - f64::from(l)) * top)
                .clamp(0.0, top);
            let u = f64::from(rng.next_u32()) * (1.0 / 4_294_967_296.0);
            (t + u).floor().min(top) as u8
        } else {
            0
        };
        codes.push(q);
        decoded.push(level(l, h, bits, q));
    }
    let header = BatchHeader {
        sender: sender.to_owned(),
        clock,
        rows: rows as u32,
        cols: cols as u32,
        bits,
        axis,
        lo,
        hi,
        labels: labels.to_vec(),
    };
    let mut cbor = Vec::new();
    ciborium::into_writer(&header, &mut cbor).map_err(|e| CodecError::Header(e.to_string()))?;
    let mut bytes = Vec::with_capacity(PREAMBLE + cbor.len() + packed_len(codes.len(), bits));
    bytes.extend_from_slice(&MAGIC);
    bytes.push(VERSION);
    bytes.extend_from_slice(&(cbor.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&cbor);
    pack_into(&codes, bits, &mut bytes);
    Ok(EncodedBatch { bytes, decoded })
}

fn range_of(axis: RangeAxis, i: usize, cols: usize) -> usize {
    match axis {
        RangeAxis::PerFeature => i % cols,
        RangeAxis::PerSample => i / cols,
    }
}

/// Decodes untrusted bytes into a batch, enforcing `limits` (whole size, header size, and
/// `rows · cols` against `max_elements`) and the header's internal consistency.
pub fn decode_batch(bytes: &[u8], limits: &Limits) -> Result<DecodedBatch, CodecError> {
    let (cbor, payload) = split_preamble(
        bytes,
        &MAGIC,
        VERSION,
        "data batch",
        "data batch header",
        limits,
    )?;
    let h: BatchHeader =
        ciborium::from_reader(cbor).map_err(|e| CodecError::Header(e.to_string()))?;
    let (rows, cols) = (h.rows as usize, h.cols as usize);
    let count = rows
        .checked_mul(cols)
        .filter(|&n| n <= limits.max_elements)
        .ok_or(CodecError::TooLarge {
            what: "data batch elements",
            size: h.rows as u64 * h.cols as u64,
            limit: limits.max_elements as u64,
        })?;
    if !(1..=8).contains(&h.bits) {
        return Err(CodecError::Invalid(format!(
            "{} bits per feature is not in 1..=8",
            h.bits
        )));
    }
    if cols == 0 {
        return Err(CodecError::Invalid(
            "a batch of samples with no features".into(),
        ));
    }
    if h.labels.len() != rows {
        return Err(CodecError::Invalid(format!(
            "{} labels for {rows} samples",
            h.labels.len()
        )));
    }
    let ranges = match h.axis {
        RangeAxis::PerFeature => cols,
        RangeAxis::PerSample => rows,
    };
    if h.lo.len() != ranges || h.hi.len() != ranges {
        return Err(CodecError::Invalid(format!(
            "{} and {} range ends for {ranges} ranges",
            h.lo.len(),
            h.hi.len()
        )));
    }
    if let Some(r) =
        (0..ranges).find(|&r| !(h.lo[r].is_finite() && h.hi[r].is_finite() && h.lo[r] <= h.hi[r]))
    {
        return Err(CodecError::Invalid(format!(
            "range {r} [{}, {}] is not a finite interval",
            h.lo[r], h.hi[r]
        )));
    }
    let codes = unpack(payload, h.bits, count)?;
    let features = codes
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let r = range_of(h.axis, i, cols);
            level(h.lo[r], h.hi[r], h.bits, q)
        })
        .collect();
    Ok(DecodedBatch {
        sender: h.sender,
        clock: h.clock,
        rows,
        cols,
        features,
        labels: h.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::DitherRng;
    use proptest::prelude::*;
    use rand::RngCore;

    fn sample(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = DitherRng::new(seed);
        let x = (0..rows * cols)
            .map(|_| (rng.next_u32() % 17) as f32 / 4.0)
            .collect();
        let y = (0..rows as u32).map(|i| i % 10).collect();
        (x, y)
    }

    #[test]
    fn round_trips_exactly_what_the_encoder_reports() {
        for axis in [RangeAxis::PerFeature, RangeAxis::PerSample] {
            for bits in 1..=8 {
                let (x, y) = sample(13, 7, u64::from(bits));
                let enc =
                    encode_batch("r/w0", 9, &x, 7, &y, bits, axis, &mut DitherRng::new(1)).unwrap();
                let dec = decode_batch(&enc.bytes, &Limits::default()).unwrap();
                assert_eq!(dec.features, enc.decoded);
                assert_eq!(dec.labels, y);
                assert_eq!((dec.rows, dec.cols, dec.clock), (13, 7, 9));
                assert_eq!(dec.sender, "r/w0");
                // Every decoded value lies within one step of the original.
                for (q, v) in enc.decoded.iter().zip(&x) {
                    assert!(
                        (q - v).abs() as f64 <= 4.0 / top_code(bits) + 1e-5,
                        "{q} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // One feature at 0.3 of its range, rounded to 1 bit 20,000 times: the mean must be
        // 0.3 within five standard errors (σ = sqrt(0.3·0.7)/sqrt(n)).
        let x = [0.0f32, 0.3, 1.0];
        let y = [0, 1, 2];
        let mut rng = DitherRng::new(7);
        let n = 20_000;
        let mut sum = 0.0f64;
        for _ in 0..n {
            let enc = encode_batch("w", 0, &x, 1, &y, 1, RangeAxis::PerFeature, &mut rng).unwrap();
            sum += f64::from(enc.decoded[1]);
        }
        let mean = sum / f64::from(n);
        let se = (0.3f64 * 0.7 / f64::from(n)).sqrt();
        assert!((mean - 0.3).abs() < 5.0 * se, "mean {mean}");
    }

    #[test]
    fn the_widest_f32_ranges_stay_finite() {
        let x = [-f32::MAX, f32::MAX, 0.0, 1.0];
        let enc = encode_batch(
            "w",
            0,
            &x,
            1,
            &[0, 1, 2, 3],
            3,
            RangeAxis::PerFeature,
            &mut DitherRng::new(2),
        )
        .unwrap();
        let dec = decode_batch(&enc.bytes, &Limits::default()).unwrap();
        assert!(
            dec.features.iter().all(|v| v.is_finite()),
            "{:?}",
            dec.features
        );
        assert_eq!(dec.features[0], -f32::MAX);
        assert_eq!(dec.features[1], f32::MAX);
    }

    #[test]
    fn constant_ranges_decode_exactly() {
        let x = vec![2.5f32; 12];
        let y = vec![1; 4];
        let enc = encode_batch(
            "w",
            0,
            &x,
            3,
            &y,
            3,
            RangeAxis::PerFeature,
            &mut DitherRng::new(0),
        )
        .unwrap();
        assert_eq!(enc.decoded, x);
        assert_eq!(
            decode_batch(&enc.bytes, &Limits::default())
                .unwrap()
                .features,
            x
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let mut rng = DitherRng::new(0);
        let err = encode_batch(
            "w",
            0,
            &[1.0; 6],
            3,
            &[0; 3],
            2,
            RangeAxis::PerFeature,
            &mut rng,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("6 feature values for 3 samples"),
            "{err}"
        );
        let err = encode_batch(
            "w",
            0,
            &[f32::NAN; 3],
            3,
            &[0],
            2,
            RangeAxis::PerFeature,
            &mut rng,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not finite"), "{err}");
        let err = encode_batch(
            "w",
            0,
            &[1.0; 3],
            3,
            &[0],
            9,
            RangeAxis::PerFeature,
            &mut rng,
        )
        .unwrap_err();
        assert!(err.to_string().contains("9 bits"), "{err}");

        let (x, y) = sample(4, 5, 3);
        let good = encode_batch("w", 0, &x, 5, &y, 4, RangeAxis::PerSample, &mut rng).unwrap();
        let limits = Limits::default();
        // Truncated payload, trailing garbage, bad magic, wrong version, element limit.
        let cut = &good.bytes[..good.bytes.len() - 1];
        assert!(matches!(
            decode_batch(cut, &limits),
            Err(CodecError::Invalid(_))
        ));
        let mut long = good.bytes.clone();
        long.push(0);
        assert!(matches!(
            decode_batch(&long, &limits),
            Err(CodecError::Invalid(_))
        ));
        let mut magic = good.bytes.clone();
        magic[0] = b'X';
        assert_eq!(decode_batch(&magic, &limits), Err(CodecError::BadMagic));
        let mut version = good.bytes.clone();
        version[4] = 99;
        assert!(matches!(
            decode_batch(&version, &limits),
            Err(CodecError::Version { .. })
        ));
        let tight = Limits {
            max_elements: 19,
            ..limits
        };
        assert!(matches!(
            decode_batch(&good.bytes, &tight),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_batch(&good.bytes[..5], &limits),
            Err(CodecError::Truncated(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_batch(&bytes, &Limits::default());
        }

        #[test]
        fn corrupting_one_byte_never_panics(flip in 0usize..400, value in any::<u8>()) {
            let (x, y) = sample(6, 8, 11);
            let mut enc = encode_batch("w", 3, &x, 8, &y, 3, RangeAxis::PerFeature,
                &mut DitherRng::new(5)).unwrap().bytes;
            let i = flip % enc.len();
            enc[i] = value;
            let _ = decode_batch(&enc, &Limits::default());
        }
    }
}
