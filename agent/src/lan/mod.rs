//! Inside one region (LAN): K workers train on the loss-aware quantized weights ŵ, send
//! quantized gradients to the region's aggregator, which averages them, steps the optimizer
//! on the full-precision weights w and re-quantizes ŵ. Every LAN byte is counted where it is
//! encoded: ŵ out to each worker, each worker's gradient frame back.

use crate::sync::TensorMeta;
use crate::train::{
    Dataset, Model, ModelSpec, Optimizer, OptimizerSpec, batch::batch_tensors, eval::Evaluation,
    eval::evaluate, rng::seeded_rng,
};
use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use weightgrad_codec::laq::{LaqSolver, curvature_from_adam, laq_quantize};
use weightgrad_codec::pack::packed_len;
use weightgrad_codec::{
    DitherRng, EncodeOptions, FrameMeta, Limits, Quantizer, Update, decode, encode,
};
use weightgrad_sdk::{LanPlan, TensorRole};

/// One worker: its shard and its own replica of ŵ.
struct Worker {
    model: Model,
    data: Dataset,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    seed: u64,
}

impl Worker {
    fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        if self.cursor >= self.order.len() {
            self.order = (0..self.data.len()).collect();
            self.order
                .shuffle(&mut seeded_rng(self.seed, "worker-order", self.epoch));
            self.epoch += 1;
            self.cursor = 0;
        }
        let end = (self.cursor + batch).min(self.order.len());
        let idx = self.order[self.cursor..end].to_vec();
        self.cursor = end;
        idx
    }
}

/// Result of one region step.
pub struct StepResult {
    /// Mean worker loss on their batches.
    pub loss: f32,
    /// New minus old full-precision weights (the region's local update).
    pub delta: Vec<Vec<f32>>,
}

/// A region's aggregator and workers.
pub struct RegionTrainer {
    name: String,
    /// Full-precision weights, manifest order (the source of truth; peers' updates land here).
    pub weights: Vec<Vec<f32>>,
    model: Model,
    opt: Optimizer,
    workers: Vec<Worker>,
    metas: Vec<TensorMeta>,
    batch_size: usize,
    steps: u64,
    lan_bytes: u64,
    seed: u64,
}

