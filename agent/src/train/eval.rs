//! Evaluation: top-1 accuracy and mean cross-entropy over a whole data set.

use crate::train::{batch::batch_tensors, dataset::Dataset, model::Model};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Result of evaluating a model on a data set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of predictions whose arg-max is the target, in `0..=1` (per sample, or for
    /// a language model per token).
    pub accuracy: f64,
    /// Mean cross-entropy per prediction (per token for a language model; its perplexity is
    /// `exp(loss)`).
    pub loss: f64,
}

impl Evaluation {
    /// `exp(loss)`: a language model's perplexity.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

const EVAL_BATCH: usize = 1024;

/// Evaluates `model` on every sample of `data`.
pub fn evaluate(model: &Model, data: &Dataset) -> Result<Evaluation> {
    let mut correct = 0usize;
    let mut predictions = 0usize;
    let mut loss_sum = 0.0f64;
    let all: Vec<usize> = (0..data.len()).collect();
    for chunk in all.chunks(EVAL_BATCH) {
        let (x, y) = batch_tensors(data, chunk, model.device())?;
        let (loss, ok, count) = model.loss_and_correct(&x, &y)?;
        loss_sum += f64::from(loss) * count as f64;
        correct += ok;
        predictions += count;
    }
    let n = predictions.max(1) as f64;
    Ok(Evaluation {
        accuracy: correct as f64 / n,
        loss: loss_sum / n,
    })
}
