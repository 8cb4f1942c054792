//! Cost of asking a policy for a round's plans, natively and as a sandboxed WebAssembly
//! component, for 10, 100 and 1000 tensors on two links; beside it, one digits-MLP
//! training step at batch 64 measured in the same run (the baseline the call is compared
//! to); and the latency of a hot swap (compile + self-test + swap).
//!
//! Run: `cargo bench -p weightgrad --bench policy_call`

use candle_core::{Device, Tensor};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use weightgrad::policies::builtin;
use weightgrad::policy::{
    FailStrategy, PolicyRuntime, Sandbox, SandboxLimits, builtin_wasm, golden_input,
};
use weightgrad::train::{Model, ModelSpec, Optimizer, OptimizerSpec};
use weightgrad_sdk::PolicyInput;

fn input_with(tensors: usize) -> PolicyInput {
    let mut input = golden_input();
    for link in &mut input.links {
        let template = link.tensors[0].clone();
        link.tensors = vec![template; tensors];
    }
    input
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy-call");
    // Baseline: one digits-MLP training step (forward, backward, Adam) at batch 64.
    let dev = Device::Cpu;
    let model = Model::new(&ModelSpec::default_mlp(), &[1, 8, 8], 10, 0, &dev).expect("model");
    let x = Tensor::rand(0f32, 1.0, (64, 1, 8, 8), &dev).expect("x");
    let y = Tensor::from_vec((0..64u32).map(|i| i % 10).collect::<Vec<_>>(), 64, &dev).expect("y");
    let mut opt = Optimizer::new(OptimizerSpec::adam(), model.vars()).expect("opt");
    group.bench_function("mlp train step (baseline)", |b| {
        b.iter(|| {
            let (_, g) = model.loss_and_grads(&x, &y).expect("grads");
            opt.step(model.vars(), &g, 1e-3).expect("step");
        })
    });
    let sandbox = Arc::new(Sandbox::new(SandboxLimits::default()).expect("sandbox"));
    let native = builtin("weightgrad").expect("native");
    let runtime = PolicyRuntime::new(
        sandbox.clone(),
        builtin_wasm("weightgrad").expect("wasm"),
        FailStrategy::LastGood,
    )
    .expect("runtime");
    for tensors in [10usize, 100, 1000] {
        let input = input_with(tensors);
        group.bench_with_input(BenchmarkId::new("native", tensors), &input, |b, i| {
            b.iter(|| native.decide(i))
        });
        group.bench_with_input(BenchmarkId::new("wasm", tensors), &input, |b, i| {
            b.iter(|| runtime.decide_round(i))
        });
    }
    group.bench_function("swap (compile + self-test + swap)", |b| {
        b.iter_batched(
            || {
                let sb = Arc::new(Sandbox::new(SandboxLimits::default()).expect("sandbox"));
                PolicyRuntime::new(
                    sb,
                    builtin_wasm("full-sync").expect("wasm"),
                    FailStrategy::LastGood,
                )
                .expect("rt")
            },
            |rt| {
                rt.swap(builtin_wasm("weightgrad").expect("wasm"))
                    .expect("swap")
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
