//! CPU time of a LAN step with the region's workers in threads of their own against in turn
//! on the step's thread, for the LAN plans the shipped policies choose: weightgrad's (8-bit
//! ŵ and gradients), full precision (topk, gaia, full-sync) and 4-bit data mode (adaptive).
//! Meant to run on one core (`taskset -c 0`), as a `--real` agent sharing its host computes
//! with one thread; the two ways give the same results to the bit
//! (`lan::tests::workers_in_turn_or_in_threads_...`). The baseline, workers in threads, is
//! measured in the same run, alternating with the other.
//!
//! `WG_BENCH_DATA` names an MNIST-format directory (default: the embedded digits set),
//! `WG_BENCH_HIDDEN` the MLP's hidden width (default 256), `WG_BENCH_STEPS` the steps per
//! measurement (default 300).
//!
//! Run: `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 taskset -c 0 cargo bench -p weightgrad --bench lan_workers`

use std::time::Instant;
use weightgrad::lan::RegionTrainer;
use weightgrad::train::ModelSpec;
use weightgrad::train::dataset::{ShardStrategy, embedded_digits, load_idx_dir, shard_indices};
use weightgrad_sdk::{DataPlan, DataScale, LanMode, LanPlan};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    weightgrad::alloc_tuning::keep_freed_memory();
    let data = match std::env::var_os("WG_BENCH_DATA") {
        Some(dir) => load_idx_dir(std::path::Path::new(&dir)).expect("WG_BENCH_DATA"),
        None => embedded_digits().expect("digits"),
    };
    let spec = ModelSpec::Mlp {
        hidden: vec![env("WG_BENCH_HIDDEN", 256)],
    };
    let steps: usize = env("WG_BENCH_STEPS", 300);
    let plans = [
        (
            "8-bit ŵ and gradients (weightgrad)",
            LanPlan {
                gradient_bits: vec![8, 32, 8, 32],
                weight_bits: 8,
                mode: LanMode::Gradient,
            },
        ),
        ("full precision (topk)", LanPlan::FULL_PRECISION),
        (
            "4-bit data mode (adaptive)",
            LanPlan {
                mode: LanMode::Data(DataPlan {
                    feature_bits: 4,
                    scale: DataScale::PerFeature,
                    refine_bits: 0,
                }),
                ..LanPlan::FULL_PRECISION
            },
        ),
    ];
    println!(
        "{} samples, {spec:?}, 2 workers, batch 16, {steps} steps a measurement, best of 3",
        data.train.len()
    );
    println!(
        "| LAN plan | workers in threads, ms/step | in turn, ms/step | in turn / in threads |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (name, plan) in &plans {
        let region = |parallel: bool| {
            let shards = (0..2)
                .map(|k| {
                    let idx = shard_indices(&data.train.labels, 6, k, ShardStrategy::Iid, 0);
                    data.train.subset(&idx)
                })
                .collect();
            let mut r = RegionTrainer::new("bench", &spec, shards, data.train.classes, 16, 0, 1)
                .expect("region");
            r.set_parallel_workers(parallel);
            for _ in 0..20 {
                r.step(plan, 1e-3).expect("step");
            }
            r
        };
        let (mut threads, mut in_turn) = (region(true), region(false));
        let time = |r: &mut RegionTrainer| {
            let start = Instant::now();
            for _ in 0..steps {
                r.step(plan, 1e-3).expect("step");
            }
            1e3 * start.elapsed().as_secs_f64() / steps as f64
        };
        let (mut best_threads, mut best_in_turn) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            best_threads = best_threads.min(time(&mut threads));
            best_in_turn = best_in_turn.min(time(&mut in_turn));
        }
        println!(
            "| {name} | {best_threads:.3} | {best_in_turn:.3} | {:.3} |",
            best_in_turn / best_threads
        );
    }
}
