//! Encode and decode throughput of whole frames, in bytes of fp32 input per second, beside a
//! memcpy of the same buffer (the baseline measured in the same run), and compression ratios.
//!
//! Run: `cargo bench -p weightgrad-codec --bench codec`
//! (set `CODEC_BENCH_SIZES=1048576` to skip the 16M cases).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::hint::black_box;
use weightgrad_codec::{
    DitherRng, EncodeOptions, FrameMeta, Limits, Quantizer, Update, decode_reusing, encode,
    encode_reusing,
};

fn sizes() -> Vec<usize> {
    std::env::var("CODEC_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1 << 20, 1 << 24])
}

fn gradient_like(n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 1e-3).expect("normal");
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

fn one_percent(x: &[f32]) -> Update {
    let indices: Vec<u32> = (0..x.len() as u32).step_by(100).collect();
    let values = indices.iter().map(|&i| x[i as usize]).collect();
    Update::Sparse { indices, values }
}

fn codec(c: &mut Criterion) {
    let meta = FrameMeta {
        sender: "bench".into(),
        clock: 0,
        tensor: 0,
    };
    let limits = Limits::default();
    for n in sizes() {
        let x = gradient_like(n);
        let mut group = c.benchmark_group(format!("codec-{}M", n >> 20));
        group.sample_size(10);
        group.throughput(Throughput::Bytes((4 * n) as u64));
        let mut dst = vec![0f32; n];
        group.bench_function("memcpy (baseline)", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&x));
                black_box(&dst);
            })
        });
        let dense = Update::Dense(x.clone());
        let sparse = one_percent(&x);
        for bits in [1u8, 2, 4, 8] {
            for (shape, update) in [("dense", &dense), ("sparse1%", &sparse)] {
                for zstd in [None, Some(1), Some(3)] {
                    let opts = EncodeOptions {
                        quantizer: Quantizer::uniform(bits),
                        zstd_level: zstd,
                    };
                    let label = format!(
                        "{bits}bit-{shape}-{}",
                        zstd.map_or("raw".to_string(), |l| format!("zstd{l}"))
                    );
                    let frame =
                        encode(&meta, n, update, &opts, &mut DitherRng::new(1)).expect("encode");
                    eprintln!(
                        "{} {label}: frame {} bytes, fp32/frame = {:.1}x",
                        n,
                        frame.bytes.len(),
                        (4 * n) as f64 / frame.bytes.len() as f64
                    );
                    group.bench_function(BenchmarkId::new("encode", &label), |b| {
                        // As the agent does each round: the decoded buffer is reused.
                        let mut rng = DitherRng::new(1);
                        let mut spare = Vec::new();
                        b.iter(|| {
                            let e = encode_reusing(
                                &meta,
                                n,
                                black_box(update),
                                &opts,
                                &mut rng,
                                std::mem::take(&mut spare),
                            )
                            .expect("encode");
                            spare = e.decoded.into_values();
                            e.bytes.len()
                        })
                    });
                    group.bench_function(BenchmarkId::new("decode", &label), |b| {
                        let mut spare = Vec::new();
                        b.iter(|| {
                            let f = decode_reusing(
                                black_box(&frame.bytes),
                                &limits,
                                std::mem::take(&mut spare),
                            )
                            .expect("decode");
                            spare = f.update.into_values();
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
