//! The update frame: what one tensor's update looks like on the LAN or the WAN.
//!
//! ```text
//! "WGRD" | version: u8 | header length: u32 LE | CBOR header | payload (raw or zstd)
//! ```
//!
//! The CBOR header is a positional array (see `header`); version 1 wrote it as a map with
//! field names, which cost more than the payload of a small WAN update.
//!
//! The payload, once decompressed, is the sparse index section (if any) followed by the
//! packed values. Every length is declared in the header, checked against [`Limits`] before
//! anything is allocated or decompressed, and checked again against what arrives: decoding
//! any byte string returns a value or a [`CodecError`], never a panic.

use crate::error::CodecError;
use crate::quant::{Quantizer, Scheme, dequantize, dequantize_reusing, quantize_reusing};
use crate::sparse::{IndexEncoding, decode_indices, encode_indices};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"WGRD";
/// Frame format version this build writes and reads.
pub const VERSION: u8 = 2;
/// Bytes before the CBOR header: magic, version, header length.
pub const PREAMBLE: usize = 9;

/// Hard limits applied while decoding untrusted frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest CBOR header.
    pub max_header: usize,
    /// Largest whole frame.
    pub max_frame: usize,
    /// Largest decompressed payload.
    pub max_payload: usize,
    /// Largest tensor, in elements.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header: 1 << 20,
            max_frame: 256 << 20,
            max_payload: 256 << 20,
            max_elements: 1 << 28,
        }
    }
}

impl Limits {
    /// Whether every frame for a tensor of `numel` elements fits these limits, whatever the
    /// plan: a value takes at most 32 bits, a sparse frame is sent only when it is smaller
    /// than the dense one, zstd may grow an incompressible payload up to its compress bound,
    /// and the header is at most `max_header` (its largest part, one scale per 512-value
    /// bucket, stays under the default 1 MiB for every tensor the default frame limit admits).
    pub fn admits_tensor(&self, numel: usize) -> bool {
        let payload = numel.saturating_mul(4);
        let frame = zstd::zstd_safe::compress_bound(payload)
            .saturating_add(self.max_header)
            .saturating_add(PREAMBLE);
        numel <= self.max_elements && payload <= self.max_payload && frame <= self.max_frame
    }
}

/// How the payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Stored as is.
    None,
    /// One zstd frame.
    Zstd,
}

/// The sparse index section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseHeader {
    /// How the indices are written.
    pub encoding: IndexEncoding,
    /// Number of indices (and values).
    pub count: u32,
    /// Bytes of the index section.
    pub index_bytes: u32,
}

/// The CBOR header of a frame. On the wire it is a positional array (`header.rs`); its
/// serde derives give the self-describing map form, for logs and tools, which the
/// decoder does not read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameHeader {
    /// Region (or worker) that encoded the update.
    pub sender: String,
    /// Sender's clock (round) when the update was taken.
    pub clock: u64,
    /// Tensor index in the model manifest.
    pub tensor: u32,
    /// Elements in the whole tensor.
    pub len: u32,
    /// Value encoding, including its bit-width.
    pub scheme: Scheme,
    /// Quantization scales.
    pub scales: Vec<f32>,
    /// Present when only some elements are sent.
    pub sparse: Option<SparseHeader>,
    /// Payload bytes after decompression.
    pub raw_len: u32,
    /// Payload compression.
    pub compression: Compression,
}

/// Who sends what: the parts of the header that do not depend on the encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMeta {
    /// Sender name.
    pub sender: String,
    /// Sender clock.
    pub clock: u64,
    /// Tensor index.
    pub tensor: u32,
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    /// Value quantizer.
    pub quantizer: Quantizer,
    /// zstd level; `None` stores the payload uncompressed.
    pub zstd_level: Option<i32>,
}

/// An update to one tensor: every element, or some of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// One value per element.
    Dense(Vec<f32>),
    /// Values at strictly increasing indices.
    Sparse {
        /// Element indices.
        indices: Vec<u32>,
        /// Values, one per index.
        values: Vec<f32>,
    },
}

