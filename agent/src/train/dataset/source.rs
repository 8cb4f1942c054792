//! Naming a data set: the embedded digits, an IDX or CIFAR-10 directory, or CSV files.

use super::{
    CsvOptions, DataError, DataSplit, embedded_digits, load_cifar10_dir, load_csv, load_csv_pair,
    load_idx_dir,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where training and test data come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DataSource {
    /// The digits set compiled into the binary.
    Digits,
    /// A directory of MNIST-style IDX files (MNIST, Fashion-MNIST, digits).
    Idx {
        /// Directory holding `train-images-idx3-ubyte` and friends.
        dir: PathBuf,
    },
    /// A directory of CIFAR-10 binary batches.
    Cifar10 {
        /// Directory holding `data_batch_*.bin` and `test_batch.bin`.
        dir: PathBuf,
    },
    /// CSV with numeric features and an integer label column.
    Csv {
        /// Training rows (all rows when `test` is absent).
        train: PathBuf,
        /// Test rows; when absent, a seeded 20% of `train` is held out.
        test: Option<PathBuf>,
        /// Label column name or index (default: last).
        label_column: Option<String>,
    },
}

impl DataSource {
    /// Builds a source from a kind name (`digits`, `idx`, `mnist`, `fashion-mnist`,
    /// `cifar10`, `csv`) and the paths that kind needs.
    pub fn from_parts(
        kind: &str,
        path: Option<PathBuf>,
        test: Option<PathBuf>,
        label_column: Option<String>,
    ) -> Result<Self, String> {
        let need = |what: &str| {
            path.clone()
                .ok_or_else(|| format!("--dataset {kind} needs --data {what}"))
        };
        match kind {
            "digits" if path.is_none() => Ok(Self::Digits),
            "digits" | "idx" | "mnist" | "fashion-mnist" => Ok(Self::Idx {
                dir: need("DIR (with train-images-idx3-ubyte etc.)")?,
            }),
            "cifar10" | "cifar-10" => Ok(Self::Cifar10 {
                dir: need("DIR (with data_batch_*.bin and test_batch.bin)")?,
            }),
            "csv" => Ok(Self::Csv {
                train: need("FILE.csv")?,
                test,
                label_column,
            }),
            _ => Err(format!(
                "unknown dataset {kind:?}; expected digits, idx, mnist, fashion-mnist, cifar10 or csv"
            )),
        }
    }

    /// Loads and validates the data; `seed` picks the CSV hold-out.
    pub fn load(&self, seed: u64) -> Result<DataSplit, DataError> {
        match self {
            Self::Digits => embedded_digits(),
            Self::Idx { dir } => load_idx_dir(dir),
            Self::Cifar10 { dir } => load_cifar10_dir(dir),
            Self::Csv {
                train,
                test,
                label_column,
            } => {
                let opts = CsvOptions {
                    label_column: label_column.clone(),
                    ..Default::default()
                };
                match test {
                    Some(test) => load_csv_pair(train, test, &opts),
                    None => load_csv(train, &opts, 0.2, seed),
                }
            }
        }
    }

    /// A short label for reports and checkpoints.
    pub fn label(&self) -> String {
        match self {
            Self::Digits => "digits".into(),
            Self::Idx { dir } => format!("idx:{}", dir.display()),
            Self::Cifar10 { dir } => format!("cifar10:{}", dir.display()),
            Self::Csv { train, .. } => format!("csv:{}", train.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_missing_paths() {
        assert_eq!(
            DataSource::from_parts("digits", None, None, None),
            Ok(DataSource::Digits)
        );
        let err = DataSource::from_parts("csv", None, None, None).unwrap_err();
        assert!(err.contains("--data FILE.csv"), "{err}");
        let err = DataSource::from_parts("imagenet", None, None, None).unwrap_err();
        assert!(err.contains("unknown dataset"), "{err}");
    }
}
