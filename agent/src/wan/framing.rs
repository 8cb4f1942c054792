//! How messages ride QUIC streams, sans-IO: a stream carries one or more messages, each a
//! 4-byte big-endian length and its bytes. Small messages (round-end markers, small
//! tensors) share a stream; a large tensor's frame gets a stream of its own, so one big
//! tensor does not hold up the rest.

/// Groups messages of the given sizes for streams: indices of the messages each stream
/// carries, in order.
pub fn group_for_streams(sizes: &[usize], target_stream_bytes: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0usize;
    for (i, len) in sizes.iter().enumerate() {
        let size = len + 4;
        if !current.is_empty() && current_bytes + size > target_stream_bytes {
            groups.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += size;
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// The bytes of one stream carrying `messages`.
pub fn encode_stream<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let len = u32::try_from(m.len()).expect("messages are far below 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// Splits a received stream into its messages; refuses a truncated stream, an empty
/// message, or one larger than `max_message` bytes.
pub fn decode_stream(bytes: &[u8], max_message: usize) -> Result<Vec<&[u8]>, String> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Some((len, body)) = rest.split_first_chunk::<4>() else {
            return Err(format!(
                "stream ends inside a length prefix ({} byte(s) left)",
                rest.len()
            ));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len == 0 || len > max_message {
            return Err(format!(
                "message {} has length {len}, outside 1..={max_message}",
                out.len()
            ));
        }
        if body.len() < len {
            return Err(format!(
                "message {} is cut short: {} of {len} bytes",
                out.len(),
                body.len()
            ));
        }
        let (m, tail) = body.split_at(len);
        out.push(m);
        rest = tail;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn streams_round_trip(messages in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 1..300), 0..20), target in 1usize..1000) {
            let sizes: Vec<usize> = messages.iter().map(Vec::len).collect();
            let groups = group_for_streams(&sizes, target);
            let flat: Vec<usize> = groups.iter().flatten().copied().collect();
            prop_assert_eq!(flat, (0..messages.len()).collect::<Vec<_>>());
            for g in &groups {
                let bytes = encode_stream(g.iter().map(|&i| messages[i].as_slice()));
                let back = decode_stream(&bytes, 300).unwrap();
                prop_assert_eq!(back.len(), g.len());
                for (b, &i) in back.iter().zip(g) {
                    prop_assert_eq!(*b, messages[i].as_slice());
                }
                // A group holds one oversized message or fits the target.
                prop_assert!(g.len() == 1 || bytes.len() <= target);
            }
        }

        #[test]
        fn decoding_junk_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_stream(&bytes, 16);
        }
    }

    #[test]
    fn truncated_empty_and_oversized_messages_are_refused() {
        let good = encode_stream([&b"abc"[..], &b"de"[..]]);
        assert!(
            decode_stream(&good[..good.len() - 1], 10)
                .unwrap_err()
                .contains("cut short")
        );
        assert!(
            decode_stream(&good[..2], 10)
                .unwrap_err()
                .contains("length prefix")
        );
        assert!(
            decode_stream(&[0, 0, 0, 0], 10)
                .unwrap_err()
                .contains("length 0")
        );
        assert!(decode_stream(&good, 2).unwrap_err().contains("length 3"));
    }
}
