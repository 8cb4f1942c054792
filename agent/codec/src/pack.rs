//! Exact bit packing: `bits` bits a value, least-significant first, padding only in the last byte.

use crate::error::CodecError;

/// Bytes needed to hold `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * usize::from(bits)).div_ceil(8)
}

/// Appends `codes` (each `< 2^bits`, `1 <= bits <= 8`) to `out`, packed.
pub fn pack_into(codes: &[u8], bits: u8, out: &mut Vec<u8>) {
    debug_assert!((1..=8).contains(&bits));
    let start = out.len();
    out.reserve(packed_len(codes.len(), bits));
    match bits {
        8 => out.extend_from_slice(codes),
        1 | 2 | 4 => {
            let per = 8 / usize::from(bits);
            let mut chunks = codes.chunks_exact(per);
            for c in &mut chunks {
                let mut b = 0u8;
                for (i, &v) in c.iter().enumerate() {
                    b |= v << (i * usize::from(bits));
                }
                out.push(b);
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut b = 0u8;
                for (i, &v) in rest.iter().enumerate() {
                    b |= v << (i * usize::from(bits));
                }
                out.push(b);
            }
        }
        _ => {
            let mut acc = 0u64;
            let mut filled = 0u32;
            for &v in codes {
                acc |= u64::from(v) << filled;
                filled += u32::from(bits);
                if filled >= 32 {
                    out.extend_from_slice(&(acc as u32).to_le_bytes());
                    acc >>= 32;
                    filled -= 32;
                }
            }
            while filled > 0 {
                out.push(acc as u8);
                acc >>= 8;
                filled = filled.saturating_sub(8);
            }
        }
    }
    debug_assert_eq!(out.len() - start, packed_len(codes.len(), bits));
}

/// Packs `codes` into a new buffer.
pub fn pack(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut out = Vec::new();
    pack_into(codes, bits, &mut out);
    out
}

/// Packs codes arriving in pieces as one continuous bit stream (padding only at the end).
#[derive(Debug)]
pub struct BitWriter {
    bits: u8,
    acc: u64,
    filled: u32,
    out: Vec<u8>,
}

impl BitWriter {
    /// A writer for `bits`-bit codes with room for `capacity` values.
    pub fn new(bits: u8, capacity: usize) -> Self {
        debug_assert!((1..=8).contains(&bits));
        Self {
            bits,
            acc: 0,
            filled: 0,
            out: Vec::with_capacity(packed_len(capacity, bits)),
        }
    }

    /// Appends codes, each `< 2^bits`.
    pub fn extend(&mut self, mut codes: &[u8]) {
        if self.filled == 0 && 8 % self.bits == 0 {
            // Byte-aligned: pack whole bytes on the fast path.
            let per = usize::from(8 / self.bits);
            let whole = codes.len() / per * per;
            pack_into(&codes[..whole], self.bits, &mut self.out);
            codes = &codes[whole..];
        }
        for &v in codes {
            self.acc |= u64::from(v) << self.filled;
            self.filled += u32::from(self.bits);
            if self.filled >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.filled -= 8;
            }
        }
    }

    /// The packed bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Unpacks exactly `count` values of `bits` bits; `bytes` must be exactly [`packed_len`] long.
pub fn unpack(bytes: &[u8], bits: u8, count: usize) -> Result<Vec<u8>, CodecError> {
    if !(1..=8).contains(&bits) {
        return Err(CodecError::Invalid(format!(
            "{bits} bits per value is not in 1..=8"
        )));
    }
    let need = packed_len(count, bits);
    if bytes.len() != need {
        return Err(CodecError::Invalid(format!(
            "{count} values of {bits} bits need {need} bytes, got {}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    match bits {
        8 => out.extend_from_slice(bytes),
        1 | 2 | 4 => {
            let per = 8 / usize::from(bits);
            let mask = (1u8 << bits) - 1;
            for &b in bytes {
                for i in 0..per {
                    out.push((b >> (i * usize::from(bits))) & mask);
                }
            }
            out.truncate(count);
        }
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut acc = 0u64;
            let mut filled = 0u32;
            let mut it = bytes.iter();
            for _ in 0..count {
                while filled < u32::from(bits) {
                    // Length was checked above, so the iterator cannot run dry here.
                    acc |= u64::from(*it.next().unwrap_or(&0)) << filled;
                    filled += 8;
                }
                out.push((acc & mask) as u8);
                acc >>= bits;
                filled -= u32::from(bits);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_exactly(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let codes: Vec<u8> = raw.iter().map(|v| if bits == 8 { *v } else { v & ((1 << bits) - 1) }).collect();
            let packed = pack(&codes, bits);
            prop_assert_eq!(packed.len(), packed_len(codes.len(), bits));
            prop_assert_eq!(unpack(&packed, bits, codes.len()).unwrap(), codes);
        }
    }

    proptest! {
        #[test]
        fn bit_writer_matches_one_shot_packing(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300), cuts in proptest::collection::vec(0usize..300, 0..6)) {
            let codes: Vec<u8> = raw.iter().map(|v| if bits == 8 { *v } else { v & ((1 << bits) - 1) }).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(codes.len())).collect();
            cuts.sort_unstable();
            let mut w = BitWriter::new(bits, codes.len());
            let mut start = 0;
            for c in cuts.into_iter().chain([codes.len()]) {
                w.extend(&codes[start..c]);
                start = c;
            }
            prop_assert_eq!(w.finish(), pack(&codes, bits));
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        assert_eq!(pack(&[1, 2, 3, 0, 1], 2), vec![0b00_11_10_01, 0b01]);
        assert_eq!(pack(&[0b101, 0b011, 0b111], 3), vec![0b11_011_101, 0b1]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(unpack(&[0, 0, 0], 3, 3).is_err());
        assert!(unpack(&[0], 3, 3).is_err());
        assert!(unpack(&[0], 0, 3).is_err());
        assert!(unpack(&[0], 9, 1).is_err());
    }
}
