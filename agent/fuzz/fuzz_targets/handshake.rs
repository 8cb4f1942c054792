//! Arbitrary bytes as a peer's hello (and as a verdict): decoding and admission return a value
//! or a refusal, never panic; what is admitted is a configured peer, named by its
//! certificate, speaking this protocol version with this model; and whatever decodes
//! re-encodes to a message that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightgrad::wan::handshake::*;

fuzz_target!(|data: &[u8]| {
    let expect = Expectation {
        region: "us-east".into(),
        peers: vec!["eu-west".into(), "ap-southeast".into()],
        manifest: "4f2a".into(),
    };
    // The first byte picks which names the peer's certificate carries.
    let (names, bytes): (Vec<String>, &[u8]) = match data.split_first() {
        Some((0, rest)) => (vec![], rest),
        Some((1, rest)) => (vec!["ap-southeast".into()], rest),
        Some((_, rest)) => (vec!["eu-west".into()], rest),
        None => (vec![], data),
    };
    match expect.admit(bytes, &names) {
        Ok(hello) => {
            assert_eq!(hello.protocol, PROTOCOL_VERSION);
            assert!(expect.peers.contains(&hello.region));
            assert!(names.contains(&hello.region));
            assert_eq!(hello.manifest, expect.manifest);
        }
        Err(refused) => {
            assert!(!refused.reason.is_empty());
            // The refusal travels back as a verdict that decodes to itself.
            let verdict = refused.verdict();
            assert_eq!(decode_verdict(&encode_verdict(&verdict)).as_ref(), Ok(&verdict));
        }
    }
    if let Ok(hello) = decode_hello(bytes) {
        let again = encode_hello(&hello);
        assert_eq!(decode_hello(&again), Ok(hello));
    }
    if let Ok(verdict) = decode_verdict(bytes) {
        let again = encode_verdict(&verdict);
        assert_eq!(decode_verdict(&again), Ok(verdict));
    }
});
