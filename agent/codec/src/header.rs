//! The frame header's wire form: one CBOR array, fields by position, enums as small
//! integers.
//!
//! ```text
//! [sender, clock, tensor, len, [scheme kind, bits, bucket], [scales…],
//!  null | [index encoding, count, index bytes], raw_len, compression]
//! ```
//!
//! Scheme kinds: 0 fp32, 1 fp16, 2 bf16, 3 uniform (the only kind with non-zero bits and
//! bucket), 4 ternary, 5 sign. Index encodings: 0 delta varint, 1 bitmap. Compression:
//! 0 none, 1 zstd. Without field names a header costs about 40 bytes plus 5 per scale
//! against about 165 plus 5 per scale as a map, which matters on the WAN, where a round's
//! frames are often only a few hundred bytes. Only this exact encoding is read.

use crate::error::CodecError;
use crate::frame::{Compression, FrameHeader, SparseHeader};
use crate::quant::Scheme;
use crate::sparse::IndexEncoding;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Outgoing<'a>(
    &'a str,
    u64,
    u32,
    u32,
    WireScheme,
    &'a [f32],
    Option<WireSparse>,
    u32,
    u8,
);

#[derive(Deserialize)]
struct Incoming(
    String,
    u64,
    u32,
    u32,
    WireScheme,
    Vec<f32>,
    Option<WireSparse>,
    u32,
    u8,
);

#[derive(Serialize, Deserialize)]
struct WireScheme(u8, u8, u32);

#[derive(Serialize, Deserialize)]
struct WireSparse(u8, u32, u32);

fn scheme_to_wire(s: &Scheme) -> WireScheme {
    match *s {
        Scheme::Fp32 => WireScheme(0, 0, 0),
        Scheme::Fp16 => WireScheme(1, 0, 0),
        Scheme::Bf16 => WireScheme(2, 0, 0),
        Scheme::Uniform { bits, bucket } => WireScheme(3, bits, bucket),
        Scheme::Ternary => WireScheme(4, 0, 0),
        Scheme::Sign => WireScheme(5, 0, 0),
    }
}

fn scheme_from_wire(w: WireScheme) -> Result<Scheme, CodecError> {
    let WireScheme(kind, bits, bucket) = w;
    let scheme = match kind {
        0 => Scheme::Fp32,
        1 => Scheme::Fp16,
        2 => Scheme::Bf16,
        3 => return Ok(Scheme::Uniform { bits, bucket }),
        4 => Scheme::Ternary,
        5 => Scheme::Sign,
        other => return Err(CodecError::Header(format!("unknown scheme kind {other}"))),
    };
    if bits != 0 || bucket != 0 {
        return Err(CodecError::Header(format!(
            "scheme kind {kind} takes no bits or bucket, header has {bits} and {bucket}"
        )));
    }
    Ok(scheme)
}

/// Writes `h` in its wire form.
pub(crate) fn to_cbor(h: &FrameHeader) -> Result<Vec<u8>, CodecError> {
    let wire = Outgoing(
        &h.sender,
        h.clock,
        h.tensor,
        h.len,
        scheme_to_wire(&h.scheme),
        &h.scales,
        h.sparse.map(|s| {
            let encoding = match s.encoding {
                IndexEncoding::DeltaVarint => 0,
                IndexEncoding::Bitmap => 1,
            };
            WireSparse(encoding, s.count, s.index_bytes)
        }),
        h.raw_len,
        match h.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        },
    );
    let mut out = Vec::new();
    ciborium::into_writer(&wire, &mut out).map_err(|e| CodecError::Header(e.to_string()))?;
    Ok(out)
}

