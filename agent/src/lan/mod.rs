//! Inside one region (LAN): K workers train on the loss-aware quantized weights ŵ, send
//! quantized gradients to the region's aggregator, which averages them, steps the optimizer
//! on the full-precision weights w and re-quantizes ŵ. In data mode ([`data`]) workers send
//! their quantized minibatches instead and the aggregator computes the gradients. Every LAN
//! byte is counted where it is encoded: ŵ out to each worker, each worker's message back.

pub mod data;

use crate::sync::TensorMeta;
use crate::train::{
    Dataset, Model, ModelSpec, Optimizer, OptimizerSpec, batch::batch_tensors,
    cpu_buffers::with_f32_elements, eval::Evaluation, eval::evaluate, rng::seeded_rng,
};
use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use weightgrad_codec::laq::{LaqSolver, LaqWeights, laq_quantize_into};
use weightgrad_codec::pack::packed_len;
use weightgrad_codec::{
    DitherRng, EncodeOptions, FrameMeta, Limits, Quantizer, decode, encode_dense,
};
use weightgrad_sdk::{DataPlan, LanInput, LanMode, LanPlan};

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

/// One worker's place in its data, for checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerState {
    /// This epoch's sample order.
    pub order: Vec<usize>,
    /// Next position in `order`.
    pub cursor: usize,
    /// Epochs started.
    pub epoch: u64,
}

/// Everything a [`RegionTrainer`] holds that training changes, for checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Full-precision weights.
    pub weights: Vec<Vec<f32>>,
    /// Optimizer slots (e.g. Adam's moments), slot × tensor, flattened.
    pub optimizer: Vec<Vec<Vec<f32>>>,
    /// Optimizer steps.
    pub optimizer_steps: u64,
    /// Region steps.
    pub steps: u64,
    /// LAN bytes so far.
    pub lan_bytes: u64,
    /// Per worker.
    pub workers: Vec<WorkerState>,
}

/// Result of one region step.
#[derive(Debug)]
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
    classes: usize,
    steps: u64,
    lan_bytes: u64,
    seed: u64,
    data_mode_allowed: bool,
    /// Per tensor, the buffers ŵ is quantized into at every step (reused: fresh ones of a
    /// large model's size would cost their page faults each step).
    quantizing: Vec<Quantizing>,
    /// Whether the workers run in threads of their own or in turn on the caller's.
    parallel_workers: bool,
}

/// One tensor's reusable buffers for ŵ: the curvature and the quantized weights.
#[derive(Debug, Default)]
struct Quantizing {
    curvature: Vec<f32>,
    laq: Option<LaqWeights>,
}

/// Where a region's workers sit relative to its aggregator, as the operator configures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct LanPlacement {
    /// The workers reach the aggregator over a WAN (another site or region).
    pub crosses_wan: bool,
    /// Data mode may send (quantized) samples over that WAN anyway.
    pub allow_data_over_wan: bool,
}

impl LanPlacement {
    /// Data mode keeps samples inside their region unless explicitly allowed otherwise.
    pub fn data_mode_allowed(&self) -> bool {
        !self.crosses_wan || self.allow_data_over_wan
    }
}

