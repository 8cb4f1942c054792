//! The digits set (UCI optical digits, 8×8, CC BY 4.0) compiled into the binary,
//! so that the default job needs no download. See `agent/data/digits/README.md`.

use super::{DataError, DataSplit, idx::idx_dataset};
use std::path::Path;

const TRAIN_IMAGES: &[u8] = include_bytes!("../../../data/digits/train-images-idx3-ubyte");
const TRAIN_LABELS: &[u8] = include_bytes!("../../../data/digits/train-labels-idx1-ubyte");
const TEST_IMAGES: &[u8] = include_bytes!("../../../data/digits/t10k-images-idx3-ubyte");
const TEST_LABELS: &[u8] = include_bytes!("../../../data/digits/t10k-labels-idx1-ubyte");

/// The embedded digits set: 1,437 training and 360 test images of 8×8 pixels, ten classes.
pub fn embedded_digits() -> Result<DataSplit, DataError> {
    let origin = |n: &str| Path::new("embedded:digits").join(n);
    let (train, scale) = idx_dataset(
        TRAIN_IMAGES,
        &origin("train-images-idx3-ubyte"),
        TRAIN_LABELS,
        &origin("train-labels-idx1-ubyte"),
        None,
    )?;
    let (test, _) = idx_dataset(
        TEST_IMAGES,
        &origin("t10k-images-idx3-ubyte"),
        TEST_LABELS,
        &origin("t10k-labels-idx1-ubyte"),
        Some(scale),
    )?;
    DataSplit::new("digits".into(), train, test)
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_digits_have_the_documented_shape() {
        let d = super::embedded_digits().unwrap();
        assert_eq!(d.train.len(), 1437);
        assert_eq!(d.test.len(), 360);
        assert_eq!(d.train.sample_shape, vec![1, 8, 8]);
        assert_eq!(d.train.classes, 10);
        let max = d.train.features.iter().copied().fold(0.0f32, f32::max);
        assert_eq!(max, 1.0, "pixels are normalised by the maximum");
    }
}
