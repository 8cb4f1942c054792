//! Turning sample indices into device tensors.

use crate::train::dataset::Dataset;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Features `[B, ...sample_shape]` and labels `[B]` (u32) for the samples at `indices`.
pub fn batch_tensors(
    data: &Dataset,
    indices: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = data.sample_numel();
    let mut features = Vec::with_capacity(indices.len() * n);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        features.extend_from_slice(data.sample(i));
        labels.push(data.labels[i]);
    }
    let mut shape = vec![indices.len()];
    shape.extend(&data.sample_shape);
    let x = Tensor::from_vec(features, shape, device)?;
    let y = Tensor::from_vec(labels, indices.len(), device)?;
    Ok((x, y))
}
