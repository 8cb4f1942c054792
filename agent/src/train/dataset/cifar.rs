//! CIFAR-10 binary batches: records of one label byte and 3×32×32 pixel bytes.

use super::{DataError, DataSplit, Dataset};
use std::path::Path;

const SIDE: usize = 32;
const CHANNELS: usize = 3;
const RECORD: usize = 1 + CHANNELS * SIDE * SIDE;
const CLASSES: usize = 10;

/// Parses one CIFAR-10 binary batch; `origin` names the file in errors.
pub fn parse_cifar_batch(bytes: &[u8], origin: &Path) -> Result<Dataset, DataError> {
    if bytes.is_empty() {
        return Err(DataError::format(origin, "empty CIFAR-10 batch"));
    }
    if !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::format(
            origin,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records \
                 (truncated after record {})",
                bytes.len(),
                bytes.len() / RECORD
            ),
        ));
    }
    let n = bytes.len() / RECORD;
    let mut features = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if usize::from(rec[0]) >= CLASSES {
            return Err(DataError::format(
                origin,
                format!("record {i} has label {} (CIFAR-10 labels are 0..9)", rec[0]),
            ));
        }
        labels.push(u32::from(rec[0]));
        features.extend(rec[1..].iter().map(|&p| f32::from(p) / 255.0));
    }
    Dataset::new(vec![CHANNELS, SIDE, SIDE], features, labels, CLASSES)
}

fn concat(parts: Vec<Dataset>) -> Dataset {
    let mut it = parts.into_iter();
    let mut first = it.next().expect("at least one batch");
    for d in it {
        first.features.extend(d.features);
        first.labels.extend(d.labels);
    }
    first
}

/// Loads `data_batch_*.bin` (training) and `test_batch.bin` from `dir`.
pub fn load_cifar10_dir(dir: &Path) -> Result<DataSplit, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut train_files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("data_batch_") && n.ends_with(".bin"))
        })
        .collect();
    train_files.sort();
    if train_files.is_empty() {
        return Err(DataError::format(
            dir,
            "no data_batch_*.bin files: not a CIFAR-10 binary directory",
        ));
    }
    let load = |p: &Path| -> Result<Dataset, DataError> {
        let bytes = std::fs::read(p).map_err(|e| DataError::io(p, e))?;
        parse_cifar_batch(&bytes, p)
    };
    let train = concat(
        train_files
            .iter()
            .map(|p| load(p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let test = load(&dir.join("test_batch.bin"))?;
    DataSplit::new(dir.display().to_string(), train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..RECORD - 1).map(|i| (i % 256) as u8));
        r
    }

    #[test]
    fn parses_records() {
        let mut b = record(3);
        b.extend(record(9));
        let d = parse_cifar_batch(&b, Path::new("b")).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.labels, vec![3, 9]);
        assert_eq!(d.sample_shape, vec![3, 32, 32]);
    }

    #[test]
    fn truncated_batch_is_an_error() {
        let mut b = record(1);
        b.extend(&record(2)[..100]);
        let err = parse_cifar_batch(&b, Path::new("data_batch_1.bin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_batch_1.bin"), "{err}");
        assert!(err.contains("truncated after record 1"), "{err}");
    }

    #[test]
    fn bad_label_is_an_error() {
        let err = parse_cifar_batch(&record(10), Path::new("b"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("record 0 has label 10"), "{err}");
    }

    #[test]
    fn directory_without_batches_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_cifar10_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no data_batch_"), "{err}");
    }
}
