//! Mean softmax cross-entropy on CPU as one op, forward and backward.
//!
//! candle's `cross_entropy` is a log-softmax (a maximum, a subtraction, an exponential, a
//! sum, a logarithm, another subtraction), a gather and a mean, each with its own backward
//! pass; at a small model's size those operations outweigh the arithmetic. Here each row's
//! log-sum-exp is taken once, and the backward pass writes `(softmax − one-hot) · g / B`
//! directly. [`cross_entropy`] runs this on CPU and candle's operations elsewhere.

use crate::train::cpu_buffers::{contiguous, contiguous_f32, with_cpu, with_cpu_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

struct CrossEntropy;

/// Rows and classes of `logits` `[B, C]` with `labels` `[B]`.
fn dims(logits: &[usize], labels: &[usize]) -> Result<(usize, usize)> {
    let (&[batch, classes], &[n]) = (logits, labels) else {
        bail!("cross-entropy wants logits [B, C] and labels [B], got {logits:?} and {labels:?}")
    };
    if n != batch || batch == 0 {
        bail!("cross-entropy: {batch} rows of logits and {n} labels")
    }
    Ok((batch, classes))
}

/// Checks every label names a class.
fn check_labels(labels: &[u32], classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(i) => bail!(
            "cross-entropy: label {} of sample {i} is not below the {classes} classes",
            labels[i]
        ),
        None => Ok(()),
    }
}

/// `log Σ exp(row)`, shifted by the row's maximum so that nothing overflows.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, classes) = dims(ll.dims(), yl.dims())?;
        let logits = contiguous_f32(ls, ll, "the logits")?;
        let labels = contiguous::<u32>(ys, yl, "the labels")?;
        check_labels(labels, classes)?;
        let total: f32 = logits
            .chunks_exact(classes)
            .zip(labels)
            .map(|(row, &label)| log_sum_exp(row) - row[label as usize])
            .sum();
        Ok((CpuStorage::F32(vec![total / batch as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _loss: &Tensor,
        d_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (batch, classes) = dims(logits.dims(), labels.dims())?;
        let scale = d_loss.to_scalar::<f32>()? / batch as f32;
        let grad = with_cpu_f32(logits, "the logits", |logits| {
            with_cpu::<u32, _>(labels, "the labels", |labels| {
                let mut grad = Vec::with_capacity(logits.len());
                for (row, &label) in logits.chunks_exact(classes).zip(labels) {
                    let lse = log_sum_exp(row);
                    grad.extend(row.iter().map(|&v| (v - lse).exp() * scale));
                    let at = grad.len() - classes + label as usize;
                    grad[at] -= scale;
                }
                Ok(grad)
            })
        })?;
        let grad = Tensor::from_vec(grad, (batch, classes), logits.device())?;
        Ok((Some(grad), None))
    }
}

/// Mean cross-entropy of `logits` `[B, C]` against class indices `labels` `[B]` (u32),
/// with a backward pass to the logits: one op on CPU, candle's operations elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let on_cpu = logits.device().is_cpu()
        && logits.dtype() == candle_core::DType::F32
        && labels.dtype() == candle_core::DType::U32;
    if !on_cpu {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, CrossEntropy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::op_checks::values;
    use candle_core::{Device, Var};

    /// Seeded logits uniform in `±spread`.
    fn logits(seed: u64, batch: usize, classes: usize, spread: f32) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let draws = (0..batch * classes)
            .map(|_| rng.random_range(-spread..=spread))
            .collect::<Vec<f32>>();
        Var::from_vec(draws, (batch, classes), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_candles_loss_and_gradient() {
        let dev = Device::Cpu;
        for seed in 0..8 {
            for (batch, classes, spread) in [(64, 10, 2.0f32), (3, 2, 60.0), (7, 100, 10.0)] {
                let logits = logits(seed, batch, classes, spread);
                let labels: Vec<u32> = (0..batch as u32)
                    .map(|i| (i * 7) % classes as u32)
                    .collect();
                let labels = Tensor::from_vec(labels, batch, &dev).unwrap();
                let ours = cross_entropy(logits.as_tensor(), &labels).unwrap();
                let theirs = candle_nn::loss::cross_entropy(logits.as_tensor(), &labels).unwrap();
                let (a, b) = (
                    ours.to_scalar::<f32>().unwrap(),
                    theirs.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "loss {a} against {b}"
                );
                // Scaled so the incoming gradient is not 1.
                let scale = 3.0f32;
                let g_ours = (ours * f64::from(scale)).unwrap().backward().unwrap();
                let g_theirs = (theirs * f64::from(scale)).unwrap().backward().unwrap();
                let ours = values(g_ours.get(logits.as_tensor()).unwrap());
                let theirs = values(g_theirs.get(logits.as_tensor()).unwrap());
                // Each gradient is `scale / B · (exp(x − lse) − y)`. Rounding `x − lse`
                // costs up to one ulp of its operands, `eps · (|x| + |lse|)`, which the
                // exponential turns into that relative error of a probability at most 1;
                // the two implementations round differently, so allow twice that, plus a
                // few ulps for the exponential and the scaling.
                let max_logit = spread + (classes as f32).ln();
                let bound = scale / batch as f32 * f32::EPSILON * (4.0 * max_logit + 8.0);
                for (a, b) in ours.iter().zip(&theirs) {
                    assert!(
                        (a - b).abs() <= bound,
                        "seed {seed}, spread {spread}: gradient {a} against {b}, bound {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_label_out_of_range_is_named() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let labels = Tensor::from_vec(vec![1u32, 3], 2, &dev).unwrap();
        let err = cross_entropy(&logits, &labels).unwrap_err().to_string();
        assert!(
            err.contains("label 3 of sample 1 is not below the 3 classes"),
            "{err}"
        );
        let labels = Tensor::from_vec(vec![1u32], 1, &dev).unwrap();
        let err = cross_entropy(&logits, &labels).unwrap_err().to_string();
        assert!(err.contains("2 rows of logits and 1 labels"), "{err}");
    }
}
