//! A UTF-8 text corpus as byte-level next-token samples for a language model.
//!
//! The corpus is split by position: the first 90% trains, the last 10% validates, so no
//! validation text is ever seen in training. Each sample is a window of `window` bytes (the
//! features, as token ids `0..256` in `f32`) and the byte that follows it (the label);
//! windows start every `window` bytes, so every byte of a split is predicted once. A
//! language model reads the targets of all positions off the window itself and its label.

use super::{DataError, DataSplit, Dataset};
use std::path::Path;

/// Tokens in the byte-level vocabulary.
pub const BYTE_VOCAB: usize = 256;

/// The window length a text source uses unless told otherwise.
pub const DEFAULT_WINDOW: usize = 64;

/// A text corpus is at most this large (the whole file is held in memory as `f32` windows).
const MAX_TEXT_BYTES: u64 = 256 << 20;

/// The fraction of the corpus, at its end, held out for validation.
const VALIDATION_FRACTION: f64 = 0.1;

/// Loads `path` (a UTF-8 text file) as training and validation windows of `window` bytes.
pub fn load_text(path: &Path, window: usize) -> Result<DataSplit, DataError> {
    if window == 0 {
        return Err(DataError::Mismatch {
            problem: "text window must be at least 1 byte".into(),
        });
    }
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if !meta.is_file() {
        return Err(DataError::format(
            path,
            "not a file; name a UTF-8 text file",
        ));
    }
    if meta.len() > MAX_TEXT_BYTES {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is over the {MAX_TEXT_BYTES}-byte limit for a text corpus",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(DataError::format(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {}); the text loader reads text files",
                e.valid_up_to()
            ),
        ));
    }
    text_split(&bytes, window).map_err(|problem| DataError::format(path, problem))
}

/// Splits a corpus into training and validation windows; the error says why it cannot.
fn text_split(bytes: &[u8], window: usize) -> Result<DataSplit, String> {
    let held_out = (bytes.len() as f64 * VALIDATION_FRACTION).ceil() as usize;
    let cut = bytes.len() - held_out.min(bytes.len());
    let (train, test) = (
        windows(&bytes[..cut], window),
        windows(&bytes[cut..], window),
    );
    let need = 10 * (window + 1);
    let (Some(train), Some(test)) = (train, test) else {
        return Err(format!(
            "{} bytes is too short for {window}-byte windows: the last 10% validates, and each \
             split needs at least one window of {} bytes (at least {need} bytes in all)",
            bytes.len(),
            window + 1
        ));
    };
    DataSplit::new("text".into(), train, test).map_err(|e| e.to_string())
}

/// Windows of `window` tokens and their next token, starting every `window` bytes; `None`
/// when not even one fits.
fn windows(bytes: &[u8], window: usize) -> Option<Dataset> {
    let count = bytes.len().checked_sub(1)? / window;
    if count == 0 {
        return None;
    }
    let mut features = Vec::with_capacity(count * window);
    let mut labels = Vec::with_capacity(count);
    for w in 0..count {
        let start = w * window;
        features.extend(bytes[start..start + window].iter().map(|&b| f32::from(b)));
        labels.push(u32::from(bytes[start + window]));
    }
    Dataset::new(vec![window], features, labels, BYTE_VOCAB).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_predict_every_byte_once_and_validation_is_the_end() {
        let text: String = (0..200)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let split = text_split(text.as_bytes(), 8).unwrap();
        // 180 training bytes make 22 windows (the 23rd would need byte 184).
        assert_eq!(split.train.len(), (180 - 1) / 8);
        assert_eq!(split.train.sample_shape, vec![8]);
        assert_eq!(split.train.classes, BYTE_VOCAB);
        assert_eq!(split.train.sample(1)[0], f32::from(text.as_bytes()[8]));
        assert_eq!(split.train.labels[0], u32::from(text.as_bytes()[8]));
        // Validation starts at byte 180.
        assert_eq!(split.test.sample(0)[0], f32::from(text.as_bytes()[180]));
        assert_eq!(split.test.len(), (20 - 1) / 8);
    }

    #[test]
    fn bad_text_files_are_named_with_their_problem() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.txt");
        std::fs::write(&short, "tiny corpus").unwrap();
        let err = load_text(&short, 64).unwrap_err().to_string();
        assert!(
            err.contains("short.txt") && err.contains("too short for 64-byte windows"),
            "{err}"
        );

        let binary = dir.path().join("images.bin");
        std::fs::write(&binary, [0u8, 0, 8, 3, 0xff, 0xfe, 0x80]).unwrap();
        let err = load_text(&binary, 4).unwrap_err().to_string();
        assert!(
            err.contains("images.bin") && err.contains("not UTF-8"),
            "{err}"
        );

        let err = load_text(dir.path(), 4).unwrap_err().to_string();
        assert!(err.contains("not a file"), "{err}");

        let missing = dir.path().join("missing.txt");
        let err = load_text(&missing, 4).unwrap_err().to_string();
        assert!(
            err.contains("missing.txt") && err.contains("cannot read"),
            "{err}"
        );

        let err = load_text(&short, 0).unwrap_err().to_string();
        assert!(err.contains("at least 1 byte"), "{err}");
    }
}