/// Reads a header in its wire form; `cbor` must hold exactly one, encoded exactly as
/// [`to_cbor`] writes it. serde reads a fixed number of array items whatever length the
/// array declares, so without that last check a header with a wrong declared length, an
/// unterminated indefinite array or widened numbers would be accepted as well.
pub(crate) fn from_cbor(cbor: &[u8]) -> Result<FrameHeader, CodecError> {
    let header = parse(cbor)?;
    if to_cbor(&header)? != cbor {
        return Err(CodecError::Header(
            "header is not in canonical form (array lengths, integer and float widths as \
             the encoder writes them)"
                .into(),
        ));
    }
    Ok(header)
}

fn parse(cbor: &[u8]) -> Result<FrameHeader, CodecError> {
    let mut cursor = std::io::Cursor::new(cbor);
    let Incoming(sender, clock, tensor, len, scheme, scales, sparse, raw_len, compression) =
        ciborium::from_reader(&mut cursor).map_err(|e| CodecError::Header(e.to_string()))?;
    if cursor.position() as usize != cbor.len() {
        return Err(CodecError::Header(format!(
            "{} bytes after the CBOR header",
            cbor.len() - cursor.position() as usize
        )));
    }
    let sparse = match sparse {
        None => None,
        Some(WireSparse(encoding, count, index_bytes)) => Some(SparseHeader {
            encoding: match encoding {
                0 => IndexEncoding::DeltaVarint,
                1 => IndexEncoding::Bitmap,
                other => {
                    return Err(CodecError::Header(format!(
                        "unknown index encoding {other}"
                    )));
                }
            },
            count,
            index_bytes,
        }),
    };
    Ok(FrameHeader {
        sender,
        clock,
        tensor,
        len,
        scheme: scheme_from_wire(scheme)?,
        scales,
        sparse,
        raw_len,
        compression: match compression {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(CodecError::Header(format!("unknown compression {other}"))),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schemes() -> impl Strategy<Value = Scheme> {
        prop_oneof![
            Just(Scheme::Fp32),
            Just(Scheme::Fp16),
            Just(Scheme::Bf16),
            Just(Scheme::Ternary),
            Just(Scheme::Sign),
            (any::<u8>(), any::<u32>()).prop_map(|(bits, bucket)| Scheme::Uniform { bits, bucket }),
        ]
    }

    fn headers() -> impl Strategy<Value = FrameHeader> {
        (
            ".{0,20}",
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            schemes(),
            proptest::collection::vec(any::<f32>().prop_filter("NaN", |x| !x.is_nan()), 0..20),
            proptest::option::of((any::<bool>(), any::<u32>(), any::<u32>())),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(
                |(sender, clock, tensor, len, scheme, scales, sparse, raw_len, zstd)| FrameHeader {
                    sender,
                    clock,
                    tensor,
                    len,
                    scheme,
                    scales,
                    sparse: sparse.map(|(bitmap, count, index_bytes)| SparseHeader {
                        encoding: if bitmap {
                            IndexEncoding::Bitmap
                        } else {
                            IndexEncoding::DeltaVarint
                        },
                        count,
                        index_bytes,
                    }),
                    raw_len,
                    compression: if zstd {
                        Compression::Zstd
                    } else {
                        Compression::None
                    },
                },
            )
    }

    proptest! {
        #[test]
        fn every_header_round_trips(h in headers()) {
            let cbor = to_cbor(&h).unwrap();
            prop_assert_eq!(from_cbor(&cbor).unwrap(), h);
        }
    }

    #[test]
    fn a_typical_wan_header_is_small() {
        // A 2-bit sparse update of a 16,384-element tensor with ten buckets' scales.
        let h = FrameHeader {
            sender: "ap-southeast".into(),
            clock: 1234,
            tensor: 0,
            len: 16384,
            scheme: Scheme::Uniform {
                bits: 2,
                bucket: 512,
            },
            scales: vec![0.013; 10],
            sparse: Some(SparseHeader {
                encoding: IndexEncoding::Bitmap,
                count: 4852,
                index_bytes: 2048,
            }),
            raw_len: 3261,
            compression: Compression::Zstd,
        };
        let len = to_cbor(&h).unwrap().len();
        assert!(len <= 40 + 5 * 10, "{len} bytes");
        let mut map = Vec::new();
        ciborium::into_writer(&h, &mut map).unwrap();
        assert!(
            len * 2 < map.len(),
            "{len} bytes against {} as a map",
            map.len()
        );
    }

    #[test]
    fn unknown_codes_and_stray_parameters_are_refused() {
        let good = |scheme: (u8, u8, u32), sparse: u8, compression: u8| {
            let mut out = Vec::new();
            let wire = Outgoing(
                "us-east",
                1,
                0,
                10,
                WireScheme(scheme.0, scheme.1, scheme.2),
                &[1.0],
                Some(WireSparse(sparse, 1, 1)),
                2,
                compression,
            );
            ciborium::into_writer(&wire, &mut out).unwrap();
            from_cbor(&out)
        };
        assert!(good((3, 2, 512), 0, 1).is_ok());
        for (case, why) in [
            (good((6, 0, 0), 0, 1), "unknown scheme kind 6"),
            (good((0, 8, 0), 0, 1), "takes no bits or bucket"),
            (good((3, 2, 512), 2, 1), "unknown index encoding 2"),
            (good((3, 2, 512), 0, 2), "unknown compression 2"),
        ] {
            let err = case.unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn trailing_bytes_and_maps_are_refused() {
        let h = from_cbor(&{
            let mut out = Vec::new();
            ciborium::into_writer(&(1u8,), &mut out).unwrap();
            out
        });
        assert!(h.is_err());
        let mut map = Vec::new();
        ciborium::into_writer(&sample(), &mut map).unwrap();
        assert!(
            from_cbor(&map).is_err(),
            "the version 1 map form is not read"
        );
        let mut trailing = to_cbor(&sample()).unwrap();
        trailing.push(0);
        let err = from_cbor(&trailing).unwrap_err().to_string();
        assert!(err.contains("1 bytes after the CBOR header"), "{err}");
    }

    #[test]
    fn only_the_canonical_encoding_is_read() {
        let good = to_cbor(&sample()).unwrap();
        assert_eq!(good[0], 0x89, "a definite array of nine");
        assert!(from_cbor(&good).is_ok());
        let refused = |bytes: &[u8]| {
            let err = from_cbor(bytes).unwrap_err().to_string();
            assert!(
                err.contains("canonical") || err.contains("after the CBOR header"),
                "{err}"
            );
        };
        // Declares ten items, holds nine.
        refused(&[&[0x8a], &good[1..]].concat());
        // Indefinite length, with and without its break.
        refused(&[&[0x9f], &good[1..]].concat());
        refused(&[&[0x9f], &good[1..], &[0xff]].concat());
        // A scale widened to a double.
        let mut h = sample();
        h.scheme = Scheme::Sign;
        h.scales = vec![0.5];
        let single = to_cbor(&h).unwrap();
        let half = [0xf9, 0x38, 0x00]; // 0.5 as the encoder writes it
        let pos = single.windows(3).position(|w| w == half).unwrap();
        let double = [
            &single[..pos],
            &[0xfb, 0x3f, 0xe0, 0, 0, 0, 0, 0, 0][..],
            &single[pos + 3..],
        ]
        .concat();
        refused(&double);
        // An integer in a wider form than needed (clock 7 as a u16).
        let pos = good.iter().position(|&b| b == 0x07).unwrap();
        refused(&[&good[..pos], &[0x19, 0x00, 0x07][..], &good[pos + 1..]].concat());
    }

    /// A small valid header.
    fn sample() -> FrameHeader {
        FrameHeader {
            sender: "eu-west".into(),
            clock: 7,
            tensor: 1,
            len: 3,
            scheme: Scheme::Fp16,
            scales: vec![],
            sparse: None,
            raw_len: 6,
            compression: Compression::None,
        }
    }
}
