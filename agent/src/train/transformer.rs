//! A small decoder-only transformer language model over byte tokens.
//!
//! Token and position embeddings, then `layers` pre-norm blocks (layer norm, causal
//! multi-head self-attention, residual; layer norm, a GELU MLP four times as wide,
//! residual), a final layer norm and an output head tied to the token embedding. A sample
//! is a window of token ids (as `f32`, the way data sets hold features) and its label the
//! token after it; every position predicts the next token, so the targets are the window
//! shifted left by one with the label at the end.

use crate::train::linear::linear;
use crate::train::manifest::TensorKind;
use crate::train::model::Builder;
use crate::train::norm::standardize_last;
use anyhow::{Result, ensure};
use candle_core::{D, DType, Tensor, Var};

/// Shape of a transformer: depth, width, attention heads and the longest window it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerShape {
    /// Number of blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Attention heads per block (they split `dim`).
    pub heads: usize,
    /// Positions the position embedding covers: the longest window.
    pub context: usize,
}

/// A layer norm's gain and shift (parameter indices).
struct Norm {
    gain: usize,
    shift: usize,
}

/// A linear layer's weight and bias (parameter indices).
struct Dense {
    weight: usize,
    bias: usize,
}

/// One pre-norm block.
struct Block {
    attention_norm: Norm,
    qkv: Dense,
    attention_out: Dense,
    mlp_norm: Norm,
    mlp_in: Dense,
    mlp_out: Dense,
}

/// A built transformer: where each of its parameters sits in the model's list.
pub(crate) struct Transformer {
    shape: TransformerShape,
    vocab: usize,
    tokens: usize,
    positions: usize,
    blocks: Vec<Block>,
    final_norm: Norm,
}

/// Added to the attention scores of later positions: their weights underflow to zero.
const MASKED: f32 = -1e9;

