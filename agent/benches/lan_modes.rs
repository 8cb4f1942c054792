//! LAN bytes per step, step time and accuracy: data mode against gradient mode, across
//! model sizes and batch sizes, on the embedded digits set (2 workers, Adam 10⁻³, the same
//! shards and seeds for every row of a model). The baseline is full-precision gradient mode, measured
//! in the same run. `WG_BENCH_EPOCHS` sets the passes over the data (default 10).
//!
//! Run: `cargo bench -p weightgrad --bench lan_modes`

use std::time::Instant;
use weightgrad::lan::RegionTrainer;
use weightgrad::train::ModelSpec;
use weightgrad::train::dataset::{DataSplit, ShardStrategy, embedded_digits, shard_indices};
use weightgrad_sdk::{DataPlan, DataScale, LanMode, LanPlan};

const WORKERS: usize = 2;

struct Row {
    bytes_per_step: u64,
    ms_per_step: f64,
    accuracy: f64,
}

fn run(spec: &ModelSpec, batch: usize, data: &DataSplit, plan: &LanPlan, epochs: usize) -> Row {
    let shards = (0..WORKERS)
        .map(|k| {
            let idx = shard_indices(&data.train.labels, WORKERS, k, ShardStrategy::Iid, 0);
            data.train.subset(&idx)
        })
        .collect();
    let mut region =
        RegionTrainer::new("bench", spec, shards, data.train.classes, batch, 0, 1).expect("region");
    let steps = epochs * data.train.len().div_ceil(batch * WORKERS);
    let start = Instant::now();
    for _ in 0..steps {
        region.step(plan, 1e-3).expect("step");
    }
    let elapsed = start.elapsed().as_secs_f64();
    Row {
        bytes_per_step: region.lan_bytes() / steps as u64,
        ms_per_step: 1e3 * elapsed / steps as f64,
        accuracy: region.evaluate(&data.test).expect("eval").accuracy,
    }
}

fn main() {
    let epochs: usize = std::env::var("WG_BENCH_EPOCHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let data = embedded_digits().expect("digits");
    let models = [
        ("logreg", ModelSpec::Logreg, 32),
        ("logreg", ModelSpec::Logreg, 256),
        (
            "small MLP 64-16-10",
            ModelSpec::Mlp { hidden: vec![16] },
            32,
        ),
        (
            "small MLP 64-16-10",
            ModelSpec::Mlp { hidden: vec![16] },
            256,
        ),
        ("MLP 64-256-10", ModelSpec::default_mlp(), 32),
        (
            "wide MLP 64-1024-1024-10",
            ModelSpec::Mlp {
                hidden: vec![1024, 1024],
            },
            32,
        ),
        ("CNN (5×5×64 ×2, fc 384-192)", ModelSpec::Cnn, 32),
    ];
    let data_mode = |feature_bits, refine_bits| LanPlan {
        gradient_bits: vec![],
        weight_bits: 8,
        mode: LanMode::Data(DataPlan {
            feature_bits,
            scale: DataScale::PerFeature,
            refine_bits,
        }),
    };
    println!("epochs: {epochs}, {WORKERS} workers");
    println!();
    println!(
        "| model | params | batch / worker | LAN mode | LAN bytes / step | fp32 gradients / this | ms / step | test top-1 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, spec, batch) in &models {
        let manifest = weightgrad::train::Model::new(
            spec,
            &data.train.sample_shape,
            data.train.classes,
            0,
            &candle_core::Device::Cpu,
        )
        .expect("model")
        .manifest()
        .clone();
        let params: usize = manifest.tensors.iter().map(|t| t.numel()).sum();
        let tensors = manifest.tensors.len();
        let plans = [
            ("gradient, fp32 (baseline)", LanPlan::FULL_PRECISION),
            (
                "gradient, 8-bit g and ŵ",
                LanPlan {
                    gradient_bits: vec![8; tensors],
                    weight_bits: 8,
                    mode: LanMode::Gradient,
                },
            ),
            ("data, 4-bit features", data_mode(4, 0)),
            ("data, 2-bit features + 2-bit refinement", data_mode(2, 2)),
        ];
        let mut baseline = None;
        for (mode, plan) in &plans {
            let row = run(spec, *batch, &data, plan, epochs);
            let base = *baseline.get_or_insert(row.bytes_per_step);
            println!(
                "| {label} | {params} | {batch} | {mode} | {} | {:.2}× | {:.2} | {:.2}% |",
                row.bytes_per_step,
                base as f64 / row.bytes_per_step as f64,
                row.ms_per_step,
                100.0 * row.accuracy
            );
        }
    }
}
