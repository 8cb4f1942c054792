//! CSV tables: numeric feature columns and one integer label column.

use super::{DataError, DataSplit, Dataset, shard::split_holdout};
use std::path::Path;

/// How to read a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Label column: a header name or a zero-based index; `None` means the last column.
    pub label_column: Option<String>,
    /// Field delimiter.
    pub delimiter: u8,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            label_column: None,
            delimiter: b',',
        }
    }
}

struct Table {
    features: Vec<f32>,
    labels: Vec<u32>,
    width: usize,
}

fn parse_table(text: &str, opts: &CsvOptions, origin: &Path) -> Result<Table, DataError> {
    let delim = char::from(opts.delimiter);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((first_no, first)) = lines.next() else {
        return Err(DataError::format(origin, "empty CSV file"));
    };
    let first_fields: Vec<&str> = first.split(delim).map(str::trim).collect();
    let has_header = first_fields.iter().any(|f| f.parse::<f64>().is_err());
    let columns = first_fields.len();
    if columns < 2 {
        return Err(DataError::format(
            origin,
            format!(
                "line {}: need at least one feature and a label column",
                first_no + 1
            ),
        ));
    }
    let label_col = match &opts.label_column {
        None => columns - 1,
        Some(spec) => {
            if let Some(pos) = has_header
                .then(|| first_fields.iter().position(|f| f == spec))
                .flatten()
            {
                pos
            } else if let Ok(i) = spec.parse::<usize>() {
                if i >= columns {
                    return Err(DataError::format(
                        origin,
                        format!("label column {i} is out of range: the file has {columns} columns"),
                    ));
                }
                i
            } else {
                return Err(DataError::format(
                    origin,
                    format!("no column named {spec:?} in the header"),
                ));
            }
        }
    };
    let rows = if has_header {
        Box::new(lines) as Box<dyn Iterator<Item = (usize, &str)>>
    } else {
        Box::new(std::iter::once((first_no, first)).chain(lines))
    };
    let mut table = Table {
        features: Vec::new(),
        labels: Vec::new(),
        width: columns - 1,
    };
    for (no, line) in rows {
        let fields: Vec<&str> = line.split(delim).map(str::trim).collect();
        if fields.len() != columns {
            return Err(DataError::format(
                origin,
                format!(
                    "line {}: {} fields, expected {columns}",
                    no + 1,
                    fields.len()
                ),
            ));
        }
        for (c, f) in fields.iter().enumerate() {
            if c == label_col {
                let label = f.parse::<u32>().map_err(|_| {
                    DataError::format(
                        origin,
                        format!(
                            "line {}: label {f:?} is not a non-negative integer class",
                            no + 1
                        ),
                    )
                })?;
                table.labels.push(label);
            } else {
                let v = f
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        DataError::format(
                            origin,
                            format!(
                                "line {}, column {}: {f:?} is not a finite number",
                                no + 1,
                                c + 1
                            ),
                        )
                    })?;
                table.features.push(v);
            }
        }
    }
    if table.labels.is_empty() {
        return Err(DataError::format(origin, "no data rows"));
    }
    Ok(table)
}

fn read_table(path: &Path, opts: &CsvOptions) -> Result<Table, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| DataError::format(path, format!("not UTF-8 text: {e}")))?;
    parse_table(&text, opts, path)
}

/// Per-feature mean and standard deviation of `t`, used to standardise both splits.
fn column_stats(t: &Table) -> Vec<(f32, f32)> {
    let n = t.labels.len() as f64;
    (0..t.width)
        .map(|c| {
            let col = t
                .features
                .iter()
                .skip(c)
                .step_by(t.width)
                .map(|&v| f64::from(v));
            let mean = col.clone().sum::<f64>() / n;
            let var = col.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let std = if var > 1e-12 { var.sqrt() } else { 1.0 };
            (mean as f32, std as f32)
        })
        .collect()
}

