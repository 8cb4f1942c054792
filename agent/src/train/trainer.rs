//! Single-replica training loop with exact, epoch-granular resume.

use crate::train::{
    batch::batch_tensors,
    checkpoint::Checkpoint,
    dataset::DataSplit,
    eval::{Evaluation, evaluate},
    model::{Model, ModelSpec},
    optim::{Optimizer, OptimizerSpec},
    rng::seeded_rng,
    schedule::LrSchedule,
};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything that determines a training run (with the data and the seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Name of the data source, recorded for checks on resume.
    pub dataset: String,
    /// Model to train.
    pub model: ModelSpec,
    /// Number of passes over the training set.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// Base learning rate.
    pub lr: f64,
    /// Optimizer and its hyper-parameters.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
}

impl TrainConfig {
    /// The default job: the digits MLP with Adam.
    pub fn digits_mlp(epochs: usize, seed: u64) -> Self {
        Self {
            dataset: "digits".into(),
            model: ModelSpec::default_mlp(),
            epochs,
            batch_size: 32,
            seed,
            lr: 3e-3,
            optimizer: OptimizerSpec::adam(),
            schedule: LrSchedule::Cosine { min_factor: 0.0 },
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "batch size must be positive");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "learning rate {} must be a positive number",
            self.lr
        );
        Ok(())
    }
}

/// Statistics of one finished epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// One-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Evaluation on the test set after the epoch.
    pub test: Evaluation,
}

/// A model, its optimizer and its data, advanced one epoch at a time.
pub struct Trainer {
    cfg: TrainConfig,
    data: DataSplit,
    model: Model,
    opt: Optimizer,
    epochs_done: usize,
}

const META_CONFIG: &str = "weightgrad.train.config";
const META_MANIFEST: &str = "weightgrad.manifest";
const META_PROGRESS: &str = "weightgrad.train.progress";

#[derive(Serialize, Deserialize)]
struct Progress {
    epochs_done: usize,
    optimizer_steps: u64,
}

impl Trainer {
    /// A fresh run.
    pub fn new(cfg: TrainConfig, data: DataSplit, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let model = Model::new(
            &cfg.model,
            &data.train.sample_shape,
            data.train.classes,
            cfg.seed,
            device,
        )?;
        let opt = Optimizer::new(cfg.optimizer, model.vars())?;
        Ok(Self {
            cfg,
            data,
            model,
            opt,
            epochs_done: 0,
        })
    }

