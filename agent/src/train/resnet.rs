//! A small residual CNN with group norm (ResNet-8 style) for image sets.
//!
//! A 3×3 stem convolution to `width` channels, then three stages of one basic block each
//! (`width`, `2·width` and `4·width` channels; the last two halve the resolution), global
//! average pooling and a linear classifier. A basic block is conv 3×3, group norm, ReLU,
//! conv 3×3, group norm, plus the input (through a 1×1 projection where the shape
//! changes), then ReLU. Group norm, not batch norm: it keeps no running statistics, so a
//! replica's state is exactly its parameters, which is what regions exchange.

use crate::train::conv::conv2d;
use crate::train::linear::linear;
use crate::train::manifest::TensorKind;
use crate::train::model::Builder;
use crate::train::norm::standardize_last;
use anyhow::{Result, ensure};
use candle_core::{Tensor, Var};

/// Channels per group in group norm (at most [`MAX_GROUPS`] groups).
const MAX_GROUPS: usize = 8;

/// A convolution's kernel and bias (parameter indices; no bias before a norm, which would
/// cancel it) and its stride and padding.
struct Conv {
    weight: usize,
    bias: Option<usize>,
    out_channels: usize,
    stride: usize,
    padding: usize,
}

/// A group norm's gain and shift (parameter indices) and its number of groups.
struct GroupNorm {
    gain: usize,
    shift: usize,
    groups: usize,
}

/// One basic block.
struct Block {
    conv1: Conv,
    norm1: GroupNorm,
    conv2: Conv,
    norm2: GroupNorm,
    /// 1×1 convolution on the skip path where channels or resolution change.
    projection: Option<Conv>,
}

/// A built residual CNN: where each of its parameters sits in the model's list.
pub(crate) struct ResNet {
    stem: Conv,
    stem_norm: GroupNorm,
    blocks: Vec<Block>,
    head_weight: usize,
    head_bias: usize,
}

impl ResNet {
    /// Adds the parameters of a residual CNN of base `width` for `channels`-channel images
    /// and `classes` outputs to `b`.
    pub(crate) fn build(
        b: &mut Builder,
        channels: usize,
        width: usize,
        classes: usize,
    ) -> Result<Self> {
        ensure!(width > 0, "the residual CNN's width must be positive");
        // `(in, out, kernel, stride)`; `biased` for a convolution no norm follows.
        let conv = |b: &mut Builder,
                    name: &str,
                    (cin, cout, k, stride): (usize, usize, usize, usize),
                    biased: bool|
         -> Result<Conv> {
            let fan_in = cin * k * k;
            let weight = b.param(
                format!("{name}.weight"),
                vec![cout, cin, k, k],
                TensorKind::Weight,
                fan_in,
            )?;
            let bias = biased
                .then(|| b.param(format!("{name}.bias"), vec![cout], TensorKind::Bias, fan_in))
                .transpose()?;
            Ok(Conv {
                weight,
                bias,
                out_channels: cout,
                stride,
                padding: k / 2,
            })
        };
        let norm = |b: &mut Builder, name: &str, c: usize| -> Result<GroupNorm> {
            let (gain, shift) = b.norm(name, c)?;
            Ok(GroupNorm {
                gain,
                shift,
                groups: groups_for(c),
            })
        };
        let stem = conv(b, "stem", (channels, width, 3, 1), false)?;
        let stem_norm = norm(b, "stem.norm", width)?;
        let mut blocks = Vec::new();
        let mut cin = width;
        for (stage, (cout, stride)) in [(width, 1), (2 * width, 2), (4 * width, 2)]
            .into_iter()
            .enumerate()
        {
            let p = format!("stage{}", stage + 1);
            blocks.push(Block {
                conv1: conv(b, &format!("{p}.conv1"), (cin, cout, 3, stride), false)?,
                norm1: norm(b, &format!("{p}.norm1"), cout)?,
                conv2: conv(b, &format!("{p}.conv2"), (cout, cout, 3, 1), false)?,
                norm2: norm(b, &format!("{p}.norm2"), cout)?,
                projection: (stride != 1 || cin != cout)
                    .then(|| conv(b, &format!("{p}.projection"), (cin, cout, 1, stride), true))
                    .transpose()?,
            });
            cin = cout;
        }
        let head_weight = b.param(
            "head.weight".into(),
            vec![classes, cin],
            TensorKind::Weight,
            cin,
        )?;
        let head_bias = b.param("head.bias".into(), vec![classes], TensorKind::Bias, cin)?;
        Ok(Self {
            stem,
            stem_norm,
            blocks,
            head_weight,
            head_bias,
        })
    }

