//! What one link takes from one 1024×1024 accumulator every round under the weightgrad
//! policy (`filter::significant_top`: the significant elements at τ = 0.05, capped at the
//! 0.5% of largest magnitude), against filtering every significant element out first and
//! then keeping the largest by a selection over their positions, returning the rest (the
//! baseline, measured in the same run). One thread; each iteration starts from the same
//! accumulator.
//!
//! Run: `cargo bench -p weightgrad-codec --bench significant_top`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::hint::black_box;
use weightgrad_codec::filter::{Selection, significance_filter, significant_top};

const ELEMENTS: usize = 1 << 20;
const TAU: f32 = 0.05;
const SHARE: f64 = 0.005;

/// Every significant element out, then the `k` largest kept by a selection over their
/// positions; the others go back.
fn filter_then_cap(acc: &mut [f32], w: &[f32], k: usize) -> Selection {
    let all = significance_filter(acc, w, TAU);
    if all.len() <= k {
        return all;
    }
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        all.values[b as usize]
            .abs()
            .total_cmp(&all.values[a as usize].abs())
    });
    order.truncate(k);
    order.sort_unstable();
    let mut keep = vec![false; all.len()];
    for &j in &order {
        keep[j as usize] = true;
    }
    let mut out = Selection::default();
    for ((&i, &v), keep) in all.indices.iter().zip(&all.values).zip(keep) {
        if keep {
            out.indices.push(i);
            out.values.push(v);
        } else {
            acc[i as usize] = v;
        }
    }
    out
}

fn top(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let weights = Normal::new(0.0f32, 0.03).expect("normal");
    let updates = Normal::new(0.0f32, 2e-3).expect("normal");
    let w: Vec<f32> = (0..ELEMENTS).map(|_| weights.sample(&mut rng)).collect();
    let acc: Vec<f32> = (0..ELEMENTS).map(|_| updates.sample(&mut rng)).collect();
    let k = (ELEMENTS as f64 * SHARE).ceil() as usize;
    let (mut a, mut b) = (acc.clone(), acc.clone());
    let (fast, slow) = (
        significant_top(&mut a, &w, TAU, k),
        filter_then_cap(&mut b, &w, k),
    );
    assert_eq!(fast.len(), k);
    assert_eq!(fast.indices, slow.indices);
    assert_eq!(a, b);
    let mut group = c.benchmark_group("significant-top-1M");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((8 * ELEMENTS) as u64));
    group.bench_function("filter, then cap (baseline)", |bench| {
        bench.iter_batched_ref(
            || acc.clone(),
            |acc| black_box(filter_then_cap(acc, black_box(&w), k)),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("significant_top (one pass)", |bench| {
        bench.iter_batched_ref(
            || acc.clone(),
            |acc| black_box(significant_top(acc, black_box(&w), TAU, k)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, top);
criterion_main!(benches);
