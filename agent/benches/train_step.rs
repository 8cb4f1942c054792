//! Milliseconds per training step (forward, backward, Adam) on CPU, for the digits MLP, the
//! CIFAR-10 CNN and the residual CNN at batch 64, and the transformer at 32 windows of 64
//! bytes, each beside a forward-only pass of the same batch measured in the same run (the
//! baseline the step is reported against). The allocator is tuned as the binary tunes it
//! (`weightgrad::alloc_tuning`).
//!
//! Adam's step alone and the whole step with its one-pass CPU update, each against candle's
//! tensor operations in the same run.
//!
//! Run: `cargo bench -p weightgrad --bench train_step` (`-- adam` for the Adam groups);
//! `bench/peers/train_step_compare.py` runs the model groups beside PyTorch.

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use weightgrad::train::{Model, ModelSpec, Optimizer, OptimizerSpec};

const BATCH: usize = 64;

fn bench_model(c: &mut Criterion, name: &str, spec: ModelSpec, sample: &[usize]) {
    let dev = Device::Cpu;
    let model = Model::new(&spec, sample, 10, 0, &dev).expect("model");
    let mut shape = vec![BATCH];
    shape.extend(sample);
    let x = Tensor::rand(0f32, 1.0, shape, &dev).expect("input");
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let y = Tensor::from_vec(labels, BATCH, &dev).expect("labels");
    bench_steps(c, name, &model, &x, &y);
}

/// The transformer on 32 windows of 64 byte tokens (pseudo-random, fixed).
fn bench_transformer(c: &mut Criterion, name: &str, spec: ModelSpec) {
    let dev = Device::Cpu;
    let (windows, len) = (32, 64);
    let model = Model::new(&spec, &[len], 256, 0, &dev).expect("model");
    let tokens: Vec<f32> = (0..windows * len)
        .map(|i| ((i * 7919 + 13) % 256) as f32)
        .collect();
    let x = Tensor::from_vec(tokens, (windows, len), &dev).expect("input");
    let next: Vec<u32> = (0..windows as u32).map(|i| (i * 31) % 256).collect();
    let y = Tensor::from_vec(next, windows, &dev).expect("labels");
    bench_steps(c, name, &model, &x, &y);
}

fn bench_steps(c: &mut Criterion, name: &str, model: &Model, x: &Tensor, y: &Tensor) {
    let (x, y) = (x.clone(), y.clone());
    let mut opt = Optimizer::new(OptimizerSpec::adam(), model.vars()).expect("optimizer");
    let mut group = c.benchmark_group(name);
    group.bench_function("forward (baseline)", |b| {
        b.iter(|| model.forward(&x).expect("forward"))
    });
    group.bench_function("train step", |b| {
        b.iter(|| {
            let (_, grads) = model.loss_and_grads(&x, &y).expect("grads");
            opt.step(model.vars(), &grads, 1e-3).expect("step");
        })
    });
    group.finish();
}

/// Adam's step alone on a model's parameters, one pass over each (the default on CPU)
/// against candle's tensor operations (the baseline, what other devices run), then the
/// whole training step both ways.
fn bench_adam(c: &mut Criterion, name: &str, spec: ModelSpec, sample: &[usize]) {
    let dev = Device::Cpu;
    let model = Model::new(&spec, sample, 10, 0, &dev).expect("model");
    let grads: Vec<Tensor> = model
        .vars()
        .iter()
        .map(|v| v.as_tensor().ones_like().expect("grad") * 1e-3)
        .collect::<Result<_, _>>()
        .expect("grads");
    let mut shape = vec![BATCH];
    shape.extend(sample);
    let x = Tensor::rand(0f32, 1.0, shape, &dev).expect("input");
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let y = Tensor::from_vec(labels, BATCH, &dev).expect("labels");
    let mut group = c.benchmark_group(name);
    for (label, fused) in [("tensor ops (baseline)", false), ("fused", true)] {
        let mut opt = Optimizer::new(OptimizerSpec::adam(), model.vars()).expect("optimizer");
        opt.set_fused(fused);
        group.bench_function(format!("adam step, {label}"), |b| {
            b.iter(|| opt.step(model.vars(), &grads, 1e-3).expect("step"))
        });
        group.bench_function(format!("train step, {label}"), |b| {
            b.iter(|| {
                let (_, grads) = model.loss_and_grads(&x, &y).expect("grads");
                opt.step(model.vars(), &grads, 1e-3).expect("step");
            })
        });
    }
    group.finish();
}

fn train_steps(c: &mut Criterion) {
    weightgrad::alloc_tuning::keep_freed_memory();
    bench_model(c, "mlp-digits-b64", ModelSpec::default_mlp(), &[1, 8, 8]);
    bench_model(c, "cnn-cifar-b64", ModelSpec::Cnn, &[3, 32, 32]);
    bench_model(
        c,
        "resnet16-cifar-b64",
        ModelSpec::Resnet { width: 16 },
        &[3, 32, 32],
    );
    bench_transformer(
        c,
        "transformer-2x64-b32x64",
        ModelSpec::default_transformer(64),
    );
    let wide = ModelSpec::parse("mlp:1024,1024").expect("the wide MLP");
    bench_adam(c, "adam-mlp-1024-1024", wide, &[1, 8, 8]);
    bench_adam(c, "adam-cnn-cifar", ModelSpec::Cnn, &[3, 32, 32]);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(5));
    targets = train_steps
}
criterion_main!(benches);