    /// Logits `[B, classes]` for images `x` `[B, C, H, W]`.
    pub(crate) fn forward(&self, vars: &[Var], x: &Tensor) -> Result<Tensor> {
        let mut h = apply_conv(x, &self.stem, vars)?;
        h = group_norm(&h, &self.stem_norm, vars)?.relu()?;
        for block in &self.blocks {
            let a = apply_conv(&h, &block.conv1, vars)?;
            let a = group_norm(&a, &block.norm1, vars)?.relu()?;
            let a = apply_conv(&a, &block.conv2, vars)?;
            let a = group_norm(&a, &block.norm2, vars)?;
            let skip = match &block.projection {
                Some(p) => apply_conv(&h, p, vars)?,
                None => h.clone(),
            };
            h = (a + skip)?.relu()?;
        }
        let pooled = h.mean((2, 3))?;
        Ok(linear(
            &pooled,
            vars[self.head_weight].as_tensor(),
            vars[self.head_bias].as_tensor(),
            false,
        )?)
    }
}

/// Groups for a group norm over `channels`: at most [`MAX_GROUPS`], dividing the channels.
fn groups_for(channels: usize) -> usize {
    (1..=MAX_GROUPS.min(channels))
        .rev()
        .find(|g| channels.is_multiple_of(*g))
        .unwrap_or(1)
}

fn apply_conv(x: &Tensor, c: &Conv, vars: &[Var]) -> Result<Tensor> {
    let bias = match c.bias {
        Some(i) => vars[i].as_tensor().clone(),
        None => Tensor::zeros(c.out_channels, x.dtype(), x.device())?,
    };
    Ok(conv2d(
        x,
        vars[c.weight].as_tensor(),
        &bias,
        c.padding,
        c.stride,
        false,
    )?)
}

/// Group norm of `x` `[B, C, H, W]`: each sample's channels in `groups` groups, normalized
/// over the group's channels and pixels, then a per-channel gain and shift.
fn group_norm(x: &Tensor, n: &GroupNorm, vars: &[Var]) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let per_channel = (1, channels, 1, 1);
    Ok(standardize_last(&x.reshape((batch, n.groups, ()))?)?
        .reshape((batch, channels, height, width))?
        .broadcast_mul(&vars[n.gain].as_tensor().reshape(per_channel)?)?
        .broadcast_add(&vars[n.shift].as_tensor().reshape(per_channel)?)?)
}

#[cfg(test)]
mod tests {
    use crate::train::model::{Model, ModelSpec};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn groups_divide_the_channels() {
        assert_eq!(super::groups_for(16), 8);
        assert_eq!(super::groups_for(12), 6);
        assert_eq!(super::groups_for(3), 3);
    }

    #[test]
    fn shapes_kinds_and_gradients() {
        let dev = Device::Cpu;
        let m = Model::new(
            &ModelSpec::parse("resnet:4").unwrap(),
            &[1, 12, 12],
            5,
            0,
            &dev,
        )
        .unwrap();
        let names: Vec<&str> = m
            .manifest()
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert!(
            names.contains(&"stage2.projection.weight")
                && !names.contains(&"stage1.projection.weight")
        );
        let x = Tensor::rand(0f32, 1.0, (3, 1, 12, 12), &dev).unwrap();
        assert_eq!(m.forward(&x).unwrap().dims(), &[3, 5]);
        let y = Tensor::new(&[0u32, 4, 2], &dev).unwrap();
        let (loss, grads) = m.loss_and_grads(&x, &y).unwrap();
        assert!(loss.is_finite());
        for (g, spec) in grads.iter().zip(&m.manifest().tensors) {
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let norm = norm.to_scalar::<f32>().unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{}: gradient norm {norm}",
                spec.name
            );
        }
    }
}
