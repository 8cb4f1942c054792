//! Feeds arbitrary bytes to the data-mode batch decoder: it must return a value or an error,
//! never panic, and what it accepts must be consistent with its own header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weightgrad_codec::Limits;
use weightgrad_codec::batch::decode_batch;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frame: 1 << 20,
        max_elements: 1 << 20,
        ..Limits::default()
    };
    if let Ok(batch) = decode_batch(data, &limits) {
        assert_eq!(batch.features.len(), batch.rows * batch.cols);
        assert_eq!(batch.labels.len(), batch.rows);
        assert!(batch.features.iter().all(|v| v.is_finite()));
    }
});
