//! What regions send each other: update frames, and the end-of-round marker that announces
//! how many frames a round produced (so a receiver knows when the round is complete).
//!
//! Markers and notices are their magic followed by a CBOR array of their fields in
//! declaration order (no field names: a marker crosses every link every round).

use weightgrad_codec::CodecError;

/// First four bytes of an end-of-round marker.
pub const ROUND_END_MAGIC: [u8; 4] = *b"WGRE";
/// Largest encoded marker accepted.
const MAX_ROUND_END: usize = 1024;

/// "Round `clock` of `sender` is over; it sent `frames` update frames on this link."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundEnd {
    /// Sending region.
    pub sender: String,
    /// The round that ended.
    pub clock: u64,
    /// Update frames sent on this link for that round.
    pub frames: u32,
}

/// First four bytes of a resume notice.
pub const RESUMED_MAGIC: [u8; 4] = *b"WGRS";

/// "`sender` restarted from `source`'s snapshot taken after round `after`": its rounds up
/// to `after` will never be sent, and what it holds is what `source` held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// The region that resumed.
    pub sender: String,
    /// The snapshot's round.
    pub after: u64,
    /// The region whose snapshot it took.
    pub source: String,
}

/// A message on one WAN link.
#[derive(Debug, Clone, PartialEq)]
pub enum WanMessage {
    /// An update frame (see `weightgrad_codec::frame`).
    Frame(Vec<u8>),
    /// End of a round.
    RoundEnd(RoundEnd),
    /// The sender resumed from a snapshot.
    Resumed(Resumed),
}

fn small_cbor<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    body: &[u8],
) -> Result<T, CodecError> {
    if bytes.len() > MAX_ROUND_END {
        return Err(CodecError::TooLarge {
            what,
            size: bytes.len() as u64,
            limit: MAX_ROUND_END as u64,
        });
    }
    let mut cursor = std::io::Cursor::new(body);
    let r: T = ciborium::from_reader(&mut cursor)
        .map_err(|e| CodecError::Header(format!("{what}: {e}")))?;
    if cursor.position() as usize != body.len() {
        return Err(CodecError::Header(format!("bytes after the {what}")));
    }
    Ok(r)
}

impl WanMessage {
    /// The bytes that cross the link.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Frame(b) => b.clone(),
            Self::RoundEnd(r) => {
                let mut out = ROUND_END_MAGIC.to_vec();
                let wire = (&r.sender, r.clock, r.frames);
                ciborium::into_writer(&wire, &mut out).expect("writing to a Vec cannot fail");
                out
            }
            Self::Resumed(r) => {
                let mut out = RESUMED_MAGIC.to_vec();
                let wire = (&r.sender, r.after, &r.source);
                ciborium::into_writer(&wire, &mut out).expect("writing to a Vec cannot fail");
                out
            }
        }
    }

    /// Size on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Self::Frame(b) => b.len(),
            Self::RoundEnd(_) | Self::Resumed(_) => self.to_bytes().len(),
        }
    }

    /// Parses bytes from a link: a marker or notice if it starts with its magic, else a
    /// frame (validated later by the frame decoder).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        let message = Self::parse(bytes)?;
        // serde reads three items whatever length the array declares: only the encoding
        // `to_bytes` writes is accepted, so one marker has one form.
        if !matches!(message, Self::Frame(_)) && message.to_bytes() != bytes {
            return Err(CodecError::Header(
                "marker or notice not in canonical form".into(),
            ));
        }
        Ok(message)
    }

    fn parse(bytes: &[u8]) -> Result<Self, CodecError> {
        if let Some(body) = bytes.strip_prefix(&ROUND_END_MAGIC[..]) {
            return small_cbor("round-end marker", bytes, body).map(|(sender, clock, frames)| {
                Self::RoundEnd(RoundEnd {
                    sender,
                    clock,
                    frames,
                })
            });
        }
        if let Some(body) = bytes.strip_prefix(&RESUMED_MAGIC[..]) {
            return small_cbor("resume notice", bytes, body).map(|(sender, after, source)| {
                Self::Resumed(Resumed {
                    sender,
                    after,
                    source,
                })
            });
        }
        Ok(Self::Frame(bytes.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_end_round_trips_and_rejects_junk() {
        let m = WanMessage::RoundEnd(RoundEnd {
            sender: "eu-west".into(),
            clock: 7,
            frames: 3,
        });
        assert_eq!(WanMessage::from_bytes(&m.to_bytes()).unwrap(), m);
        // Magic, a 3-array, the 7-byte name with its length, two small integers.
        assert_eq!(m.wire_len(), 4 + 1 + 8 + 1 + 1);
        assert!(WanMessage::from_bytes(b"WGRE\xff\xff").is_err());
        let mut long = m.to_bytes();
        long.push(0);
        assert!(WanMessage::from_bytes(&long).is_err());
        let big = [&ROUND_END_MAGIC[..], &[0u8; 2000][..]].concat();
        assert!(WanMessage::from_bytes(&big).is_err());
        let r = WanMessage::Resumed(Resumed {
            sender: "ap-southeast".into(),
            after: 400,
            source: "us-east".into(),
        });
        assert_eq!(WanMessage::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(WanMessage::from_bytes(b"WGRS\x01").is_err());
        // One form each: a wrong declared length or an indefinite array is refused.
        let good = m.to_bytes();
        assert_eq!(good[4], 0x83);
        for bad in [
            [&good[..4], &[0x84], &good[5..]].concat(),
            [&good[..4], &[0x9f], &good[5..]].concat(),
            [&good[..4], &[0x9f], &good[5..], &[0xff]].concat(),
        ] {
            let err = WanMessage::from_bytes(&bad).unwrap_err().to_string();
            assert!(err.contains("canonical") || err.contains("after"), "{err}");
        }
    }
}
