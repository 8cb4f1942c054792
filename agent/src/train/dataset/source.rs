//! Naming a data set: the embedded digits, an IDX or CIFAR-10 directory, CSV files or a
//! text corpus.

use super::{
    CsvOptions, DataError, DataSplit, embedded_digits, load_cifar10_dir, load_csv, load_csv_pair,
    load_idx_dir, load_text,
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
    /// A UTF-8 text file, as byte-level windows for a language model.
    Text {
        /// The corpus.
        path: PathBuf,
        /// Tokens per sample (the model's context must hold at least this many).
        window: usize,
    },
}

impl DataSource {
    /// Builds a source from a kind name (`digits`, `idx`, `mnist`, `fashion-mnist`,
    /// `cifar10`, `csv`, `text`) and the paths that kind needs; `window` is the text
    /// window (default [`DEFAULT_WINDOW`](super::DEFAULT_WINDOW)) and only text takes one.
    pub fn from_parts(
        kind: &str,
        path: Option<PathBuf>,
        test: Option<PathBuf>,
        label_column: Option<String>,
        window: Option<usize>,
    ) -> Result<Self, String> {
        if window.is_some() && kind != "text" {
            return Err(format!(
                "--window applies to text data, not --dataset {kind}"
            ));
        }
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
            "text" => Ok(Self::Text {
                path: need("FILE (UTF-8 text)")?,
                window: window.unwrap_or(super::DEFAULT_WINDOW),
            }),
            _ => Err(format!(
                "unknown dataset {kind:?}; expected digits, idx, mnist, fashion-mnist, cifar10, csv or text"
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
            Self::Text { path, window } => load_text(path, *window),
        }
    }

    /// A short label for reports and checkpoints.
    pub fn label(&self) -> String {
        match self {
            Self::Digits => "digits".into(),
            Self::Idx { dir } => format!("idx:{}", dir.display()),
            Self::Cifar10 { dir } => format!("cifar10:{}", dir.display()),
            Self::Csv { train, .. } => format!("csv:{}", train.display()),
            Self::Text { path, window } => format!("text:{}@{window}", path.display()),
        }
    }

    /// True when samples are token windows (a language model's data), not feature vectors.
    pub fn is_tokens(&self) -> bool {
        matches!(self, Self::Text { .. })
    }

    /// Refuses a model that cannot train on this data: a language model reads token
    /// windows, every other model feature vectors or images.
    pub fn check_model(&self, model: &crate::train::ModelSpec) -> Result<(), String> {
        match (self.is_tokens(), model.is_language_model()) {
            (true, false) => Err(format!(
                "model {model} cannot train on text: text data trains a language model \
                 (transformer:LAYERS,DIM,HEADS,CONTEXT)"
            )),
            (false, true) => Err(format!(
                "model {model} is a language model: it trains on text data (--dataset text), \
                 not on {}",
                self.label()
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_missing_paths() {
        assert_eq!(
            DataSource::from_parts("digits", None, None, None, None),
            Ok(DataSource::Digits)
        );
        let err = DataSource::from_parts("csv", None, None, None, None).unwrap_err();
        assert!(err.contains("--data FILE.csv"), "{err}");
        let err = DataSource::from_parts("imagenet", None, None, None, None).unwrap_err();
        assert!(err.contains("unknown dataset"), "{err}");
        let text = DataSource::from_parts("text", Some("a.txt".into()), None, None, None);
        assert_eq!(
            text,
            Ok(DataSource::Text {
                path: "a.txt".into(),
                window: super::super::DEFAULT_WINDOW
            })
        );
        let err = DataSource::from_parts("csv", Some("a.csv".into()), None, None, Some(8));
        assert!(err.unwrap_err().contains("--window applies to text"));
        let transformer = crate::train::ModelSpec::default_transformer(64);
        let err = DataSource::Digits.check_model(&transformer).unwrap_err();
        assert!(err.contains("is a language model"), "{err}");
        let err = text
            .unwrap()
            .check_model(&crate::train::ModelSpec::Logreg)
            .unwrap_err();
        assert!(err.contains("cannot train on text"), "{err}");
    }
}