impl Update {
    /// Adds `factor ·` this update into `target`.
    pub fn add_to(&self, target: &mut [f32], factor: f32) {
        match self {
            Self::Dense(v) => target.iter_mut().zip(v).for_each(|(t, v)| *t += factor * v),
            Self::Sparse { indices, values } => {
                for (&i, &v) in indices.iter().zip(values) {
                    target[i as usize] += factor * v;
                }
            }
        }
    }

    /// The carried values, giving back their allocation for reuse.
    pub fn into_values(self) -> Vec<f32> {
        match self {
            Self::Dense(v) | Self::Sparse { values: v, .. } => v,
        }
    }

    /// Number of values carried.
    pub fn value_count(&self) -> usize {
        match self {
            Self::Dense(v) => v.len(),
            Self::Sparse { values, .. } => values.len(),
        }
    }
}

/// The encoded bytes, and the update exactly as the receiver will decode it (for error feedback).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The frame.
    pub bytes: Vec<u8>,
    /// What decoding `bytes` yields.
    pub decoded: Update,
    /// Packed payload bytes (indices and values) before compression.
    pub packed_len: usize,
    /// Payload bytes after compression (equal to `packed_len` without zstd).
    pub compressed_len: usize,
}

/// Encodes an update to a tensor of `len` elements.
///
/// A sparse update whose dense form would be no larger is sent dense (unselected elements
/// as zeros), so the receiver always gets the smaller encoding.
pub fn encode<R: RngCore + ?Sized>(
    meta: &FrameMeta,
    len: usize,
    update: &Update,
    opts: &EncodeOptions,
    rng: &mut R,
) -> Result<Encoded, CodecError> {
    encode_reusing(meta, len, update, opts, rng, Vec::new())
}

/// [`encode`], writing the decoded values into `spare`'s allocation (see [`Update::into_values`]).
pub fn encode_reusing<R: RngCore + ?Sized>(
    meta: &FrameMeta,
    len: usize,
    update: &Update,
    opts: &EncodeOptions,
    rng: &mut R,
    spare: Vec<f32>,
) -> Result<Encoded, CodecError> {
    if len > u32::MAX as usize {
        return Err(CodecError::Invalid(format!(
            "tensor of {len} elements is too large"
        )));
    }
    let scheme = opts.quantizer.scheme();
    scheme.validate()?;
    let dense_size = scheme.payload_len(len);
    let (sparse, values, index_bytes) = match update {
        Update::Dense(v) => {
            if v.len() != len {
                return Err(CodecError::Invalid(format!(
                    "{} values for a tensor of {len}",
                    v.len()
                )));
            }
            (None, v.as_slice(), Vec::new())
        }
        Update::Sparse { indices, values } => {
            if indices.len() != values.len() {
                return Err(CodecError::Invalid(
                    "sparse update with unequal index and value counts".into(),
                ));
            }
            if indices.windows(2).any(|p| p[0] >= p[1])
                || indices.last().is_some_and(|&i| i as usize >= len)
            {
                return Err(CodecError::Invalid(
                    "sparse indices must increase strictly and stay in range".into(),
                ));
            }
            let (enc, bytes) = encode_indices(indices, len);
            if bytes.len() + scheme.payload_len(values.len()) >= dense_size {
                let mut dense = vec![0.0; len];
                for (&i, &v) in indices.iter().zip(values) {
                    dense[i as usize] = v;
                }
                return encode_reusing(meta, len, &Update::Dense(dense), opts, rng, spare);
            }
            let header = SparseHeader {
                encoding: enc,
                count: values.len() as u32,
                index_bytes: bytes.len() as u32,
            };
            (Some((header, indices)), values.as_slice(), bytes)
        }
    };
    encode_values(meta, len, sparse, values, index_bytes, opts, rng, spare)
}

