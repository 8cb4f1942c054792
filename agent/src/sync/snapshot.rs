//! A region's state handed to a peer that rejoins without its own: the weights, the round
//! they are from, and which rounds of every region they already hold. Encoded as magic,
//! then zstd-compressed CBOR, with a hard limit on the decompressed size.

use serde::{Deserialize, Serialize};

/// First four bytes of a snapshot.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"WGSN";

/// What a rejoining region adopts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The region that served it.
    pub source: String,
    /// Its finished rounds.
    pub round: u64,
    /// Its model manifest hash.
    pub manifest: String,
    /// For every other region, the rounds whose updates the weights hold.
    pub complete: Vec<(String, u64)>,
    /// The weights, per tensor.
    pub weights: Vec<Vec<f32>>,
}

/// Decompresses a zstd stream of at most `limit` bytes, growing the buffer as data comes
/// (a declared size is not trusted, and nothing is reserved up front).
pub fn decompress_within(body: &[u8], limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(body)?
        .take(limit as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::other(format!("more than {limit} bytes")));
    }
    Ok(out)
}

/// Encodes a snapshot.
pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let mut cbor = Vec::new();
    ciborium::into_writer(s, &mut cbor).expect("writing to a Vec cannot fail");
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.extend(zstd::bulk::compress(&cbor, 1).expect("compressing in memory"));
    out
}

/// Decodes a snapshot of at most `max_bytes` decompressed.
pub fn decode_snapshot(bytes: &[u8], max_bytes: usize) -> Result<Snapshot, String> {
    let body = bytes
        .strip_prefix(&SNAPSHOT_MAGIC[..])
        .ok_or("not a weightgrad snapshot (bad magic)")?;
    let cbor = decompress_within(body, max_bytes)
        .map_err(|e| format!("snapshot does not decompress within {max_bytes} bytes: {e}"))?;
    let mut cursor = std::io::Cursor::new(&cbor[..]);
    let s: Snapshot = ciborium::from_reader(&mut cursor).map_err(|e| format!("snapshot: {e}"))?;
    if cursor.position() as usize != cbor.len() {
        return Err("bytes after the snapshot".into());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_junk_and_bombs() {
        let s = Snapshot {
            source: "us-east".into(),
            round: 12,
            manifest: "abc".into(),
            complete: vec![("eu-west".into(), 11)],
            weights: vec![vec![1.0, -2.5], vec![0.0; 1000]],
        };
        let b = encode_snapshot(&s);
        assert_eq!(decode_snapshot(&b, 1 << 20).unwrap(), s);
        assert!(decode_snapshot(&b, 100).unwrap_err().contains("decompress"));
        assert!(decode_snapshot(b"WGSNjunk", 1 << 20).is_err());
        assert!(
            decode_snapshot(b"nope", 1 << 20)
                .unwrap_err()
                .contains("magic")
        );
    }
}