/// Runs `job` on every worker, in a thread each when `parallel` and in turn on this thread
/// otherwise, and collects the results in worker order.
fn run_workers<T: Send>(
    workers: &mut [Worker],
    parallel: bool,
    job: impl Fn(usize, &mut Worker) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    if !parallel {
        return workers
            .iter_mut()
            .enumerate()
            .map(|(k, worker)| job(k, worker))
            .collect();
    }
    std::thread::scope(|scope| {
        let job = &job;
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(k, worker)| scope.spawn(move || job(k, worker)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    })
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
                role: t.kind.role(),
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
            classes,
            steps: 0,
            lan_bytes: 0,
            seed,
            // Token ids are not features: quantizing them would change the text.
            data_mode_allowed: !spec.is_language_model(),
            quantizing: Vec::new(),
            parallel_workers: !crate::train::device::one_compute_thread(),
        })
    }

    /// Whether the workers' part of a step runs in a thread per worker (the default where
    /// the process has more than one compute thread) or in turn on the calling thread
    /// (the default with one: threads would only take turns on its core, at the cost of
    /// their start-up and of each other's caches). The results are the same either way.
    pub fn set_parallel_workers(&mut self, parallel: bool) {
        self.parallel_workers = parallel;
    }

    /// A fresh model of this region's architecture, for evaluating snapshots of its weights
    /// elsewhere (another thread).
    pub fn evaluation_model(&self) -> Result<Model> {
        let sample = &self.workers[0].data.sample_shape;
        Model::new(
            self.model.spec(),
            sample,
            self.classes,
            0,
            self.model.device(),
        )
    }

    /// Where this region's workers sit (default: beside the aggregator). Data mode is
    /// refused when they reach it over a WAN unless the operator allowed data over it, and
    /// always for a language model (its samples are token ids).
    pub fn set_placement(&mut self, placement: LanPlacement) {
        self.data_mode_allowed =
            placement.data_mode_allowed() && !self.model.spec().is_language_model();
    }

    /// The LAN as a policy's cost model sees it.
    pub fn lan_input(&self) -> LanInput {
        LanInput {
            workers: self.workers.len() as u32,
            batch_size: self.batch_size as u32,
            sample_features: self.model.sample_shape().iter().product::<usize>() as u64,
            classes: self.classes as u32,
            tensor_sizes: self.metas.iter().map(|m| m.numel as u64).collect(),
            data_mode_allowed: self.data_mode_allowed,
        }
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

    /// ŵ for the workers and the bytes one copy of it costs on the LAN: computed once per
    /// step, whatever the number of workers.
    fn quantized_weights(&mut self, bits: u8) -> Result<(Vec<Vec<f32>>, u64)> {
        self.quantizing
            .resize_with(self.weights.len(), Quantizing::default);
        let mut bytes = 0u64;
        let mut w_hat = Vec::with_capacity(self.weights.len());
        for (i, (w, meta)) in self.weights.iter().zip(&self.metas).enumerate() {
            if bits == 32 || !meta.role.is_matrix() {
                bytes += 4 * w.len() as u64;
                w_hat.push(w.clone());
                continue;
            }
            let q = &mut self.quantizing[i];
            // Curvature `sqrt(v) + ε` from Adam's second moment; flat before the first step.
            let from_adam = self.steps > 0 && self.opt.curvature_into(i, 1e-8, &mut q.curvature)?;
            if !from_adam {
                q.curvature.clear();
                q.curvature.resize(w.len(), 1.0);
            }
            let solver = LaqSolver::for_lan(bits);
            let laq = q.laq.get_or_insert_with(|| LaqWeights {
                alpha_pos: 0.0,
                alpha_neg: 0.0,
                k: solver.levels(),
                levels: Vec::new(),
            });
            laq_quantize_into(w, &q.curvature, solver, true, laq);
            // Levels packed at `bits` bits, plus α⁺ and α⁻.
            bytes += packed_len(w.len(), bits) as u64 + 8;
            w_hat.push(laq.dequantize());
        }
        Ok((w_hat, bytes))
    }

    /// One synchronous LAN step at learning rate `lr` under `plan`. A data-mode plan where
    /// data mode is not allowed is an error and changes nothing.
    pub fn step(&mut self, plan: &LanPlan, lr: f64) -> Result<StepResult> {
        let (loss, gradient) = match plan.mode {
            LanMode::Gradient => self.gradient_mode(plan)?,
            LanMode::Data(data) => {
                ensure!(
                    self.data_mode_allowed,
                    "region {}: the LAN plan chooses data mode, but its workers reach the \
                     aggregator over a WAN and allow_data_over_wan is not set",
                    self.name
                );
                self.data_mode(plan, &data)?
            }
        };
        self.apply(gradient, lr)
            .map(|delta| StepResult { loss, delta })
    }

    /// Gradient mode: workers compute gradients on ŵ and send them quantized; returns the
    /// mean loss and the averaged gradient.
    fn gradient_mode(&mut self, plan: &LanPlan) -> Result<(f32, Vec<Vec<f32>>)> {
        let (w_hat, w_hat_bytes) = self.quantized_weights(plan.weight_bits)?;
        self.lan_bytes += w_hat_bytes * self.workers.len() as u64;
        let batch = self.batch_size;
        let step = self.steps;
        let name = &self.name;
        let seed = self.seed;
        let gradient_bits = &plan.gradient_bits;
        let results = run_workers(&mut self.workers, self.parallel_workers, |k, worker| {
            worker.model.import(&w_hat)?;
            let idx = worker.next_batch(batch);
            let (x, y) = batch_tensors(&worker.data, &idx, worker.model.device())?;
            let (loss, grads) = worker.model.loss_and_grads(&x, &y)?;
            let mut rng = DitherRng::new(seed ^ (step << 8) ^ k as u64);
            let frames = grads
                .iter()
                .enumerate()
                .map(|(t, g)| {
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
                    with_f32_elements(g, |values| {
                        Ok(encode_dense(&meta, values, &opts, &mut rng, Vec::new())?.bytes)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((loss, frames))
        });
        // Aggregator: decode every worker's frames and average.
        let k = self.workers.len() as f32;
        let mut sum = self.zeros();
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
        Ok((loss, sum))
    }

    /// Data mode: workers send quantized minibatches (and, when refining, a correction
    /// computed on ŵ); the aggregator computes and averages the gradients.
    fn data_mode(&mut self, plan: &LanPlan, data_plan: &DataPlan) -> Result<(f32, Vec<Vec<f32>>)> {
        let refine = data_plan.refine_bits > 0;
        let w_hat = if refine {
            let (w_hat, bytes) = self.quantized_weights(plan.weight_bits)?;
            self.lan_bytes += bytes * self.workers.len() as u64;
            Some(w_hat)
        } else {
            None
        };
        let batch = self.batch_size;
        let step = self.steps;
        let name = &self.name;
        let seed = self.seed;
        let results = run_workers(&mut self.workers, self.parallel_workers, |k, worker| {
            if let Some(w_hat) = &w_hat {
                worker.model.import(w_hat)?;
            }
            let idx = worker.next_batch(batch);
            let (x, y) = batch_tensors(&worker.data, &idx, worker.model.device())?;
            let mut rng = DitherRng::new(seed ^ (step << 8) ^ k as u64);
            let sender = format!("{name}/worker{k}");
            data::worker_message(&worker.model, &x, &y, data_plan, &sender, step, &mut rng)
        });
        // The aggregator computes on the weights the refinement was taken at: ŵ when
        // refining, else its full-precision w.
        self.model.import(w_hat.as_ref().unwrap_or(&self.weights))?;
        let k = self.workers.len() as f32;
        let mut sum = self.zeros();
        let mut loss = 0.0;
        let limits = Limits::default();
        for r in results {
            let message = r?;
            self.lan_bytes += message.wire_len() as u64;
            let (l, grads) = data::message_gradient(&self.model, self.classes, &message, &limits)?;
            loss += l / k;
            for (s, g) in sum.iter_mut().zip(&grads) {
                s.iter_mut().zip(g).for_each(|(s, g)| *s += g / k);
            }
        }
        Ok((loss, sum))
    }

    fn zeros(&self) -> Vec<Vec<f32>> {
        self.metas.iter().map(|m| vec![0.0; m.numel]).collect()
    }

    /// Steps the optimizer on w with `gradient`; returns the change in w.
    fn apply(&mut self, gradient: Vec<Vec<f32>>, lr: f64) -> Result<Vec<Vec<f32>>> {
        let specs = self.model.manifest().tensors.clone();
        let grads = gradient
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
        Ok(delta)
    }

    /// The state training changes, for a checkpoint.
    pub fn export_state(&self) -> Result<TrainerState> {
        let (slots, optimizer_steps) = self.opt.state();
        let optimizer = slots
            .into_iter()
            .map(|(_, tensors)| {
                tensors
                    .iter()
                    .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainerState {
            weights: self.weights.clone(),
            optimizer,
            optimizer_steps,
            steps: self.steps,
            lan_bytes: self.lan_bytes,
            workers: self
                .workers
                .iter()
                .map(|w| WorkerState {
                    order: w.order.clone(),
                    cursor: w.cursor,
                    epoch: w.epoch,
                })
                .collect(),
        })
    }

    /// Restores a state exported by a trainer of the same model and workers; on error
    /// nothing changes.
    pub fn restore_state(&mut self, s: TrainerState) -> Result<()> {
        let specs = self.model.manifest().tensors.clone();
        ensure!(
            s.weights.len() == specs.len()
                && s.weights
                    .iter()
                    .zip(&specs)
                    .all(|(w, t)| w.len() == t.numel()),
            "the checkpoint's weights do not fit the model"
        );
        ensure!(
            s.workers.len() == self.workers.len(),
            "the checkpoint has {} workers, the configuration {}",
            s.workers.len(),
            self.workers.len()
        );
        for (w, ws) in self.workers.iter().zip(&s.workers) {
            ensure!(
                ws.cursor <= ws.order.len() && ws.order.iter().all(|&i| i < w.data.len()),
                "the checkpoint's data order does not fit this region's shard"
            );
        }
        let slots = s
            .optimizer
            .iter()
            .map(|slot| {
                ensure!(
                    slot.len() == specs.len(),
                    "optimizer state does not fit the model"
                );
                slot.iter()
                    .zip(&specs)
                    .map(|(v, t)| {
                        Ok(Tensor::from_vec(
                            v.clone(),
                            t.shape.as_slice(),
                            self.model.device(),
                        )?)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        self.opt.restore(slots, s.optimizer_steps)?;
        self.weights = s.weights;
        self.steps = s.steps;
        self.lan_bytes = s.lan_bytes;
        for (w, ws) in self.workers.iter_mut().zip(s.workers) {
            w.order = ws.order;
            w.cursor = ws.cursor;
            w.epoch = ws.epoch;
        }
        Ok(())
    }

    /// Top-1 and loss of the full-precision weights on `test`.
    pub fn evaluate(&self, test: &Dataset) -> Result<Evaluation> {
        self.model.import(&self.weights)?;
        evaluate(&self.model, test)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::{ShardStrategy, embedded_digits, shard_indices};
    use weightgrad_sdk::DataScale;

    fn region(parallel: bool) -> RegionTrainer {
        let data = embedded_digits().unwrap();
        let shards = (0..2)
            .map(|k| {
                let idx = shard_indices(&data.train.labels, 2, k, ShardStrategy::Iid, 0);
                data.train.subset(&idx)
            })
            .collect();
        let spec = ModelSpec::Mlp { hidden: vec![16] };
        let mut r = RegionTrainer::new("r", &spec, shards, data.train.classes, 8, 0, 5).unwrap();
        r.set_parallel_workers(parallel);
        r
    }

    #[test]
    fn workers_in_turn_or_in_threads_take_the_same_steps_to_the_bit() {
        let quantized = LanPlan {
            gradient_bits: vec![8, 32, 8, 32],
            weight_bits: 8,
            mode: LanMode::Gradient,
        };
        let data = LanPlan {
            mode: LanMode::Data(DataPlan {
                feature_bits: 4,
                scale: DataScale::PerFeature,
                refine_bits: 2,
            }),
            ..LanPlan::FULL_PRECISION
        };
        let plans = [quantized, LanPlan::FULL_PRECISION, data];
        let (mut threads, mut in_turn) = (region(true), region(false));
        for round in 0..9 {
            let plan = &plans[round % plans.len()];
            let a = threads.step(plan, 1e-2).unwrap();
            let b = in_turn.step(plan, 1e-2).unwrap();
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "round {round}");
            assert!(a.delta == b.delta, "round {round}: the updates differ");
            assert!(
                a.delta.iter().flatten().any(|d| *d != 0.0),
                "round {round}: a step must move the weights for the comparison to mean anything"
            );
        }
        assert!(threads.weights == in_turn.weights);
        assert_eq!(threads.lan_bytes(), in_turn.lan_bytes());
    }
}
