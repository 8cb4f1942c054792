//! Data mode (Hanna et al., "Quantizing data for distributed learning"): instead of a
//! gradient, a worker sends its minibatch quantized to a few bits per feature, with its
//! labels, and the aggregator computes the gradient on the quantized samples.
//!
//! With refinement the worker also computes `g(ŵ; x) − g(ŵ; Q(x))` on its exact samples and
//! sends it quantized (unbiased stochastic rounding, few bits); the aggregator adds it to its
//! `g(ŵ; Q(x))`, so the estimate's expectation is `g(ŵ; x)`. Without refinement the estimate
//! is biased by the loss's curvature times the quantization variance, and the worker needs no
//! weights at all.

use crate::train::Model;
use anyhow::{Context, Result, ensure};
use candle_core::Tensor;
use weightgrad_codec::batch::{RangeAxis, decode_batch, encode_batch};
use weightgrad_codec::{
    DitherRng, EncodeOptions, FrameMeta, Limits, Quantizer, Update, decode, encode,
};
use weightgrad_sdk::{DataPlan, DataScale};

/// What one worker sends its aggregator in data mode.
#[derive(Debug, Clone, PartialEq)]
pub struct DataMessage {
    /// The quantized minibatch and labels (`weightgrad_codec::batch`).
    pub batch: Vec<u8>,
    /// Refinement frames, one per tensor in manifest order (empty without refinement).
    pub refinement: Vec<Vec<u8>>,
    /// The worker's loss on its exact samples, when it computed one (refinement only).
    pub worker_loss: Option<f32>,
}

impl DataMessage {
    /// Bytes on the LAN.
    pub fn wire_len(&self) -> usize {
        self.batch.len() + self.refinement.iter().map(Vec::len).sum::<usize>()
    }
}

fn axis(scale: DataScale) -> RangeAxis {
    match scale {
        DataScale::PerFeature => RangeAxis::PerFeature,
        DataScale::PerSample => RangeAxis::PerSample,
    }
}