fn into_dataset(mut t: Table, stats: &[(f32, f32)], classes: usize) -> Result<Dataset, DataError> {
    for (i, v) in t.features.iter_mut().enumerate() {
        let (m, s) = stats[i % t.width];
        *v = (*v - m) / s;
    }
    Dataset::new(vec![t.width], t.features, t.labels, classes)
}

fn classes_of(tables: &[&Table]) -> usize {
    tables
        .iter()
        .flat_map(|t| t.labels.iter())
        .copied()
        .max()
        .unwrap_or(0) as usize
        + 1
}

/// Loads a training CSV and a test CSV; features are standardised with the training statistics.
pub fn load_csv_pair(train: &Path, test: &Path, opts: &CsvOptions) -> Result<DataSplit, DataError> {
    let tr = read_table(train, opts)?;
    let te = read_table(test, opts)?;
    if tr.width != te.width {
        return Err(DataError::Mismatch {
            problem: format!(
                "{} has {} feature columns but {} has {}",
                train.display(),
                tr.width,
                test.display(),
                te.width
            ),
        });
    }
    let stats = column_stats(&tr);
    let classes = classes_of(&[&tr, &te]);
    DataSplit::new(
        train.display().to_string(),
        into_dataset(tr, &stats, classes)?,
        into_dataset(te, &stats, classes)?,
    )
}

/// Loads one CSV and holds out `test_fraction` of its rows (chosen from `seed`) for evaluation.
pub fn load_csv(
    path: &Path,
    opts: &CsvOptions,
    test_fraction: f64,
    seed: u64,
) -> Result<DataSplit, DataError> {
    let t = read_table(path, opts)?;
    let stats = column_stats(&t);
    let classes = classes_of(&[&t]);
    let all = into_dataset(t, &stats, classes)?;
    let (train_idx, test_idx) = split_holdout(all.len(), test_fraction, seed);
    DataSplit::new(
        path.display().to_string(),
        all.subset(&train_idx),
        all.subset(&test_idx),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn reads_header_and_named_label() {
        let f = write("a,label,b\n1,0,2\n3,1,4\n5,1,6\n7,0,8\n9,1,1\n");
        let opts = CsvOptions {
            label_column: Some("label".into()),
            ..Default::default()
        };
        let d = load_csv(f.path(), &opts, 0.2, 1).unwrap();
        assert_eq!(d.train.sample_shape, vec![2]);
        assert_eq!(d.train.len() + d.test.len(), 5);
        assert_eq!(d.train.classes, 2);
    }

    #[test]
    fn bad_rows_name_line_and_column() {
        let cases = [
            ("1,2,0\n3,x,1\n", "line 2, column 2"),
            ("1,2,0\n3,4\n", "line 2: 2 fields, expected 3"),
            ("1,2,0\n3,4,-1\n", "line 2: label \"-1\""),
            ("1,2,0\n3,inf,1\n", "not a finite number"),
            ("", "empty CSV file"),
            ("a,b\n", "no data rows"),
            ("5\n", "at least one feature"),
        ];
        for (text, want) in cases {
            let f = write(text);
            let err = load_csv(f.path(), &CsvOptions::default(), 0.5, 0)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
            assert!(err.contains(&f.path().display().to_string()), "{err}");
        }
    }

    #[test]
    fn unknown_label_column_is_an_error() {
        let f = write("a,b\n1,0\n");
        let opts = CsvOptions {
            label_column: Some("y".into()),
            ..Default::default()
        };
        let err = load_csv(f.path(), &opts, 0.5, 0).unwrap_err().to_string();
        assert!(err.contains("no column named \"y\""), "{err}");
    }

    #[test]
    fn pair_with_different_widths_is_an_error() {
        let a = write("1,2,0\n3,4,1\n");
        let b = write("1,0\n");
        let err = load_csv_pair(a.path(), b.path(), &CsvOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("feature columns"), "{err}");
    }
}
