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
    let batch = data.subset(indices);
    let mut shape = vec![indices.len()];
    shape.extend(&batch.sample_shape);
    let x = Tensor::from_vec(batch.features, shape, device)?;
    let y = Tensor::from_vec(batch.labels, indices.len(), device)?;
    Ok((x, y))
}
