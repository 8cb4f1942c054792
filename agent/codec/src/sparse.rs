//! Sparse index sets: delta + LEB128 varint, or a bitmap, whichever is smaller.

use crate::error::CodecError;
use serde::{Deserialize, Serialize};

/// How a set of indices into a tensor of `len` elements is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IndexEncoding {
    /// Gaps between successive indices (the first from 0), each as an LEB128 varint.
    DeltaVarint,
    /// One bit per element, least-significant first.
    Bitmap,
}

fn varint_len(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Encoded size of `indices` (strictly increasing) with delta varints.
pub fn delta_varint_len(indices: &[u32]) -> usize {
    let mut prev = 0u32;
    indices
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let gap = if k == 0 { i } else { i - prev - 1 };
            prev = i;
            varint_len(gap)
        })
        .sum()
}

/// Encodes strictly increasing `indices` (all `< len`) in the smaller of the two encodings.
pub fn encode_indices(indices: &[u32], len: usize) -> (IndexEncoding, Vec<u8>) {
    let bitmap_len = len.div_ceil(8);
    if delta_varint_len(indices) <= bitmap_len {
        let mut out = Vec::with_capacity(delta_varint_len(indices));
        let mut prev = 0u32;
        for (k, &i) in indices.iter().enumerate() {
            let mut gap = if k == 0 { i } else { i - prev - 1 };
            prev = i;
            while gap >= 0x80 {
                out.push((gap as u8) | 0x80);
                gap >>= 7;
            }
            out.push(gap as u8);
        }
        (IndexEncoding::DeltaVarint, out)
    } else {
        let mut out = vec![0u8; bitmap_len];
        for &i in indices {
            out[i as usize / 8] |= 1 << (i % 8);
        }
        (IndexEncoding::Bitmap, out)
    }
}

/// Decodes exactly `count` indices, checking that they increase strictly and stay `< len`.
pub fn decode_indices(
    enc: IndexEncoding,
    bytes: &[u8],
    count: usize,
    len: usize,
) -> Result<Vec<u32>, CodecError> {
    if count > len {
        return Err(CodecError::Invalid(format!(
            "{count} indices into a tensor of {len}"
        )));
    }
    let mut out = Vec::with_capacity(count);
    match enc {
        IndexEncoding::DeltaVarint => {
            let mut pos = 0usize;
            let mut next = 0u64;
            for _ in 0..count {
                let mut gap = 0u64;
                let mut shift = 0u32;
                loop {
                    let Some(&b) = bytes.get(pos) else {
                        return Err(CodecError::Invalid("index varints end early".into()));
                    };
                    pos += 1;
                    if shift >= 35 {
                        return Err(CodecError::Invalid(
                            "index varint longer than 5 bytes".into(),
                        ));
                    }
                    gap |= u64::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                let i = next + gap;
                if i >= len as u64 {
                    return Err(CodecError::Invalid(format!(
                        "index {i} out of range for {len} elements"
                    )));
                }
                out.push(i as u32);
                next = i + 1;
            }
            if pos != bytes.len() {
                return Err(CodecError::Invalid(format!(
                    "{} bytes after the last index",
                    bytes.len() - pos
                )));
            }
        }
        IndexEncoding::Bitmap => {
            if bytes.len() != len.div_ceil(8) {
                return Err(CodecError::Invalid(format!(
                    "bitmap of {} bytes for {len} elements (need {})",
                    bytes.len(),
                    len.div_ceil(8)
                )));
            }
            for (byte_no, &b) in bytes.iter().enumerate() {
                let mut bits = b;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as usize;
                    let i = byte_no * 8 + bit;
                    if i >= len {
                        return Err(CodecError::Invalid(format!(
                            "bitmap sets index {i} beyond {len} elements"
                        )));
                    }
                    out.push(i as u32);
                    bits &= bits - 1;
                }
            }
            if out.len() != count {
                return Err(CodecError::Invalid(format!(
                    "bitmap holds {} indices, header says {count}",
                    out.len()
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index_set() -> impl Strategy<Value = (Vec<u32>, usize)> {
        (1usize..5000).prop_flat_map(|len| {
            (
                proptest::collection::btree_set(0..len as u32, 0..len.min(400)),
                Just(len),
            )
                .prop_map(|(s, len)| (s.into_iter().collect(), len))
        })
    }

    proptest! {
        #[test]
        fn round_trips_and_picks_the_smaller((idx, len) in index_set()) {
            let (enc, bytes) = encode_indices(&idx, len);
            prop_assert_eq!(bytes.len(), delta_varint_len(&idx).min(len.div_ceil(8)));
            prop_assert_eq!(decode_indices(enc, &bytes, idx.len(), len).unwrap(), idx);
        }
    }

    #[test]
    fn dense_sets_use_a_bitmap_sparse_ones_varints() {
        let all: Vec<u32> = (0..1000).collect();
        assert_eq!(encode_indices(&all, 1000).0, IndexEncoding::Bitmap);
        assert_eq!(
            encode_indices(&[5, 900], 1000).0,
            IndexEncoding::DeltaVarint
        );
    }

    #[test]
    fn malformed_indices_are_errors() {
        assert!(
            decode_indices(IndexEncoding::DeltaVarint, &[10], 1, 5).is_err(),
            "out of range"
        );
        assert!(
            decode_indices(IndexEncoding::DeltaVarint, &[0x80], 1, 5).is_err(),
            "truncated"
        );
        assert!(
            decode_indices(IndexEncoding::DeltaVarint, &[0x80; 7], 1, 1 << 30).is_err(),
            "overlong"
        );
        assert!(
            decode_indices(IndexEncoding::DeltaVarint, &[0, 0], 1, 5).is_err(),
            "trailing"
        );
        assert!(
            decode_indices(IndexEncoding::Bitmap, &[0xff], 8, 5).is_err(),
            "beyond len"
        );
        assert!(
            decode_indices(IndexEncoding::Bitmap, &[0x01], 2, 5).is_err(),
            "count"
        );
        assert!(
            decode_indices(IndexEncoding::Bitmap, &[0x01], 9, 5).is_err(),
            "count > len"
        );
    }
}