impl RegionTrainer {
    /// A region whose `shards` (one per worker) train `spec`; all regions share `init_seed`
    /// so they start from the same weights.
    pub fn new(
        name: &str,
        spec: &ModelSpec,
        shards: Vec<Dataset>,
        classes: usize,
        batch_size: usize,
        init_seed: u64,
        seed: u64,
    ) -> Result<Self> {
        ensure!(!shards.is_empty(), "a region needs at least one worker");
        let device = Device::Cpu;
        let sample = shards[0].sample_shape.clone();
        let model = Model::new(spec, &sample, classes, init_seed, &device)?;
        let metas = model
            .manifest()
            .tensors
            .iter()
            .map(|t| TensorMeta {
                numel: t.numel(),
                role: match t.kind {
                    crate::train::TensorKind::Weight => TensorRole::Weight,
                    crate::train::TensorKind::Bias => TensorRole::Bias,
                },
            })
            .collect();
        let workers = shards
            .into_iter()
            .enumerate()
            .map(|(k, data)| {
                Ok(Worker {
                    model: Model::new(spec, &sample, classes, init_seed, &device)?,
                    order: Vec::new(),
                    cursor: 0,
                    epoch: 0,
                    seed: seed.wrapping_add(1000 * (k as u64 + 1)),
                    data,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.into(),
            weights: model.export()?,
            opt: Optimizer::new(OptimizerSpec::adam(), model.vars())?,
            model,
            workers,
            metas,
            batch_size,
            steps: 0,
            lan_bytes: 0,
            seed,
        })
    }

    /// Tensor sizes and roles, manifest order.
    pub fn metas(&self) -> &[TensorMeta] {
        &self.metas
    }

    /// The full-precision model's manifest hash.
    pub fn manifest_hash(&self) -> String {
        self.model.manifest().hash()
    }

    /// LAN bytes so far (both directions).
    pub fn lan_bytes(&self) -> u64 {
        self.lan_bytes
    }

    /// Samples one step consumes (all workers together).
    pub fn samples_per_step(&self) -> usize {
        self.batch_size * self.workers.len()
    }

    /// Samples held by this region's workers.
    pub fn samples(&self) -> usize {
        self.workers.iter().map(|w| w.data.len()).sum()
    }

    /// ŵ for the workers and the bytes one copy of it costs on the LAN.
    fn quantized_weights(&self, bits: u8) -> (Vec<Vec<f32>>, u64) {
        let curvature = self.opt.second_moment();
        let mut bytes = 0u64;
        let w_hat = self
            .weights
            .iter()
            .zip(&self.metas)
            .enumerate()
            .map(|(i, (w, meta))| {
                if bits == 32 || meta.role == TensorRole::Bias {
                    bytes += 4 * w.len() as u64;
                    return w.clone();
                }
                let d = curvature
                    .as_ref()
                    .filter(|_| self.steps > 0)
                    .and_then(|v| v[i].flatten_all().ok()?.to_vec1::<f32>().ok())
                    .map(|v| curvature_from_adam(&v, 1e-8))
                    .unwrap_or_else(|| vec![1.0; w.len()]);
                let solver = if bits == 2 {
                    LaqSolver::TernaryExact
                } else {
                    LaqSolver::LinearApprox { bits, iters: 10 }
                };
                let q = laq_quantize(w, &d, solver, true);
                // Levels packed at `bits` bits, plus α⁺ and α⁻.
                bytes += packed_len(w.len(), bits) as u64 + 8;
                q.dequantize()
            })
            .collect();
        (w_hat, bytes)
    }

    /// One synchronous LAN step at learning rate `lr` under `plan`.
    pub fn step(&mut self, plan: &LanPlan, lr: f64) -> Result<StepResult> {
        let (w_hat, w_hat_bytes) = self.quantized_weights(plan.weight_bits);
        self.lan_bytes += w_hat_bytes * self.workers.len() as u64;
        let batch = self.batch_size;
        let step = self.steps;
        let name = &self.name;
        let seed = self.seed;
        let gradient_bits = &plan.gradient_bits;
        // Workers run in parallel threads, each on its own replica.
        let results: Vec<Result<(f32, Vec<Vec<u8>>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .enumerate()
                .map(|(k, worker)| {
                    let w_hat = &w_hat;
                    scope.spawn(move || -> Result<(f32, Vec<Vec<u8>>)> {
                        worker.model.import(w_hat)?;
                        let idx = worker.next_batch(batch);
                        let (x, y) = batch_tensors(&worker.data, &idx, worker.model.device())?;
                        let (loss, grads) = worker.model.loss_and_grads(&x, &y)?;
                        let mut rng = DitherRng::new(seed ^ (step << 8) ^ k as u64);
                        let frames = grads
                            .iter()
                            .enumerate()
                            .map(|(t, g)| {
                                let values = g.flatten_all()?.to_vec1::<f32>()?;
                                let bits = gradient_bits.get(t).copied().unwrap_or(32);
                                let quantizer = match bits {
                                    32 => Quantizer::Fp32,
                                    2 => Quantizer::terngrad(),
                                    b => Quantizer::uniform(b),
                                };
                                let meta = FrameMeta {
                                    sender: format!("{name}/worker{k}"),
                                    clock: step,
                                    tensor: t as u32,
                                };
                                let opts = EncodeOptions {
                                    quantizer,
                                    zstd_level: None,
                                };
                                Ok(encode(
                                    &meta,
                                    values.len(),
                                    &Update::Dense(values),
                                    &opts,
                                    &mut rng,
                                )?
                                .bytes)
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Ok((loss, frames))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
                })
                .collect()
        });
        // Aggregator: decode every worker's frames and average.
        let k = self.workers.len() as f32;
        let mut sum: Vec<Vec<f32>> = self.metas.iter().map(|m| vec![0.0; m.numel]).collect();
        let mut loss = 0.0;
        let limits = Limits::default();
        for r in results {
            let (l, frames) = r?;
            loss += l / k;
            for (t, bytes) in frames.iter().enumerate() {
                self.lan_bytes += bytes.len() as u64;
                let frame = decode(bytes, &limits).context("decoding a worker's gradient")?;
                frame.update.add_to(&mut sum[t], 1.0 / k);
            }
        }
        let specs = self.model.manifest().tensors.clone();
        let grads = sum
            .into_iter()
            .zip(&specs)
            .map(|(g, s)| {
                Ok(Tensor::from_vec(
                    g,
                    s.shape.as_slice(),
                    self.model.device(),
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.model.import(&self.weights)?;
        self.opt.step(self.model.vars(), &grads, lr)?;
        let new = self.model.export()?;
        let delta = new
            .iter()
            .zip(&self.weights)
            .map(|(n, o)| n.iter().zip(o).map(|(n, o)| n - o).collect())
            .collect();
        self.weights = new;
        self.steps += 1;
        Ok(StepResult { loss, delta })
    }

    /// Top-1 and loss of the full-precision weights on `test`.
    pub fn evaluate(&self, test: &Dataset) -> Result<Evaluation> {
        self.model.import(&self.weights)?;
        evaluate(&self.model, test)
    }
}