/// [`encode`] of a dense update borrowed as a slice (no owned [`Update`] to build first).
pub fn encode_dense<R: RngCore + ?Sized>(
    meta: &FrameMeta,
    values: &[f32],
    opts: &EncodeOptions,
    rng: &mut R,
    spare: Vec<f32>,
) -> Result<Encoded, CodecError> {
    if values.len() > u32::MAX as usize {
        return Err(CodecError::Invalid(format!(
            "tensor of {} elements is too large",
            values.len()
        )));
    }
    opts.quantizer.scheme().validate()?;
    encode_values(
        meta,
        values.len(),
        None,
        values,
        Vec::new(),
        opts,
        rng,
        spare,
    )
}

/// The frame of `values` (all `len` of a dense update, or a sparse update's values at the
/// indices `index_bytes` encodes), its scheme validated by the caller.
#[allow(clippy::too_many_arguments)]
fn encode_values<R: RngCore + ?Sized>(
    meta: &FrameMeta,
    len: usize,
    sparse: Option<(SparseHeader, &Vec<u32>)>,
    values: &[f32],
    index_bytes: Vec<u8>,
    opts: &EncodeOptions,
    rng: &mut R,
    spare: Vec<f32>,
) -> Result<Encoded, CodecError> {
    let q = quantize_reusing(&opts.quantizer, values, rng, spare);
    let decoded_values = q.decoded;
    let raw = if index_bytes.is_empty() {
        q.payload
    } else {
        let mut raw = index_bytes;
        raw.extend_from_slice(&q.payload);
        raw
    };
    let raw_len = raw.len();
    let (compression, payload): (Compression, Vec<u8>) = match opts.zstd_level {
        Some(level) => (
            Compression::Zstd,
            zstd::bulk::compress(&raw, level)
                .map_err(|e| CodecError::Compression(e.to_string()))?,
        ),
        None => (Compression::None, raw),
    };
    let header = FrameHeader {
        sender: meta.sender.clone(),
        clock: meta.clock,
        tensor: meta.tensor,
        len: len as u32,
        scheme: q.scheme,
        scales: q.scales,
        sparse: sparse.map(|(h, _)| h),
        raw_len: raw_len as u32,
        compression,
    };
    let compressed_len = payload.len();
    let bytes = assemble(&header, &payload)?;
    let decoded = match sparse {
        Some((_, indices)) => Update::Sparse {
            indices: indices.clone(),
            values: decoded_values,
        },
        None => Update::Dense(decoded_values),
    };
    Ok(Encoded {
        bytes,
        decoded,
        packed_len: raw_len,
        compressed_len,
    })
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The validated header.
    pub header: FrameHeader,
    /// The update it carries.
    pub update: Update,
}

