//! The application handshake on every WAN connection, sans-IO: the dialling region sends a
//! [`Hello`] (protocol version, its region name, the hash of its model manifest, its round);
//! the accepting region answers with a [`Verdict`]. A mismatch is refused with a reason that
//! both sides log, and the connection is closed with the refusal's code.

use serde::{Deserialize, Serialize};

/// The WAN protocol version this build speaks. 2: frame headers, markers and notices are
/// positional CBOR arrays (frame version 2); regions on 1 are refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 2;
/// First four bytes of a hello.
const HELLO_MAGIC: [u8; 4] = *b"WGHI";
/// First four bytes of a verdict.
const VERDICT_MAGIC: [u8; 4] = *b"WGHV";
/// Largest encoded hello or verdict accepted.
pub const MAX_HANDSHAKE_BYTES: usize = 4096;

/// What the dialling region says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// WAN protocol version.
    pub protocol: u32,
    /// The dialling region's name (its certificate must carry it).
    pub region: String,
    /// Hash of its model manifest (tensor names and shapes).
    pub manifest: String,
    /// Rounds it has finished.
    pub round: u64,
}

/// The accepting region's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Accepted.
    Welcome {
        /// The accepting region's name.
        region: String,
        /// Rounds it has finished.
        round: u64,
    },
    /// Refused; the connection closes with `code`.
    Refused {
        /// A [`Refusal`] code.
        code: u32,
        /// Why, in words both sides log.
        reason: String,
    },
}

/// Why a hello is refused; the discriminant is the QUIC application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The hello is not a hello.
    Malformed = 1,
    /// Another protocol version.
    Version = 2,
    /// The region is not a configured peer, or its certificate names someone else.
    Identity = 3,
    /// Another model.
    Manifest = 4,
}

/// A refused hello: the code and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// Which check failed.
    pub kind: Refusal,
    /// Why, in words.
    pub reason: String,
}

impl Refused {
    /// The verdict that carries this refusal.
    pub fn verdict(&self) -> Verdict {
        Verdict::Refused {
            code: self.kind as u32,
            reason: self.reason.clone(),
        }
    }
}

/// What the accepting region expects of a hello.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// The accepting region's own name.
    pub region: String,
    /// Configured peer regions.
    pub peers: Vec<String>,
    /// Hash of the accepting region's model manifest.
    pub manifest: String,
}

impl Expectation {
    /// Checks a decoded hello against this region's configuration and the names the
    /// peer's (CA-verified) certificate carries.
    pub fn check(&self, hello: &Hello, cert_names: &[String]) -> Result<(), Refused> {
        let refuse = |kind, reason: String| Err(Refused { kind, reason });
        if hello.protocol != PROTOCOL_VERSION {
            return refuse(
                Refusal::Version,
                format!(
                    "protocol version {} is not {PROTOCOL_VERSION} (region {} runs another \
                     weightgrad release)",
                    hello.protocol, hello.region
                ),
            );
        }
        if !self.peers.contains(&hello.region) {
            return refuse(
                Refusal::Identity,
                format!(
                    "region {:?} is not a configured peer of {} (peers: {})",
                    hello.region,
                    self.region,
                    self.peers.join(", ")
                ),
            );
        }
        if !cert_names.contains(&hello.region) {
            return refuse(
                Refusal::Identity,
                format!(
                    "claims region {:?} but its certificate names {}",
                    hello.region,
                    if cert_names.is_empty() {
                        "nothing".to_string()
                    } else {
                        cert_names.join(", ")
                    }
                ),
            );
        }
        if hello.manifest != self.manifest {
            return refuse(
                Refusal::Manifest,
                format!(
                    "region {} trains another model (manifest {} here, {} there): check \
                     training.model and the data set",
                    hello.region,
                    short(&self.manifest),
                    short(&hello.manifest)
                ),
            );
        }
        Ok(())
    }

