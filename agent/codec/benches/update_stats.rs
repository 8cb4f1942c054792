//! The statistics a policy reads for one 1024×1024 tensor on one link, every round
//! (`filter::update_stats`: the update's L2 norm, its largest relative change and the
//! fraction significant at the agents' three default thresholds), against the same
//! statistics taken one at a time, as separate passes over the tensors with one division
//! per element and threshold (the baseline, measured in the same run). One thread.
//!
//! Run: `cargo bench -p weightgrad-codec --bench update_stats`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::hint::black_box;
use weightgrad_codec::filter::{UpdateStats, significant_fractions, update_stats};

const ELEMENTS: usize = 1 << 20;
const THRESHOLDS: [f32; 3] = [0.001, 0.01, 0.1];

/// Each statistic on its own pass.
fn separate_passes(acc: &[f32], w: &[f32], taus: &[f32]) -> UpdateStats {
    UpdateStats {
        update_l2: acc
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt() as f32,
        max_relative: acc
            .iter()
            .zip(w)
            .filter(|(_, w)| **w != 0.0)
            .map(|(a, w)| (a / w).abs())
            .fold(0.0, f32::max),
        significant_fraction: significant_fractions(acc, w, taus),
    }
}

fn stats(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let weights = Normal::new(0.0f32, 0.03).expect("normal");
    let updates = Normal::new(0.0f32, 1e-4).expect("normal");
    let w: Vec<f32> = (0..ELEMENTS).map(|_| weights.sample(&mut rng)).collect();
    let acc: Vec<f32> = (0..ELEMENTS).map(|_| updates.sample(&mut rng)).collect();
    assert_eq!(
        update_stats(&acc, &w, &THRESHOLDS).significant_fraction,
        separate_passes(&acc, &w, &THRESHOLDS).significant_fraction
    );
    let mut group = c.benchmark_group("update-stats-1M");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((8 * ELEMENTS) as u64));
    group.bench_function("separate passes (baseline)", |b| {
        b.iter(|| black_box(separate_passes(black_box(&acc), black_box(&w), &THRESHOLDS)))
    });
    group.bench_function("update_stats (one pass)", |b| {
        b.iter(|| black_box(update_stats(black_box(&acc), black_box(&w), &THRESHOLDS)))
    });
    group.finish();
}

criterion_group!(benches, stats);
criterion_main!(benches);
