//! Standardization over the last dimension: the arithmetic of the transformer's layer norm
//! and the residual CNN's group norm (which reshapes its groups to the last dimension).

use candle_core::{D, Result, Tensor};

/// Added to the variance before its square root.
const NORM_EPS: f64 = 1e-5;

/// `x` minus its mean over the last dimension, divided by `sqrt(variance + ε)` (the biased
/// variance), as candle operations with their backward passes.
pub(crate) fn standardize_last(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let std = (centered.sqr()?.mean_keepdim(D::Minus1)? + NORM_EPS)?.sqrt()?;
    centered.broadcast_div(&std)
}