    /// Decodes and checks a hello in one go (a malformed one is refused too).
    pub fn admit(&self, bytes: &[u8], cert_names: &[String]) -> Result<Hello, Refused> {
        let hello = decode_hello(bytes).map_err(|reason| Refused {
            kind: Refusal::Malformed,
            reason,
        })?;
        self.check(&hello, cert_names)?;
        Ok(hello)
    }
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

fn encode<T: Serialize>(magic: [u8; 4], value: &T) -> Vec<u8> {
    let mut out = magic.to_vec();
    ciborium::into_writer(value, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    magic: [u8; 4],
    bytes: &[u8],
) -> Result<T, String> {
    if bytes.len() > MAX_HANDSHAKE_BYTES {
        return Err(format!(
            "{what} of {} bytes exceeds the limit of {MAX_HANDSHAKE_BYTES}",
            bytes.len()
        ));
    }
    let Some(body) = bytes.strip_prefix(&magic[..]) else {
        return Err(format!("not a weightgrad {what} (bad magic)"));
    };
    let mut cursor = std::io::Cursor::new(body);
    let value = ciborium::from_reader(&mut cursor).map_err(|e| format!("{what}: {e}"))?;
    if cursor.position() as usize != body.len() {
        return Err(format!("bytes after the {what}"));
    }
    Ok(value)
}

/// Encodes a hello.
pub fn encode_hello(h: &Hello) -> Vec<u8> {
    encode(HELLO_MAGIC, h)
}

/// Decodes a hello, refusing anything malformed or oversized.
pub fn decode_hello(bytes: &[u8]) -> Result<Hello, String> {
    decode("hello", HELLO_MAGIC, bytes)
}

/// Encodes a verdict.
pub fn encode_verdict(v: &Verdict) -> Vec<u8> {
    encode(VERDICT_MAGIC, v)
}

/// Decodes a verdict, refusing anything malformed or oversized.
pub fn decode_verdict(bytes: &[u8]) -> Result<Verdict, String> {
    decode("verdict", VERDICT_MAGIC, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expectation {
        Expectation {
            region: "us-east".into(),
            peers: vec!["eu-west".into(), "ap-southeast".into()],
            manifest: "abcdef0123456789".into(),
        }
    }

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            region: "eu-west".into(),
            manifest: "abcdef0123456789".into(),
            round: 3,
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hello_and_verdict_round_trip() {
        let h = hello();
        assert_eq!(decode_hello(&encode_hello(&h)).unwrap(), h);
        let v = Verdict::Refused {
            code: 4,
            reason: "x".into(),
        };
        assert_eq!(decode_verdict(&encode_verdict(&v)).unwrap(), v);
        // One is not the other.
        assert!(decode_verdict(&encode_hello(&h)).is_err());
    }

    #[test]
    fn a_matching_hello_is_admitted() {
        let h = expect()
            .admit(&encode_hello(&hello()), &names(&["eu-west"]))
            .unwrap();
        assert_eq!(h.round, 3);
    }

    #[test]
    fn each_mismatch_is_refused_with_its_code_and_a_reason() {
        let e = expect();
        let cert = names(&["eu-west"]);
        let r = e
            .check(
                &Hello {
                    protocol: 9,
                    ..hello()
                },
                &cert,
            )
            .unwrap_err();
        assert_eq!(r.kind, Refusal::Version);
        assert!(r.reason.contains("protocol version 9"), "{}", r.reason);

        let r = e
            .check(
                &Hello {
                    region: "mallory".into(),
                    ..hello()
                },
                &names(&["mallory"]),
            )
            .unwrap_err();
        assert_eq!(r.kind, Refusal::Identity);
        assert!(r.reason.contains("not a configured peer"), "{}", r.reason);

        // A configured peer's certificate claiming to be another configured peer.
        let r = e
            .check(
                &Hello {
                    region: "ap-southeast".into(),
                    ..hello()
                },
                &cert,
            )
            .unwrap_err();
        assert_eq!(r.kind, Refusal::Identity);
        assert!(
            r.reason.contains("certificate names eu-west"),
            "{}",
            r.reason
        );

        let r = e
            .check(
                &Hello {
                    manifest: "ffff".into(),
                    ..hello()
                },
                &cert,
            )
            .unwrap_err();
        assert_eq!(r.kind, Refusal::Manifest);
        assert!(r.reason.contains("another model"), "{}", r.reason);
        assert_eq!(
            r.verdict(),
            Verdict::Refused {
                code: 4,
                reason: r.reason.clone()
            }
        );
    }

    #[test]
    fn junk_oversized_and_trailing_bytes_are_malformed() {
        let e = expect();
        let cert = names(&["eu-west"]);
        for bad in [
            b"".to_vec(),
            b"WGH".to_vec(),
            b"WGHI\xff\xff".to_vec(),
            [encode_hello(&hello()), vec![0]].concat(),
            [&HELLO_MAGIC[..], &[0u8; MAX_HANDSHAKE_BYTES][..]].concat(),
        ] {
            let r = e.admit(&bad, &cert).unwrap_err();
            assert_eq!(r.kind, Refusal::Malformed, "{bad:?}");
        }
    }
}
