//! Feeds arbitrary bytes to the frame decoder: it must return a value or an error, never
//! panic, and what it accepts must be consistent with its own header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightgrad_codec::{Limits, decode};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frame: 1 << 20,
        max_payload: 4 << 20,
        max_elements: 1 << 20,
        ..Limits::default()
    };
    if let Ok(frame) = decode(data, &limits) {
        let len = frame.header.len as usize;
        match &frame.update {
            weightgrad_codec::Update::Dense(v) => assert_eq!(v.len(), len),
            weightgrad_codec::Update::Sparse { indices, values } => {
                assert_eq!(indices.len(), values.len());
                assert!(indices.windows(2).all(|p| p[0] < p[1]));
                assert!(indices.iter().all(|&i| (i as usize) < len));
            }
        }
    }
});
