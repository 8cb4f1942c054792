//! Labelled classification data sets held in memory as normalised `f32` features.
//!
//! Loaders validate every header, dimension and length and name the file and the
//! problem on error; nothing here panics on malformed input.

mod cifar;
mod csv;
mod embedded;
mod idx;
mod shard;
mod source;
mod text;

pub use cifar::load_cifar10_dir;
pub use csv::{CsvOptions, load_csv, load_csv_pair};
pub use embedded::embedded_digits;
pub use idx::{IdxKind, load_idx_dir, parse_idx};
pub use shard::{RegionLayout, ShardStrategy, shard_indices};
pub use source::DataSource;
pub use text::{BYTE_VOCAB, DEFAULT_WINDOW, load_text};

use std::path::PathBuf;

/// Why a data set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: cannot read: {error}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error, in the message (not a separate cause, so that a printed
        /// chain says it once).
        error: std::io::Error,
    },
    /// The file was read but its contents are not what the format requires.
    #[error("{path}: {problem}")]
    Format {
        /// File that is malformed.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Two files that belong together disagree (e.g. image and label counts).
    #[error("{problem}")]
    Mismatch {
        /// What disagrees.
        problem: String,
    },
}

impl DataError {
    pub(crate) fn format(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// A labelled data set: `len` samples of `sample_shape` features each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Shape of one sample: `[channels, height, width]` for images, `[features]` for tables.
    pub sample_shape: Vec<usize>,
    /// All features, `len * sample_numel` values, normalised for training.
    pub features: Vec<f32>,
    /// One class index per sample, each `< classes`.
    pub labels: Vec<u32>,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Builds a data set after checking that features, labels and shape agree.
    pub fn new(
        sample_shape: Vec<usize>,
        features: Vec<f32>,
        labels: Vec<u32>,
        classes: usize,
    ) -> Result<Self, DataError> {
        let numel: usize = sample_shape.iter().product();
        if numel == 0 {
            return Err(DataError::Mismatch {
                problem: format!("sample shape {sample_shape:?} has no features"),
            });
        }
        if features.len() != labels.len() * numel {
            return Err(DataError::Mismatch {
                problem: format!(
                    "{} feature values do not make {} samples of shape {sample_shape:?}",
                    features.len(),
                    labels.len()
                ),
            });
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(DataError::Mismatch {
                problem: format!("label {bad} is out of range for {classes} classes"),
            });
        }
        Ok(Self {
            sample_shape,
            features,
            labels,
            classes,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the data set holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of feature values in one sample.
    pub fn sample_numel(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Features of sample `i`.
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_numel();
        &self.features[i * n..(i + 1) * n]
    }

    /// Copies the samples at `indices` into a new data set (used for shards and splits).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.sample_numel();
        let mut features = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.sample(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            sample_shape: self.sample_shape.clone(),
            features,
            labels,
            classes: self.classes,
        }
    }
}

/// A training set and the test set it is evaluated on.
#[derive(Debug, Clone)]
pub struct DataSplit {
    /// Human-readable name of the source (e.g. `digits`, a directory).
    pub name: String,
    /// Samples to train on.
    pub train: Dataset,
    /// Held-out samples for evaluation.
    pub test: Dataset,
}

impl DataSplit {
    /// Checks that train and test describe the same problem.
    pub fn new(name: String, train: Dataset, test: Dataset) -> Result<Self, DataError> {
        if train.sample_shape != test.sample_shape {
            return Err(DataError::Mismatch {
                problem: format!(
                    "{name}: training samples have shape {:?} but test samples {:?}",
                    train.sample_shape, test.sample_shape
                ),
            });
        }
        if train.is_empty() || test.is_empty() {
            return Err(DataError::Mismatch {
                problem: format!(
                    "{name}: {} training and {} test samples; both must be non-empty",
                    train.len(),
                    test.len()
                ),
            });
        }
        let classes = train.classes.max(test.classes);
        let mut split = Self { name, train, test };
        split.train.classes = classes;
        split.test.classes = classes;
        Ok(split)
    }
}