    /// Continues the run saved in `ck`; the configuration must match it except for `epochs`,
    /// which may change only when the schedule does not depend on the run length.
    pub fn resume(
        cfg: TrainConfig,
        data: DataSplit,
        device: &Device,
        mut ck: Checkpoint,
        origin: &Path,
    ) -> Result<Self> {
        let saved: TrainConfig = serde_json::from_str(ck.meta(META_CONFIG, origin)?)
            .with_context(|| format!("{}: unreadable training configuration", origin.display()))?;
        if saved.epochs != cfg.epochs
            && !matches!(cfg.schedule, LrSchedule::Constant | LrSchedule::Step { .. })
        {
            bail!(
                "{}: cannot resume with {} epochs: the checkpoint's {:?} schedule depends on the \
                 number of epochs, which was {}",
                origin.display(),
                cfg.epochs,
                saved.schedule,
                saved.epochs
            );
        }
        let mut comparable = saved.clone();
        comparable.epochs = cfg.epochs;
        if comparable != cfg {
            bail!(
                "{}: cannot resume: the checkpoint was trained with {}, this run asks for {}",
                origin.display(),
                serde_json::to_string(&saved)?,
                serde_json::to_string(&cfg)?
            );
        }
        let mut t = Self::new(cfg, data, device)?;
        let hash = ck.meta(META_MANIFEST, origin)?;
        ensure!(
            hash == t.model.manifest().hash(),
            "{}: checkpoint manifest hash {hash} does not match the model's {}",
            origin.display(),
            t.model.manifest().hash()
        );
        let progress: Progress = serde_json::from_str(ck.meta(META_PROGRESS, origin)?)
            .with_context(|| format!("{}: unreadable progress record", origin.display()))?;
        let specs = t.model.manifest().tensors.clone();
        let weights = specs
            .iter()
            .map(|s| ck.take(&format!("param.{}", s.name), &s.shape, origin))
            .collect::<Result<Vec<_>>>()?;
        t.model.import(&weights)?;
        let slots = t
            .cfg
            .optimizer
            .slot_names()
            .iter()
            .map(|slot| {
                specs
                    .iter()
                    .map(|s| {
                        let v = ck.take(&format!("opt.{slot}.{}", s.name), &s.shape, origin)?;
                        Ok(Tensor::from_vec(v, s.shape.as_slice(), device)?)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        t.opt.restore(slots, progress.optimizer_steps)?;
        t.epochs_done = progress.epochs_done;
        Ok(t)
    }

    /// Saves weights, optimizer state, configuration and progress.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint::default();
        let specs = &self.model.manifest().tensors;
        for (s, v) in specs.iter().zip(self.model.export()?) {
            ck.insert(format!("param.{}", s.name), s.shape.clone(), v);
        }
        let (slots, steps) = self.opt.state();
        for (slot, tensors) in slots {
            for (s, t) in specs.iter().zip(tensors) {
                ck.insert(
                    format!("opt.{slot}.{}", s.name),
                    s.shape.clone(),
                    t.flatten_all()?.to_vec1::<f32>()?,
                );
            }
        }
        ck.metadata
            .insert(META_CONFIG.into(), serde_json::to_string(&self.cfg)?);
        ck.metadata
            .insert(META_MANIFEST.into(), self.model.manifest().hash());
        ck.metadata.insert(
            META_PROGRESS.into(),
            serde_json::to_string(&Progress {
                epochs_done: self.epochs_done,
                optimizer_steps: steps,
            })?,
        );
        Ok(ck)
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Epochs completed so far.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Optimizer steps in one epoch (the last batch may be partial).
    pub fn steps_per_epoch(&self) -> u64 {
        self.data.train.len().div_ceil(self.cfg.batch_size) as u64
    }

    /// Runs one epoch; `on_step` sees the step number and loss after every step.
    pub fn train_epoch(&mut self, mut on_step: impl FnMut(u64, f32)) -> Result<EpochReport> {
        let epoch = self.epochs_done;
        let mut order: Vec<usize> = (0..self.data.train.len()).collect();
        order.shuffle(&mut seeded_rng(self.cfg.seed, "epoch-order", epoch as u64));
        let total = self.steps_per_epoch() * self.cfg.epochs as u64;
        let mut loss_sum = 0.0f64;
        let mut steps = 0u64;
        for chunk in order.chunks(self.cfg.batch_size) {
            let (x, y) = batch_tensors(&self.data.train, chunk, self.model.device())?;
            let (loss, grads) = self.model.loss_and_grads(&x, &y)?;
            ensure!(
                loss.is_finite(),
                "training diverged at epoch {}: loss is {loss}; lower the learning rate",
                epoch + 1
            );
            let step = self.opt.steps();
            let lr = self.cfg.schedule.lr_at(self.cfg.lr, step, total);
            self.opt.step(self.model.vars(), &grads, lr)?;
            loss_sum += f64::from(loss);
            steps += 1;
            on_step(step + 1, loss);
        }
        self.epochs_done += 1;
        Ok(EpochReport {
            epoch: self.epochs_done,
            train_loss: loss_sum / steps.max(1) as f64,
            test: evaluate(&self.model, &self.data.test)?,
        })
    }

    /// Evaluates the current model on the test set.
    pub fn evaluate(&self) -> Result<Evaluation> {
        evaluate(&self.model, &self.data.test)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::embedded_digits;

    #[test]
    fn resume_continues_the_same_run_exactly() {
        let dev = Device::Cpu;
        let data = embedded_digits().unwrap();
        let cfg = TrainConfig {
            model: ModelSpec::Mlp { hidden: vec![32] },
            ..TrainConfig::digits_mlp(3, 5)
        };
        let mut straight = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
        for _ in 0..3 {
            straight.train_epoch(|_, _| {}).unwrap();
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let mut first = Trainer::new(cfg.clone(), data.clone(), &dev).unwrap();
        first.train_epoch(|_, _| {}).unwrap();
        first.checkpoint().unwrap().save(&path).unwrap();
        drop(first);
        let ck = Checkpoint::load(&path).unwrap();
        let mut resumed = Trainer::resume(cfg.clone(), data.clone(), &dev, ck, &path).unwrap();
        assert_eq!(resumed.epochs_done(), 1);
        while resumed.epochs_done() < 3 {
            resumed.train_epoch(|_, _| {}).unwrap();
        }
        assert_eq!(
            straight.model().export().unwrap(),
            resumed.model().export().unwrap(),
            "a resumed run must end bit-identical to an uninterrupted one"
        );

        let mut other = cfg;
        other.seed = 6;
        let ck = Checkpoint::load(&path).unwrap();
        let err = Trainer::resume(other, data, &dev, ck, &path)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot resume"), "{err}");
    }

    #[test]
    fn cnn_loss_falls_on_a_small_image_set() {
        use crate::train::dataset::{DataSplit, Dataset};
        // Two classes of 8×8 RGB images: bright top half vs bright bottom half, with noise.
        let mut rng = seeded_rng(1, "test", 0);
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..64 {
            let label = i % 2;
            for _c in 0..3 {
                for y in 0..8 {
                    for _x in 0..8 {
                        let bright = (y < 4) == (label == 0);
                        let noise: f32 = rand::Rng::random_range(&mut rng, 0.0..0.3);
                        features.push(if bright { 0.7 + noise } else { noise });
                    }
                }
            }
            labels.push(label as u32);
        }
        let ds = Dataset::new(vec![3, 8, 8], features, labels, 2).unwrap();
        let data = DataSplit::new("synthetic".into(), ds.clone(), ds).unwrap();
        let cfg = TrainConfig {
            dataset: "synthetic".into(),
            model: ModelSpec::Cnn,
            epochs: 3,
            batch_size: 16,
            seed: 1,
            lr: 1e-3,
            optimizer: OptimizerSpec::adam(),
            schedule: LrSchedule::Constant,
        };
        let mut t = Trainer::new(cfg, data, &Device::Cpu).unwrap();
        let before = t.evaluate().unwrap().loss;
        for _ in 0..3 {
            t.train_epoch(|_, _| {}).unwrap();
        }
        let after = t.evaluate().unwrap().loss;
        assert!(after < before * 0.8, "loss {before} -> {after}");
    }
}
