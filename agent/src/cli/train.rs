//! `weightgrad train`: one replica, one process, with a progress bar and a JSON summary.

use super::data_args::DataArgs;
use crate::train::{
    Checkpoint, DeviceSpec, LrSchedule, ModelSpec, OptimizerSpec, TrainConfig, Trainer,
};
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `weightgrad train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Model: mlp, mlp:W1,W2,..., cnn, logreg or transformer:LAYERS,DIM,HEADS,CONTEXT
    /// (default: the data set's, as for bench: cnn on CIFAR-10, logreg on CSV, the
    /// transformer on text, mlp otherwise).
    #[arg(long)]
    model: Option<String>,
    /// Passes over the training set.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Seed for initialisation, data order and hold-out.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimizer: adam or sgd.
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Base learning rate (default 0.003 for adam, 0.05 for sgd).
    #[arg(long)]
    lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay (L2 for SGD, decoupled for Adam).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Schedule: constant, step:EPOCHS:GAMMA or cosine[:MIN_FACTOR].
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Compute device: cpu, cuda or cuda:N (CUDA needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Write a checkpoint here after every epoch (atomically).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Resume the run saved in this checkpoint (same options, any --epochs).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn optimizer(args: &TrainArgs) -> Result<(OptimizerSpec, f64)> {
    match args.optimizer.as_str() {
        "adam" => Ok((
            OptimizerSpec::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: args.weight_decay,
            },
            args.lr.unwrap_or(3e-3),
        )),
        "sgd" => Ok((
            OptimizerSpec::Sgd {
                momentum: args.momentum,
                weight_decay: args.weight_decay,
            },
            args.lr.unwrap_or(0.05),
        )),
        other => anyhow::bail!("unknown optimizer {other:?}; expected adam or sgd"),
    }
}

/// `  perplexity P` for a language model's evaluation, nothing for a classifier's.
fn perplexity(language_model: bool, eval: &crate::train::Evaluation) -> String {
    if language_model {
        format!("  perplexity {:.3}", eval.perplexity())
    } else {
        String::new()
    }
}

/// Runs `weightgrad train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let device = args.device.open()?;
    let source = args.data.source()?;
    let data = source.load(args.seed)?;
    let (optimizer, lr) = optimizer(&args)?;
    let steps_per_epoch = data.train.len().div_ceil(args.batch_size.max(1)) as u64;
    let model = match &args.model {
        Some(m) => ModelSpec::parse(m)?,
        None => crate::bench::default_model(&source),
    };
    source.check_model(&model).map_err(anyhow::Error::msg)?;
    let language_model = model.is_language_model();
    let cfg = TrainConfig {
        dataset: source.label(),
        model,
        epochs: args.epochs,
        batch_size: args.batch_size,
        seed: args.seed,
        lr,
        optimizer,
        schedule: LrSchedule::parse(&args.schedule, steps_per_epoch).map_err(anyhow::Error::msg)?,
    };
    let (train_len, test_len) = (data.train.len(), data.test.len());
    let mut trainer = match &args.resume {
        Some(path) => Trainer::resume(cfg, data, &device, Checkpoint::load(path)?, path)?,
        None => Trainer::new(cfg, data, &device)?,
    };
    let manifest = trainer.model().manifest().clone();
    if !args.json {
        println!(
            "training {} ({} parameters) on {} ({train_len} train / {test_len} test) for {} epochs on {}",
            manifest.model,
            manifest.params(),
            source.label(),
            args.epochs,
            args.device
        );
    }

    let remaining = args.epochs.saturating_sub(trainer.epochs_done()) as u64;
    let bar = ProgressBar::new(remaining * trainer.steps_per_epoch());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} epoch {msg} [{bar:30}] {pos}/{len} steps {elapsed}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut history = Vec::new();
    while trainer.epochs_done() < args.epochs {
        bar.set_message(format!("{}/{}", trainer.epochs_done() + 1, args.epochs));
        let report = trainer.train_epoch(|_, _| bar.inc(1))?;
        if let Some(path) = &args.checkpoint {
            trainer
                .checkpoint()?
                .save(path)
                .with_context(|| format!("checkpoint after epoch {}", report.epoch))?;
        }
        bar.suspend(|| {
            if !args.json {
                println!(
                    "epoch {:>3}  train loss {:.4}  test loss {:.4}  test top-1 {:.2}%{}",
                    report.epoch,
                    report.train_loss,
                    report.test.loss,
                    100.0 * report.test.accuracy,
                    perplexity(language_model, &report.test)
                );
            }
        });
        history.push(report);
    }
    bar.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();
    let final_eval = trainer.evaluate()?;
    if args.json {
        let summary = json!({
            "test_accuracy": final_eval.accuracy,
            "test_loss": final_eval.loss,
            "test_perplexity": language_model.then(|| final_eval.perplexity()),
            "epochs": trainer.epochs_done(),
            "train_seconds": train_seconds,
            "params": manifest.params(),
            "model": manifest.model,
            "manifest_hash": manifest.hash(),
            "dataset": source.label(),
            "seed": args.seed,
            "history": history,
        });
        println!("{summary}");
    } else {
        println!(
            "done: test top-1 {:.2}%, test loss {:.4}{}, {:.1}s",
            100.0 * final_eval.accuracy,
            final_eval.loss,
            perplexity(language_model, &final_eval),
            train_seconds
        );
    }
    Ok(())
}
