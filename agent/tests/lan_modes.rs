//! Data mode against gradient mode on the LAN: the same data, shards, seeds and steps; only
//! what crosses the LAN differs.

use std::fmt::Write as _;
use weightgrad::lan::{LanPlacement, RegionTrainer};
use weightgrad::train::ModelSpec;
use weightgrad::train::dataset::{
    CsvOptions, DataSplit, Dataset, ShardStrategy, embedded_digits, load_csv_pair, shard_indices,
};
use weightgrad_sdk::{DataPlan, DataScale, LanMode, LanPlan};

const WORKERS: usize = 2;
const BATCH: usize = 32;

fn region(spec: &ModelSpec, data: &DataSplit) -> RegionTrainer {
    let shards = (0..WORKERS)
        .map(|k| {
            let idx = shard_indices(&data.train.labels, WORKERS, k, ShardStrategy::Iid, 0);
            data.train.subset(&idx)
        })
        .collect();
    RegionTrainer::new("r", spec, shards, data.train.classes, BATCH, 0, 1).unwrap()
}

/// Test top-1 after `epochs` passes, and LAN bytes per step.
fn train(spec: &ModelSpec, data: &DataSplit, plan: &LanPlan, epochs: usize) -> (f64, u64) {
    let mut region = region(spec, data);
    let steps = epochs * data.train.len().div_ceil(BATCH * WORKERS);
    for _ in 0..steps {
        region.step(plan, 1e-3).unwrap();
    }
    let accuracy = region.evaluate(&data.test).unwrap().accuracy;
    (accuracy, region.lan_bytes() / steps as u64)
}

fn data_mode(feature_bits: u8, refine_bits: u8) -> LanPlan {
    LanPlan {
        gradient_bits: vec![],
        weight_bits: 8,
        mode: LanMode::Data(DataPlan {
            feature_bits,
            scale: DataScale::PerFeature,
            refine_bits,
        }),
    }
}

#[test]
fn digits_mlp_in_data_mode_is_within_a_point_of_gradient_mode() {
    let data = embedded_digits().unwrap();
    let spec = ModelSpec::default_mlp();
    let (gradient, gradient_bytes) = train(&spec, &data, &LanPlan::FULL_PRECISION, 30);
    for plan in [data_mode(2, 0), data_mode(1, 2)] {
        let (acc, bytes) = train(&spec, &data, &plan, 30);
        assert!(
            (acc - gradient).abs() <= 0.01,
            "{plan:?}: {acc} vs gradient mode {gradient}"
        );
        assert!(bytes < gradient_bytes / 5, "{bytes} vs {gradient_bytes}");
    }
    assert!(gradient >= 0.95, "{gradient}");
}

fn write_csv(path: &std::path::Path, d: &Dataset) {
    let mut text = String::new();
    for i in 0..d.len() {
        for v in d.sample(i) {
            write!(text, "{v},").unwrap();
        }
        writeln!(text, "{}", d.labels[i]).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn logistic_regression_on_a_csv_in_data_mode_is_within_a_point_of_gradient_mode() {
    let digits = embedded_digits().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (train_csv, test_csv) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
    write_csv(&train_csv, &digits.train);
    write_csv(&test_csv, &digits.test);
    let data = load_csv_pair(&train_csv, &test_csv, &CsvOptions::default()).unwrap();
    let (gradient, _) = train(&ModelSpec::Logreg, &data, &LanPlan::FULL_PRECISION, 20);
    let (acc, _) = train(&ModelSpec::Logreg, &data, &data_mode(2, 0), 20);
    assert!(
        (acc - gradient).abs() <= 0.01,
        "data mode {acc} vs gradient mode {gradient}"
    );
    assert!(gradient >= 0.9, "{gradient}");
}

#[test]
fn data_mode_is_refused_where_samples_would_cross_a_wan() {
    let data = embedded_digits().unwrap();
    let mut region = region(&ModelSpec::Logreg, &data);
    region.set_placement(LanPlacement {
        crosses_wan: true,
        allow_data_over_wan: false,
    });
    assert!(!region.lan_input().data_mode_allowed);
    let before = region.weights.clone();
    let err = region.step(&data_mode(4, 0), 1e-3).unwrap_err();
    assert!(err.to_string().contains("allow_data_over_wan"), "{err}");
    assert_eq!(region.weights, before, "a refused step changes nothing");
    assert_eq!(region.lan_bytes(), 0);
    // Gradient mode still runs, and the explicit permission unlocks data mode.
    region.step(&LanPlan::FULL_PRECISION, 1e-3).unwrap();
    region.set_placement(LanPlacement {
        crosses_wan: true,
        allow_data_over_wan: true,
    });
    region.step(&data_mode(4, 0), 1e-3).unwrap();
}