/// Worker side: quantizes the batch `(x, y)` per `plan`; when refining, `model` must hold
/// the weights ŵ the aggregator will use, and the correction is computed on it.
pub fn worker_message(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    plan: &DataPlan,
    sender: &str,
    clock: u64,
    rng: &mut DitherRng,
) -> Result<DataMessage> {
    let shape = x.dims().to_vec();
    let rows = shape.first().copied().unwrap_or(0);
    let cols: usize = shape.iter().skip(1).product();
    let features = x.flatten_all()?.to_vec1::<f32>()?;
    let labels = y.to_vec1::<u32>()?;
    ensure!(
        labels.len() == rows,
        "{} labels for {rows} samples",
        labels.len()
    );
    let enc = encode_batch(
        sender,
        clock,
        &features,
        cols,
        &labels,
        plan.feature_bits,
        axis(plan.scale),
        rng,
    )?;
    if plan.refine_bits == 0 {
        return Ok(DataMessage {
            batch: enc.bytes,
            refinement: Vec::new(),
            worker_loss: None,
        });
    }
    let (loss, exact) = model.loss_and_grads(x, y)?;
    let xq = Tensor::from_vec(enc.decoded, shape, x.device())?;
    let (_, on_quantized) = model.loss_and_grads(&xq, y)?;
    let opts = EncodeOptions {
        quantizer: Quantizer::uniform(plan.refine_bits),
        zstd_level: None,
    };
    let refinement = exact
        .iter()
        .zip(&on_quantized)
        .enumerate()
        .map(|(t, (a, b))| {
            let diff = (a - b)?.flatten_all()?.to_vec1::<f32>()?;
            let meta = FrameMeta {
                sender: sender.to_owned(),
                clock,
                tensor: t as u32,
            };
            Ok(encode(&meta, diff.len(), &Update::Dense(diff), &opts, rng)?.bytes)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DataMessage {
        batch: enc.bytes,
        refinement,
        worker_loss: Some(loss),
    })
}

/// Aggregator side: the gradient estimate (manifest order) and a loss from one worker's
/// message. `model` holds ŵ when the message is refined, else the weights to train.
/// Messages that do not fit the model (feature count, labels, tensors) are errors.
pub fn message_gradient(
    model: &Model,
    classes: usize,
    message: &DataMessage,
    limits: &Limits,
) -> Result<(f32, Vec<Vec<f32>>)> {
    let batch = decode_batch(&message.batch, limits).context("decoding a worker's data batch")?;
    let sample_shape = model.sample_shape();
    let features: usize = sample_shape.iter().product();
    ensure!(
        batch.cols == features,
        "data batch from {} has {} features per sample, the model takes {features}",
        batch.sender,
        batch.cols
    );
    if let Some(bad) = batch.labels.iter().find(|&&l| l as usize >= classes) {
        anyhow::bail!(
            "data batch from {} has label {bad}, the model has {classes} classes",
            batch.sender
        );
    }
    let mut shape = vec![batch.rows];
    shape.extend(sample_shape);
    let x = Tensor::from_vec(batch.features, shape, model.device())?;
    let y = Tensor::from_vec(batch.labels, batch.rows, model.device())?;
    let (loss, grads) = model.loss_and_grads(&x, &y)?;
    let mut grads = grads
        .iter()
        .map(|g| Ok(g.flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<Vec<_>>>()?;
    if !message.refinement.is_empty() {
        ensure!(
            message.refinement.len() == grads.len(),
            "{} refinement frames for {} tensors",
            message.refinement.len(),
            grads.len()
        );
        for (t, bytes) in message.refinement.iter().enumerate() {
            let frame = decode(bytes, limits).context("decoding a refinement frame")?;
            ensure!(
                frame.header.tensor as usize == t && frame.header.len as usize == grads[t].len(),
                "refinement frame {t} is for tensor {} of {} elements",
                frame.header.tensor,
                frame.header.len
            );
            frame.update.add_to(&mut grads[t], 1.0);
        }
    }
    Ok((message.worker_loss.unwrap_or(loss), grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ModelSpec;
    use crate::train::batch::batch_tensors;
    use crate::train::dataset::embedded_digits;
    use candle_core::Device;

    /// Monte-Carlo mean and per-coordinate variance of the aggregator's estimate, against the
    /// exact gradient on the unquantized batch.
    struct Estimate {
        exact: Vec<f32>,
        mean: Vec<f64>,
        var: Vec<f64>,
        trials: usize,
    }

    impl Estimate {
        /// `‖mean − exact‖²` minus its expected Monte-Carlo noise: an unbiased estimate of
        /// the squared bias.
        fn squared_bias(&self) -> f64 {
            let err: f64 = self
                .mean
                .iter()
                .zip(&self.exact)
                .map(|(m, g)| (m - f64::from(*g)).powi(2))
                .sum();
            err - self.noise()
        }

        /// Expected `‖mean − E[mean]‖²` from the sample variances.
        fn noise(&self) -> f64 {
            self.var.iter().sum::<f64>() / self.trials as f64
        }
    }

    fn estimate(spec: &ModelSpec, plan: DataPlan, trials: usize) -> Estimate {
        let data = embedded_digits().unwrap();
        let dev = Device::Cpu;
        let model = Model::new(spec, &data.train.sample_shape, 10, 3, &dev).unwrap();
        let idx: Vec<usize> = (0..16).collect();
        let (x, y) = batch_tensors(&data.train, &idx, &dev).unwrap();
        let exact: Vec<f32> = model
            .loss_and_grads(&x, &y)
            .unwrap()
            .1
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        let mut sum = vec![0f64; exact.len()];
        let mut sum2 = vec![0f64; exact.len()];
        let limits = Limits::default();
        for trial in 0..trials {
            let mut rng = DitherRng::new(1 + trial as u64);
            let msg = worker_message(&model, &x, &y, &plan, "r/w0", 0, &mut rng).unwrap();
            let (_, g) = message_gradient(&model, 10, &msg, &limits).unwrap();
            for (i, v) in g.iter().flatten().enumerate() {
                sum[i] += f64::from(*v);
                sum2[i] += f64::from(*v).powi(2);
            }
        }
        let n = trials as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let var = sum2
            .iter()
            .zip(&mean)
            .map(|(s2, m)| (s2 / n - m * m).max(0.0) * n / (n - 1.0))
            .collect();
        Estimate {
            exact,
            mean,
            var,
            trials,
        }
    }

    fn plan(feature_bits: u8, refine_bits: u8) -> DataPlan {
        DataPlan {
            feature_bits,
            scale: DataScale::PerFeature,
            refine_bits,
        }
    }

    /// Largest `|mean − exact| / standard error` over coordinates that vary. The
    /// coordinates are correlated, but the union bound still holds: for an unbiased
    /// estimate over ~650–1200 coordinates, a value above 5 has probability < 4·10⁻⁴.
    fn max_z(e: &Estimate) -> f64 {
        e.mean
            .iter()
            .zip(&e.exact)
            .zip(&e.var)
            .filter(|(_, v)| **v > 1e-14)
            .map(|((m, g), v)| (m - f64::from(*g)).abs() / (v / e.trials as f64).sqrt())
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_refined_estimate_is_unbiased() {
        // 1-bit features make the unrefined bias large and detectable; the 2-bit refinement
        // must remove it.
        for spec in [ModelSpec::Logreg, ModelSpec::Mlp { hidden: vec![16] }] {
            let refined = max_z(&estimate(&spec, plan(1, 2), 4000));
            let unrefined = max_z(&estimate(&spec, plan(1, 0), 4000));
            eprintln!("{spec:?}: max |z| refined {refined:.2}, unrefined {unrefined:.2}");
            assert!(
                refined < 5.0,
                "{spec:?}: refined estimate biased, max |z| {refined}"
            );
            assert!(
                unrefined > 8.0,
                "{spec:?}: unrefined bias not detected, max |z| {unrefined}"
            );
        }
    }

    /// The second-order prediction of the unrefined bias: `½ Σ_ij Var(Q(x_ij)) ∂²g/∂x_ij²`,
    /// by central differences, with `Var(Q(x)) = Δ² f (1 − f)` for stochastic rounding of a
    /// value at fraction `f` between two levels `Δ` apart.
    fn predicted_bias(model: &Model, x: &[f32], y: &Tensor, shape: &[usize], bits: u8) -> Vec<f64> {
        let cols: usize = shape[1..].iter().product();
        let rows = shape[0];
        let grad = |v: &[f32]| -> Vec<f64> {
            let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
            model
                .loss_and_grads(&t, y)
                .unwrap()
                .1
                .iter()
                .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(f64::from)
                .collect()
        };
        let g0 = grad(x);
        let mut bias = vec![0f64; g0.len()];
        let top = f64::from((1u32 << bits) - 1);
        for j in 0..cols {
            let column = (0..rows).map(|i| x[i * cols + j]);
            let lo = column.clone().fold(f32::INFINITY, f32::min);
            let hi = column.fold(f32::NEG_INFINITY, f32::max);
            if hi <= lo {
                continue;
            }
            let delta = f64::from(hi - lo) / top;
            let h = 0.05 * f64::from(hi - lo);
            for i in 0..rows {
                let t = f64::from(x[i * cols + j] - lo) / delta;
                let f = t - t.floor();
                let var = delta * delta * f * (1.0 - f);
                if var == 0.0 {
                    continue;
                }
                let mut plus = x.to_vec();
                plus[i * cols + j] += h as f32;
                let mut minus = x.to_vec();
                minus[i * cols + j] -= h as f32;
                let (gp, gm) = (grad(&plus), grad(&minus));
                for (b, ((p, m), c)) in bias.iter_mut().zip(gp.iter().zip(&gm).zip(&g0)) {
                    *b += 0.5 * var * (p - 2.0 * c + m) / (h * h);
                }
            }
        }
        bias
    }

    #[test]
    fn the_unrefined_bias_is_the_second_order_term_of_the_quantization_variance() {
        // Stochastic rounding keeps E[Q(x)] = x, so the unrefined estimate's bias is second
        // order: ½ Σ Var(Q(x_ij)) ∂²g/∂x_ij², which falls with Δ² as bits are added. The
        // measured bias at 1 bit must match that prediction within its Monte-Carlo error.
        let data = embedded_digits().unwrap();
        let dev = Device::Cpu;
        let model = Model::new(&ModelSpec::Logreg, &data.train.sample_shape, 10, 3, &dev).unwrap();
        let idx: Vec<usize> = (0..16).collect();
        let (x, y) = batch_tensors(&data.train, &idx, &dev).unwrap();
        let shape = x.dims().to_vec();
        let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let predicted: Vec<Vec<f64>> = (1..=3)
            .map(|b| predicted_bias(&model, &flat, &y, &shape, b))
            .collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let measured = estimate(&ModelSpec::Logreg, plan(1, 0), 16000);
        let error: Vec<f64> = measured
            .mean
            .iter()
            .zip(&measured.exact)
            .map(|(m, g)| m - f64::from(*g))
            .collect();
        let miss: f64 = error
            .iter()
            .zip(&predicted[0])
            .map(|(e, p)| (e - p).powi(2))
            .sum();
        let (p1, p2, p3) = (
            norm(&predicted[0]),
            norm(&predicted[1]),
            norm(&predicted[2]),
        );
        eprintln!(
            "predicted bias norms at 1, 2, 3 bits: {p1:.3e} {p2:.3e} {p3:.3e}; measured at 1 bit \
             {:.3e} (mean error {:.3e}, Monte-Carlo noise {:.3e}); ‖error − predicted‖ {:.3e}",
            measured.squared_bias().max(0.0).sqrt(),
            norm(&error),
            measured.noise().sqrt(),
            miss.sqrt(),
        );
        // The prediction explains the error: what is left (Monte-Carlo noise, higher-order
        // terms) is under half of it. A zero or a 2×-off prediction fails this.
        assert!(
            miss.sqrt() <= 0.5 * norm(&error),
            "the measured bias is not the second-order term"
        );
        // And it shrinks with the quantization variance (Δ² falls 9× and then 5.4×).
        assert!(p2 < p1 / 4.0 && p3 < p2 / 2.5, "{p1} {p2} {p3}");
    }

    #[test]
    fn messages_that_do_not_fit_the_model_are_refused() {
        let data = embedded_digits().unwrap();
        let dev = Device::Cpu;
        let model = Model::new(&ModelSpec::Logreg, &data.train.sample_shape, 10, 3, &dev).unwrap();
        let (x, y) = batch_tensors(&data.train, &[0, 1, 2], &dev).unwrap();
        let mut rng = DitherRng::new(0);
        let good = worker_message(&model, &x, &y, &plan(4, 2), "r/w0", 0, &mut rng).unwrap();
        let limits = Limits::default();
        assert!(message_gradient(&model, 10, &good, &limits).is_ok());
        // Labels beyond the model's classes.
        let err = message_gradient(&model, 2, &good, &limits).unwrap_err();
        assert!(format!("{err:#}").contains("2 classes"), "{err:#}");
        // A refinement frame missing.
        let mut short = good.clone();
        short.refinement.pop();
        let err = message_gradient(&model, 10, &short, &limits).unwrap_err();
        assert!(format!("{err:#}").contains("refinement frames"), "{err:#}");
        // Corrupt batch bytes.
        let mut corrupt = good.clone();
        corrupt.batch.truncate(12);
        let err = message_gradient(&model, 10, &corrupt, &limits).unwrap_err();
        assert!(format!("{err:#}").contains("data batch"), "{err:#}");
        // A model with another input size.
        let other = Model::new(&ModelSpec::Logreg, &[1, 4, 4], 10, 3, &dev).unwrap();
        let err = message_gradient(&other, 10, &good, &limits).unwrap_err();
        assert!(format!("{err:#}").contains("64 features"), "{err:#}");
    }
}