/// Writes a frame as given: the preamble, `header` in CBOR, then `payload`. Nothing checks
/// that they agree ([`decode`] does), so tests use it to build frames that lie.
pub fn assemble(header: &FrameHeader, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let cbor = crate::header::to_cbor(header)?;
    let mut bytes = Vec::with_capacity(PREAMBLE + cbor.len() + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.push(VERSION);
    bytes.extend_from_slice(&(cbor.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&cbor);
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// Checks the preamble shared by frames and data batches (magic, version, CBOR header
/// length) against `limits` and splits the rest into the CBOR header and the payload.
/// `what` and `header_what` name the object and its header in size errors.
pub(crate) fn split_preamble<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    version: u8,
    what: &'static str,
    header_what: &'static str,
    limits: &Limits,
) -> Result<(&'a [u8], &'a [u8]), CodecError> {
    if bytes.len() > limits.max_frame {
        return Err(CodecError::TooLarge {
            what,
            size: bytes.len() as u64,
            limit: limits.max_frame as u64,
        });
    }
    if bytes.len() < 4 || bytes[..4] != *magic {
        return Err(if bytes.len() < 4 && magic.starts_with(bytes) {
            CodecError::Truncated(format!("{} bytes, not even the magic", bytes.len()))
        } else {
            CodecError::BadMagic
        });
    }
    if bytes.len() < PREAMBLE {
        return Err(CodecError::Truncated(format!(
            "{} bytes, preamble needs {PREAMBLE}",
            bytes.len()
        )));
    }
    if bytes[4] != version {
        return Err(CodecError::Version {
            found: bytes[4],
            supported: version,
        });
    }
    let header_len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if header_len > limits.max_header {
        return Err(CodecError::TooLarge {
            what: header_what,
            size: header_len as u64,
            limit: limits.max_header as u64,
        });
    }
    let rest = &bytes[PREAMBLE..];
    if rest.len() < header_len {
        return Err(CodecError::Truncated(format!(
            "header declares {header_len} bytes, {} remain",
            rest.len()
        )));
    }
    Ok(rest.split_at(header_len))
}

/// Reads and validates the header only (cheap; no decompression).
pub fn decode_header<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<(FrameHeader, &'a [u8]), CodecError> {
    let (cbor, payload) = split_preamble(bytes, &MAGIC, VERSION, "frame", "header", limits)?;
    let header = crate::header::from_cbor(cbor)?;
    validate_header(&header, limits)?;
    Ok((header, payload))
}

fn validate_header(h: &FrameHeader, limits: &Limits) -> Result<(), CodecError> {
    h.scheme.validate()?;
    let len = h.len as usize;
    if len > limits.max_elements {
        return Err(CodecError::TooLarge {
            what: "tensor",
            size: len as u64,
            limit: limits.max_elements as u64,
        });
    }
    if h.raw_len as usize > limits.max_payload {
        return Err(CodecError::TooLarge {
            what: "decompressed payload",
            size: u64::from(h.raw_len),
            limit: limits.max_payload as u64,
        });
    }
    let (count, index_bytes) = match h.sparse {
        Some(s) => {
            if s.count as usize > len {
                return Err(CodecError::Invalid(format!(
                    "{} sparse values in a tensor of {len}",
                    s.count
                )));
            }
            (s.count as usize, s.index_bytes as usize)
        }
        None => (len, 0),
    };
    let expected = index_bytes as u64 + h.scheme.payload_len(count) as u64;
    if expected != u64::from(h.raw_len) {
        return Err(CodecError::Invalid(format!(
            "header declares a {}-byte payload, its sections need {expected}",
            h.raw_len
        )));
    }
    if h.scales.len() != h.scheme.scale_count(count) {
        return Err(CodecError::Invalid(format!(
            "{:?} for {count} values needs {} scales, header has {}",
            h.scheme,
            h.scheme.scale_count(count),
            h.scales.len()
        )));
    }
    Ok(())
}

/// Decodes and validates a whole frame.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Frame, CodecError> {
    decode_reusing(bytes, limits, Vec::new())
}

/// [`decode`], reusing `spare`'s allocation for dense values.
pub fn decode_reusing(bytes: &[u8], limits: &Limits, spare: Vec<f32>) -> Result<Frame, CodecError> {
    let (header, payload) = decode_header(bytes, limits)?;
    let raw_len = header.raw_len as usize;
    let raw = match header.compression {
        Compression::None => {
            if payload.len() != raw_len {
                return Err(CodecError::Truncated(format!(
                    "payload of {} bytes, header declares {raw_len}",
                    payload.len()
                )));
            }
            std::borrow::Cow::Borrowed(payload)
        }
        Compression::Zstd => {
            // The capacity is the declared size (already under the limit): a payload that
            // expands beyond it is an error, not an allocation.
            let out = zstd::bulk::decompress(payload, raw_len)
                .map_err(|e| CodecError::Compression(e.to_string()))?;
            if out.len() != raw_len {
                return Err(CodecError::Compression(format!(
                    "payload expands to {} bytes, header declares {raw_len}",
                    out.len()
                )));
            }
            std::borrow::Cow::Owned(out)
        }
    };
    let len = header.len as usize;
    let update = match header.sparse {
        Some(s) => {
            let (idx, vals) = raw.split_at(s.index_bytes as usize);
            let indices = decode_indices(s.encoding, idx, s.count as usize, len)?;
            let values = dequantize(&header.scheme, &header.scales, vals, s.count as usize)?;
            Update::Sparse { indices, values }
        }
        None => Update::Dense(dequantize_reusing(
            &header.scheme,
            &header.scales,
            &raw,
            len,
            spare,
        )?),
    };
    Ok(Frame { header, update })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::DitherRng;
    use proptest::prelude::*;

    fn meta() -> FrameMeta {
        FrameMeta {
            sender: "us-east".into(),
            clock: 42,
            tensor: 3,
        }
    }

    /// A dense update encoded from a borrowed slice is the same frame, the same decoded
    /// values and the same dither stream as the owned update's.
    #[test]
    fn encode_dense_is_encode_of_a_dense_update() {
        let values: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        for quantizer in [
            Quantizer::uniform(8),
            Quantizer::terngrad(),
            Quantizer::Fp32,
        ] {
            let opts = EncodeOptions {
                quantizer,
                zstd_level: None,
            };
            let (mut r1, mut r2) = (DitherRng::new(5), DitherRng::new(5));
            let owned = encode(
                &meta(),
                values.len(),
                &Update::Dense(values.clone()),
                &opts,
                &mut r1,
            )
            .unwrap();
            let borrowed = encode_dense(&meta(), &values, &opts, &mut r2, Vec::new()).unwrap();
            assert_eq!(owned, borrowed, "{quantizer:?}");
            assert_eq!(r1.state(), r2.state());
        }
    }

    fn opts(quantizer: Quantizer, zstd_level: Option<i32>) -> EncodeOptions {
        EncodeOptions {
            quantizer,
            zstd_level,
        }
    }

    fn quantizers() -> impl Strategy<Value = Quantizer> {
        prop_oneof![
            Just(Quantizer::Fp32),
            Just(Quantizer::Fp16),
            Just(Quantizer::Bf16),
            Just(Quantizer::Sign),
            Just(Quantizer::TernGrad { clip_sigma: None }),
            (1u8..=8, 1u32..300).prop_map(|(bits, bucket)| Quantizer::Uniform {
                bits,
                bucket,
                clip_sigma: None
            }),
        ]
    }

    proptest! {
        #[test]
        fn decoding_yields_exactly_what_the_encoder_reported(
            x in proptest::collection::vec(crate::test_strategies::uniform(-5.0, 5.0), 1..500),
            q in quantizers(),
            zstd in prop_oneof![Just(None), Just(Some(1)), Just(Some(3))],
            keep_every in 1usize..20,
            sparse in any::<bool>(),
        ) {
            let update = if sparse {
                let indices: Vec<u32> = (0..x.len() as u32).step_by(keep_every).collect();
                let values = indices.iter().map(|&i| x[i as usize]).collect();
                Update::Sparse { indices, values }
            } else {
                Update::Dense(x.clone())
            };
            let enc = encode(&meta(), x.len(), &update, &opts(q, zstd), &mut DitherRng::new(1)).unwrap();
            let frame = decode(&enc.bytes, &Limits::default()).unwrap();
            prop_assert_eq!(&frame.update, &enc.decoded);
            prop_assert_eq!(frame.header.sender.as_str(), "us-east");
            prop_assert_eq!(frame.header.clock, 42);
            if q == Quantizer::Fp32 {
                let mut a = vec![0.0; x.len()];
                let mut b = vec![0.0; x.len()];
                update.add_to(&mut a, 1.0);
                frame.update.add_to(&mut b, 1.0);
                prop_assert_eq!(a, b, "fp32 must be lossless");
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, &Limits::default());
            let mut framed = MAGIC.to_vec();
            framed.push(VERSION);
            framed.extend((bytes.len() as u32).to_le_bytes());
            framed.extend(&bytes);
            let _ = decode(&framed, &Limits::default());
        }

        #[test]
        fn every_truncation_or_bit_flip_is_an_error_or_a_valid_frame(cut in 0usize..200, flip in 0usize..2000) {
            let x: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
            let enc = encode(&meta(), 100, &Update::Dense(x), &opts(Quantizer::uniform(4), Some(3)), &mut DitherRng::new(0)).unwrap();
            let cut = cut.min(enc.bytes.len() - 1);
            prop_assert!(decode(&enc.bytes[..cut], &Limits::default()).is_err());
            let mut flipped = enc.bytes.clone();
            let at = flip % flipped.len();
            flipped[at] ^= 1 << (flip % 8);
            let _ = decode(&flipped, &Limits::default());
        }
    }

    #[test]
    fn sparse_is_chosen_only_when_smaller() {
        let x = vec![1.0f32; 1000];
        let few = Update::Sparse {
            indices: vec![3, 500],
            values: vec![1.0, 2.0],
        };
        let enc = encode(
            &meta(),
            1000,
            &few,
            &opts(Quantizer::Fp32, None),
            &mut DitherRng::new(0),
        )
        .unwrap();
        assert!(matches!(enc.decoded, Update::Sparse { .. }));
        let all = Update::Sparse {
            indices: (0..1000).collect(),
            values: x,
        };
        let enc = encode(
            &meta(),
            1000,
            &all,
            &opts(Quantizer::uniform(2), None),
            &mut DitherRng::new(0),
        )
        .unwrap();
        assert!(matches!(enc.decoded, Update::Dense(_)));
        let h = decode(&enc.bytes, &Limits::default()).unwrap().header;
        assert_eq!(h.raw_len, 250, "1000 values × 2 bits, no index section");
    }

    #[test]
    fn admitted_tensors_encode_within_the_limits_at_their_worst() {
        let limits = Limits {
            max_header: 256,
            max_frame: 256 + PREAMBLE + zstd::zstd_safe::compress_bound(4 * 1000),
            max_payload: 1 << 20,
            max_elements: 1 << 20,
        };
        assert!(limits.admits_tensor(1000));
        assert!(!limits.admits_tensor(1001));
        assert!(!Limits::default().admits_tensor(usize::MAX));
        // The worst plan for an admitted tensor: every element at fp32, and a sparse
        // selection of all but one (sent dense, being no smaller).
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 1e-3 - 0.5).collect();
        let worst = [
            Update::Dense(x.clone()),
            Update::Sparse {
                indices: (1..1000).collect(),
                values: x[1..].to_vec(),
            },
        ];
        for update in &worst {
            for zstd_level in [None, Some(1), Some(19)] {
                let enc = encode(
                    &meta(),
                    1000,
                    update,
                    &opts(Quantizer::Fp32, zstd_level),
                    &mut DitherRng::new(0),
                )
                .unwrap();
                assert!(enc.bytes.len() <= limits.max_frame, "{}", enc.bytes.len());
                decode(&enc.bytes, &limits).unwrap();
            }
        }
    }

    #[test]
    fn zstd_bombs_and_oversized_declarations_are_refused() {
        // A real frame whose header claims a small payload but whose zstd data expands far beyond.
        let zeros = vec![0u8; 10 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        let header = FrameHeader {
            sender: "x".into(),
            clock: 0,
            tensor: 0,
            len: 400,
            scheme: Scheme::Fp32,
            scales: vec![],
            sparse: None,
            raw_len: 1600,
            compression: Compression::Zstd,
        };
        let frame = assemble(&header, &bomb).unwrap();
        let err = decode(&frame, &Limits::default()).unwrap_err();
        assert!(matches!(err, CodecError::Compression(_)), "{err}");

        let tight = Limits {
            max_payload: 1000,
            ..Limits::default()
        };
        let err = decode(&frame, &tight).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::TooLarge {
                    what: "decompressed payload",
                    ..
                }
            ),
            "{err}"
        );
        let tight = Limits {
            max_frame: 100,
            ..Limits::default()
        };
        assert!(matches!(
            decode(&frame, &tight).unwrap_err(),
            CodecError::TooLarge { what: "frame", .. }
        ));
        let tight = Limits {
            max_header: 10,
            ..Limits::default()
        };
        assert!(matches!(
            decode(&frame, &tight).unwrap_err(),
            CodecError::TooLarge { what: "header", .. }
        ));
    }

    /// The frames the fuzzer starts from (`fuzz/seeds/frame_decode`), one per kind the fuzz
    /// README lists. The test fails when a seed is no longer what the encoder writes, so a
    /// format change must bring them along; `WEIGHTGRAD_WRITE_SEEDS=1` rewrites them.
    #[test]
    fn the_fuzz_seeds_are_what_the_encoder_writes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame_decode");
        let meta = |sender: &str, clock, tensor| FrameMeta {
            sender: sender.into(),
            clock,
            tensor,
        };
        let ramp: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
            .collect();
        let sparse = |indices: Vec<u32>, values: Vec<f32>| Update::Sparse { indices, values };
        let cases = [
            (
                "dense_fp32",
                meta("us-east", 5, 0),
                4,
                Update::Dense(vec![1.0, -2.0, 0.5, 3.0]),
                Quantizer::Fp32,
                None,
            ),
            (
                "dense_fp16",
                meta("us-east", 5, 1),
                2,
                Update::Dense(vec![1.0, -0.5]),
                Quantizer::Fp16,
                None,
            ),
            (
                "dense_u2",
                meta("eu-west", 9, 2),
                16,
                Update::Dense(ramp[..16].to_vec()),
                Quantizer::Uniform {
                    bits: 2,
                    bucket: 8,
                    clip_sigma: None,
                },
                None,
            ),
            (
                "sparse_varint_u8",
                meta("ap-southeast", 1234, 0),
                100,
                sparse(vec![1, 5, 9], vec![0.1, -0.05, 0.02]),
                Quantizer::uniform(8),
                None,
            ),
            (
                "sparse_bitmap_tern",
                meta("us-east", 2, 3),
                16,
                sparse(vec![0, 1, 4, 15], vec![0.3, -0.2, 0.1, 0.7]),
                Quantizer::TernGrad { clip_sigma: None },
                None,
            ),
            (
                "sign_zstd",
                meta("us-east", 3, 1),
                512,
                Update::Dense(ramp.clone()),
                Quantizer::Sign,
                Some(1),
            ),
            (
                "u4_zstd",
                meta("eu-west", 7, 0),
                400,
                Update::Dense(vec![0.01; 400]),
                Quantizer::uniform(4),
                Some(1),
            ),
        ];
        let write = std::env::var_os("WEIGHTGRAD_WRITE_SEEDS").is_some();
        let mut rng = DitherRng::new(7);
        for (name, meta, len, update, quantizer, zstd_level) in cases {
            let opts = EncodeOptions {
                quantizer,
                zstd_level,
            };
            let enc = encode(&meta, len, &update, &opts, &mut rng).unwrap();
            assert!(decode(&enc.bytes, &Limits::default()).is_ok(), "{name}");
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &enc.bytes).unwrap();
            }
            let seed = std::fs::read(&path).unwrap_or_default();
            assert!(
                seed == enc.bytes,
                "{name}: rerun with WEIGHTGRAD_WRITE_SEEDS=1"
            );
        }
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            7,
            "a seed without a case"
        );
    }

    #[test]
    fn preamble_errors_are_specific() {
        assert!(matches!(
            decode(b"WG", &Limits::default()),
            Err(CodecError::Truncated(_))
        ));
        assert!(matches!(
            decode(b"HTTP/1.1", &Limits::default()),
            Err(CodecError::BadMagic)
        ));
        // Version 1 wrote the header as a map; its frames are refused by version, not misread.
        assert!(matches!(
            decode(b"WGRD\x01\0\0\0\0", &Limits::default()),
            Err(CodecError::Version {
                found: 1,
                supported: 2
            })
        ));
        assert!(matches!(
            decode(b"WGRD\x02\x05\0\0\0ab", &Limits::default()),
            Err(CodecError::Truncated(_))
        ));
    }

    #[test]
    fn inconsistent_headers_are_invalid() {
        let x = vec![1.0f32; 8];
        let enc = encode(
            &meta(),
            8,
            &Update::Dense(x),
            &opts(Quantizer::uniform(2), None),
            &mut DitherRng::new(0),
        )
        .unwrap();
        let (mut h, payload) = decode_header(&enc.bytes, &Limits::default()).unwrap();
        let payload = payload.to_vec();
        h.len = 9;
        let frame = assemble(&h, &payload).unwrap();
        assert!(matches!(
            decode(&frame, &Limits::default()),
            Err(CodecError::Invalid(_))
        ));
    }
}
