//! Loss-aware weight quantization of one 1024×1024 weight tensor, as the LAN quantizes ŵ
//! every step (`LaqSolver::for_lan`: the scale search at 8 bits, the exact ternary search
//! at 2 bits, split sign), beside a memcpy of the same weights (the baseline measured in
//! the same run). One thread.
//!
//! Run: `cargo bench -p weightgrad-codec --bench laq`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::hint::black_box;
use weightgrad_codec::laq::{LaqSolver, curvature_from_adam, laq_quantize, laq_quantize_into};

const WEIGHTS: usize = 1 << 20;

/// Weights of an initialised layer and a curvature from Adam-like second moments.
fn layer() -> (Vec<f32>, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let w = Normal::new(0.0f32, 0.03).expect("normal");
    let g = Normal::new(0.0f32, 1e-3).expect("normal");
    let weights = (0..WEIGHTS).map(|_| w.sample(&mut rng)).collect();
    let v: Vec<f32> = (0..WEIGHTS).map(|_| g.sample(&mut rng).powi(2)).collect();
    (weights, curvature_from_adam(&v, 1e-8))
}

fn laq(c: &mut Criterion) {
    let (w, d) = layer();
    let mut group = c.benchmark_group("laq-1M");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((4 * WEIGHTS) as u64));
    let mut dst = vec![0f32; WEIGHTS];
    group.bench_function("memcpy (baseline)", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&w));
            black_box(&dst);
        })
    });
    for (name, solver) in [
        ("linear-approx 8-bit", LaqSolver::for_lan(8)),
        ("ternary-exact", LaqSolver::for_lan(2)),
    ] {
        // As the LAN does: the level buffer is reused from step to step.
        let mut out = laq_quantize(&w, &d, solver, true);
        group.bench_function(name, |b| {
            b.iter(|| {
                laq_quantize_into(black_box(&w), black_box(&d), solver, true, &mut out);
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, laq);
criterion_main!(benches);
