//! The data-set flags `weightgrad train` and `weightgrad bench` share.

use crate::train::dataset::DataSource;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Which data set to load (`--dataset`, `--data`, `--test-data`, `--label-column`).
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Data set: digits (embedded), idx, mnist, fashion-mnist, cifar10, csv or text.
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// Directory (idx, cifar10) or file (csv, text) holding the data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Test CSV; without it a seeded 20% of --data is held out.
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// CSV label column, by header name or zero-based index (default: last).
    #[arg(long)]
    label_column: Option<String>,
    /// Bytes per sample of a text corpus (default 64); the transformer's context must hold it.
    #[arg(long)]
    window: Option<usize>,
}

impl DataArgs {
    /// The data set these flags name; an error says which flag is missing or wrong.
    pub fn source(&self) -> Result<DataSource> {
        DataSource::from_parts(
            &self.dataset,
            self.data.clone(),
            self.test_data.clone(),
            self.label_column.clone(),
            self.window,
        )
        .map_err(anyhow::Error::msg)
    }
}