impl Transformer {
    /// Adds the parameters of a `shape` transformer over `vocab` tokens to `b`.
    pub(crate) fn build(b: &mut Builder, shape: TransformerShape, vocab: usize) -> Result<Self> {
        let TransformerShape {
            layers,
            dim,
            heads,
            context,
        } = shape;
        ensure!(
            layers > 0 && dim > 0 && heads > 0 && context > 0,
            "a transformer's layers, width, heads and context must all be positive"
        );
        ensure!(
            dim % heads == 0,
            "the transformer's width {dim} does not split into {heads} heads"
        );
        let tokens = b.param(
            "embed.tokens".into(),
            vec![vocab, dim],
            TensorKind::Embedding,
            dim,
        )?;
        let positions = b.param(
            "embed.positions".into(),
            vec![context, dim],
            TensorKind::Embedding,
            dim,
        )?;
        let norm = |b: &mut Builder, name: &str| -> Result<Norm> {
            let (gain, shift) = b.norm(name, dim)?;
            Ok(Norm { gain, shift })
        };
        let dense = |b: &mut Builder, name: &str, inp: usize, out: usize, kind| -> Result<Dense> {
            Ok(Dense {
                weight: b.param(format!("{name}.weight"), vec![out, inp], kind, inp)?,
                bias: b.param(format!("{name}.bias"), vec![out], TensorKind::Bias, inp)?,
            })
        };
        let blocks = (0..layers)
            .map(|l| {
                let p = format!("block{l}");
                Ok(Block {
                    attention_norm: norm(b, &format!("{p}.attention_norm"))?,
                    qkv: dense(
                        b,
                        &format!("{p}.attention.qkv"),
                        dim,
                        3 * dim,
                        TensorKind::Attention,
                    )?,
                    attention_out: dense(
                        b,
                        &format!("{p}.attention.out"),
                        dim,
                        dim,
                        TensorKind::Attention,
                    )?,
                    mlp_norm: norm(b, &format!("{p}.mlp_norm"))?,
                    mlp_in: dense(b, &format!("{p}.mlp.in"), dim, 4 * dim, TensorKind::Weight)?,
                    mlp_out: dense(b, &format!("{p}.mlp.out"), 4 * dim, dim, TensorKind::Weight)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = norm(b, "final_norm")?;
        Ok(Self {
            shape,
            vocab,
            tokens,
            positions,
            blocks,
            final_norm,
        })
    }

    /// Logits `[B·T, vocab]` for every position of token windows `x` `[B, T]`.
    pub(crate) fn forward(&self, vars: &[Var], x: &Tensor) -> Result<Tensor> {
        let (batch, len) = x.dims2()?;
        let TransformerShape {
            dim,
            heads,
            context,
            ..
        } = self.shape;
        ensure!(
            len <= context,
            "windows of {len} tokens are longer than the transformer's context of {context}"
        );
        let (low, high) = (
            x.min_all()?.to_scalar::<f32>()?,
            x.max_all()?.to_scalar::<f32>()?,
        );
        ensure!(
            low >= 0.0 && high < self.vocab as f32,
            "token ids must lie in 0..{}, got {low}..={high}: the transformer trains on text data",
            self.vocab
        );
        let var = |i: usize| vars[i].as_tensor();
        let ids = x.to_dtype(DType::U32)?.flatten_all()?;
        let mut h = var(self.tokens)
            .index_select(&ids, 0)?
            .reshape((batch, len, dim))?
            .broadcast_add(&var(self.positions).narrow(0, 0, len)?)?;
        let mask = causal_mask(len, x.device())?;
        let head_dim = dim / heads;
        let rows = batch * len;
        for block in &self.blocks {
            let a = norm(&h, &block.attention_norm, vars)?.reshape((rows, dim))?;
            let qkv = dense(&a, &block.qkv, vars)?
                .reshape((batch, len, 3, heads, head_dim))?
                .permute((2, 0, 3, 1, 4))?;
            let (q, k, v) = (
                qkv.get(0)?.contiguous()?,
                qkv.get(1)?.contiguous()?,
                qkv.get(2)?.contiguous()?,
            );
            let scores =
                (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?.broadcast_add(&mask)?;
            let mixed = softmax_last(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((rows, dim))?;
            h = (h + dense(&mixed, &block.attention_out, vars)?.reshape((batch, len, dim))?)?;
            let a = norm(&h, &block.mlp_norm, vars)?.reshape((rows, dim))?;
            let m = dense(
                &dense(&a, &block.mlp_in, vars)?.gelu()?,
                &block.mlp_out,
                vars,
            )?;
            h = (h + m.reshape((batch, len, dim))?)?;
        }
        let h = norm(&h, &self.final_norm, vars)?.reshape((rows, dim))?;
        Ok(h.matmul(&var(self.tokens).t()?)?)
    }
}

/// The next token at every position of windows `x` `[B, T]` whose next tokens are `y`
/// `[B]`: `x` shifted left by one, then `y`, flattened to `[B·T]`.
pub(crate) fn next_tokens(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (batch, len) = x.dims2()?;
    let last = y.reshape((batch, 1))?;
    let targets = if len > 1 {
        let shifted = x.narrow(1, 1, len - 1)?.to_dtype(DType::U32)?;
        Tensor::cat(&[&shifted, &last], 1)?
    } else {
        last
    };
    Ok(targets.flatten_all()?)
}

/// `[T, T]`: 0 where a position may attend (itself and earlier), [`MASKED`] elsewhere.
fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(values, (len, len), device)?)
}

/// Softmax over the last dimension, shifted by its (constant) maximum.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension with a gain and a shift.
fn norm(x: &Tensor, n: &Norm, vars: &[Var]) -> Result<Tensor> {
    Ok(standardize_last(x)?
        .broadcast_mul(vars[n.gain].as_tensor())?
        .broadcast_add(vars[n.shift].as_tensor())?)
}

/// `x Wᵀ + b` for rows `x` `[N, in]`.
fn dense(x: &Tensor, d: &Dense, vars: &[Var]) -> Result<Tensor> {
    Ok(linear(
        x,
        vars[d.weight].as_tensor(),
        vars[d.bias].as_tensor(),
        false,
    )?)
}

#[cfg(test)]
mod tests {
    use crate::train::model::{Model, ModelSpec};
    use candle_core::{D, Device, Tensor};

    fn small() -> Model {
        let spec = ModelSpec::parse("transformer:2,16,4,12").unwrap();
        Model::new(&spec, &[12], 32, 3, &Device::Cpu).unwrap()
    }

    fn window(tokens: &[u32]) -> Tensor {
        let v: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        Tensor::from_vec(v, (1, tokens.len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_token_never_sees_a_later_one() {
        let model = small();
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 32).collect();
        let base = model.forward(&window(&tokens)).unwrap();
        for changed in [5, 11] {
            let mut other = tokens.clone();
            other[changed] = (other[changed] + 1) % 32;
            let logits = model.forward(&window(&other)).unwrap();
            let diff = (&logits - &base)
                .unwrap()
                .abs()
                .unwrap()
                .max(D::Minus1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (pos, d) in diff.iter().enumerate() {
                if pos < changed {
                    assert_eq!(*d, 0.0, "position {pos} saw token {changed}");
                } else {
                    assert!(*d > 0.0, "position {pos} ignores token {changed}");
                }
            }
        }
    }

    #[test]
    fn targets_are_the_window_shifted_then_the_label() {
        let x = window(&[5, 6, 7]);
        let y = Tensor::new(&[8u32], &Device::Cpu).unwrap();
        let t = super::next_tokens(&x, &y)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(t, [6, 7, 8]);
    }

    #[test]
    fn out_of_vocabulary_or_overlong_windows_are_refused() {
        let model = small();
        let err = model.forward(&window(&[1, 40])).unwrap_err().to_string();
        assert!(err.contains("token ids must lie in 0..32"), "{err}");
        let long: Vec<u32> = vec![1; 13];
        let err = model.forward(&window(&long)).unwrap_err().to_string();
        assert!(
            err.contains("longer than the transformer's context of 12"),
            "{err}"
        );
    }

    #[test]
    fn loss_falls_on_a_small_corpus() {
        use crate::train::{LrSchedule, OptimizerSpec, TrainConfig, Trainer, dataset};
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(60);
        std::fs::write(&corpus, &text).unwrap();
        let data = dataset::load_text(&corpus, 16).unwrap();
        let cfg = TrainConfig {
            dataset: "text".into(),
            model: ModelSpec::parse("transformer:1,32,4,16").unwrap(),
            epochs: 4,
            batch_size: 16,
            seed: 2,
            lr: 3e-3,
            optimizer: OptimizerSpec::adam(),
            schedule: LrSchedule::Constant,
        };
        let mut t = Trainer::new(cfg, data, &Device::Cpu).unwrap();
        let before = t.evaluate().unwrap();
        for _ in 0..4 {
            t.train_epoch(|_, _| {}).unwrap();
        }
        let after = t.evaluate().unwrap();
        // Uniform guessing over 256 bytes is a perplexity of 256.
        assert!(before.perplexity() > 100.0, "{before:?}");
        assert!(
            after.perplexity() < 8.0 && after.loss < 0.4 * before.loss,
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn heads_must_split_the_width() {
        let spec = ModelSpec::parse("transformer:1,10,4,8").unwrap();
        let err = Model::new(&spec, &[8], 32, 0, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not split into 4 heads"), "{err}");
    }
}
