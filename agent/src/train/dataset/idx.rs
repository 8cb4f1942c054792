//! MNIST IDX files (MNIST, Fashion-MNIST, the digits set): `u8` images and labels.

use super::{DataError, DataSplit, Dataset};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which IDX payload a file is expected to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxKind {
    /// `N × H × W` unsigned bytes, magic `0x00000803`.
    Images,
    /// `N` unsigned bytes, magic `0x00000801`.
    Labels,
}

impl IdxKind {
    fn dims(self) -> u8 {
        match self {
            IdxKind::Images => 3,
            IdxKind::Labels => 1,
        }
    }
}

/// Parses one IDX file of unsigned bytes; returns its dimensions and payload.
///
/// `origin` names the file in errors.
pub fn parse_idx<'a>(
    bytes: &'a [u8],
    kind: IdxKind,
    origin: &Path,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    if bytes.len() < 4 {
        return Err(DataError::format(
            origin,
            format!("{} bytes is too short for an IDX header", bytes.len()),
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = 0x0000_0800 | u32::from(kind.dims());
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::format(
            origin,
            format!("bad IDX magic 0x{magic:08x}: not an IDX file"),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::format(
            origin,
            format!(
                "IDX element type 0x{:02x} is not supported; expected unsigned bytes (0x08)",
                bytes[2]
            ),
        ));
    }
    if magic != expected {
        return Err(DataError::format(
            origin,
            format!(
                "IDX magic 0x{magic:08x} has {} dimensions; {kind:?} need magic 0x{expected:08x}",
                bytes[3]
            ),
        ));
    }
    let ndims = usize::from(kind.dims());
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::format(
            origin,
            format!("truncated IDX header: {} bytes, need {header}", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected_len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::format(origin, format!("IDX dimensions {dims:?} overflow")))?;
    let payload = &bytes[header..];
    if payload.len() != expected_len {
        return Err(DataError::format(
            origin,
            format!(
                "IDX dimensions {dims:?} need {expected_len} data bytes but the file holds {}{}",
                payload.len(),
                if payload.len() < expected_len {
                    " (truncated)"
                } else {
                    " (trailing bytes)"
                }
            ),
        ));
    }
    if dims.contains(&0) {
        return Err(DataError::format(
            origin,
            format!("IDX dimensions {dims:?} describe an empty set"),
        ));
    }
    Ok((dims, payload))
}

/// Builds a data set from IDX image and label bytes, scaling pixels by `scale`.
pub(crate) fn idx_dataset(
    images: &[u8],
    images_origin: &Path,
    labels: &[u8],
    labels_origin: &Path,
    scale: Option<f32>,
) -> Result<(Dataset, f32), DataError> {
    let (idims, pixels) = parse_idx(images, IdxKind::Images, images_origin)?;
    let (ldims, label_bytes) = parse_idx(labels, IdxKind::Labels, labels_origin)?;
    if idims[0] != ldims[0] {
        return Err(DataError::Mismatch {
            problem: format!(
                "{} holds {} images but {} holds {} labels",
                images_origin.display(),
                idims[0],
                labels_origin.display(),
                ldims[0]
            ),
        });
    }
    let max_label = label_bytes.iter().copied().max().unwrap_or(0);
    if max_label > 99 {
        return Err(DataError::format(
            labels_origin,
            format!("label {max_label} is implausible for a classification set"),
        ));
    }
    // Normalise by the training set's maximum (digits use 0..16, MNIST 0..255).
    let scale =
        scale.unwrap_or_else(|| f32::from(pixels.iter().copied().max().unwrap_or(1).max(1)));
    let features = pixels.iter().map(|&p| f32::from(p) / scale).collect();
    let labels = label_bytes.iter().map(|&l| u32::from(l)).collect();
    let ds = Dataset::new(
        vec![1, idims[1], idims[2]],
        features,
        labels,
        usize::from(max_label) + 1,
    )?;
    Ok((ds, scale))
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Largest decompressed IDX file accepted (full MNIST's training images are 47 MB).
const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Reads `dir/name`, or else `dir/name.gz` decompressed (the form MNIST and Fashion-MNIST are
/// distributed in, and Debian's `dataset-fashion-mnist` installs); returns the path read.
fn read_plain_or_gz(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if plain.exists() || !gz.exists() {
        return read(&plain).map(|bytes| (plain, bytes));
    }
    let file = std::fs::File::open(&gz).map_err(|e| DataError::io(&gz, e))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::format(&gz, format!("not a readable gzip file: {e}")))?;
    if bytes.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::format(
            &gz,
            format!("decompresses to more than {MAX_DECOMPRESSED} bytes"),
        ));
    }
    Ok((gz, bytes))
}

/// Loads `train-{images-idx3,labels-idx1}-ubyte` and `t10k-…` from `dir`, each file plain or
/// gzipped (`….gz`).
pub fn load_idx_dir(dir: &Path) -> Result<DataSplit, DataError> {
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let (paths, files): (Vec<_>, Vec<_>) = names
        .iter()
        .map(|n| read_plain_or_gz(dir, n))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let (train, scale) = idx_dataset(&files[0], &paths[0], &files[1], &paths[1], None)?;
    let (test, _) = idx_dataset(&files[2], &paths[2], &files[3], &paths[3], Some(scale))?;
    DataSplit::new(dir.display().to_string(), train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_a_valid_image_file() {
        let mut f = header(0x803, &[2, 2, 3]);
        f.extend(0u8..12);
        let (dims, data) = parse_idx(&f, IdxKind::Images, Path::new("x")).unwrap();
        assert_eq!(dims, vec![2, 2, 3]);
        assert_eq!(data.len(), 12);
    }

    #[test]
    fn truncated_payload_names_file_and_sizes() {
        let mut f = header(0x803, &[2, 2, 3]);
        f.extend(0u8..11);
        let err = parse_idx(&f, IdxKind::Images, Path::new("imgs.idx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("imgs.idx"), "{err}");
        assert!(err.contains("need 12 data bytes"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn wrong_magic_and_short_headers_are_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "too short"),
            (header(0x801, &[3]), "need magic 0x00000803"),
            (header(0x0d03, &[1, 1, 1]), "element type"),
            (vec![0x12, 0x34, 0x08, 0x03], "not an IDX file"),
            (header(0x803, &[1]), "truncated IDX header"),
            (header(0x803, &[0, 8, 8]), "empty set"),
            (header(0x803, &[u32::MAX, u32::MAX, u32::MAX]), "overflow"),
        ];
        for (bytes, want) in cases {
            let err = parse_idx(&bytes, IdxKind::Images, Path::new("f"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn image_label_count_mismatch_is_an_error() {
        let mut imgs = header(0x803, &[2, 1, 1]);
        imgs.extend([1, 2]);
        let mut labels = header(0x801, &[3]);
        labels.extend([0, 1, 2]);
        let err = idx_dataset(&imgs, Path::new("i"), &labels, Path::new("l"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 images") && err.contains("3 labels"),
            "{err}"
        );
    }

    #[test]
    fn missing_directory_names_the_file() {
        let err = load_idx_dir(Path::new("/nonexistent/weightgrad"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// A 2-image training set and 1-image test set of 2×2 pixels, as IDX files.
    fn tiny_set() -> [(&'static str, Vec<u8>); 4] {
        let images = |n: u32| {
            let mut f = header(0x803, &[n, 2, 2]);
            f.extend((0..4 * n).map(|i| (i * 20) as u8));
            f
        };
        let labels = |l: &[u8]| {
            let mut f = header(0x801, &[l.len() as u32]);
            f.extend(l);
            f
        };
        [
            ("train-images-idx3-ubyte", images(2)),
            ("train-labels-idx1-ubyte", labels(&[0, 1])),
            ("t10k-images-idx3-ubyte", images(1)),
            ("t10k-labels-idx1-ubyte", labels(&[1])),
        ]
    }

    #[test]
    fn gzipped_files_load_like_plain_ones() {
        let plain = tempfile::tempdir().unwrap();
        let gz = tempfile::tempdir().unwrap();
        for (name, bytes) in tiny_set() {
            std::fs::write(plain.path().join(name), &bytes).unwrap();
            std::fs::write(gz.path().join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        }
        let a = load_idx_dir(plain.path()).unwrap();
        let b = load_idx_dir(gz.path()).unwrap();
        assert_eq!(a.train.features, b.train.features);
        assert_eq!(a.train.labels, b.train.labels);
        assert_eq!(a.test.labels, b.test.labels);
        assert_eq!(b.train.len(), 2);
    }

    #[test]
    fn a_corrupt_or_truncated_gzip_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in tiny_set() {
            std::fs::write(dir.path().join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        }
        let labels = dir.path().join("t10k-labels-idx1-ubyte.gz");
        std::fs::write(&labels, b"not gzip at all").unwrap();
        let err = load_idx_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("t10k-labels-idx1-ubyte.gz"), "{err}");
        assert!(err.contains("not a readable gzip file"), "{err}");
        let whole = gzip(&tiny_set()[0].1);
        std::fs::write(&labels, &whole[..whole.len() / 2]).unwrap();
        let err = load_idx_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a readable gzip file"), "{err}");
        // Decompressing fine but holding the wrong payload is the IDX check's to name.
        std::fs::write(&labels, gzip(&tiny_set()[0].1)).unwrap();
        let err = load_idx_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("t10k-labels-idx1-ubyte.gz"), "{err}");
    }
}
