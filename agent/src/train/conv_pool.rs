//! The CNN's block on CPU as one op: convolution, bias, ReLU and overlapping max-pool, each
//! sample's activations computed and pooled while they are in cache.
//!
//! As separate candle tensors the block's activations (16 MB for the CIFAR CNN's first
//! layer at batch 64) are written, read back by the pool, given a zeroed gradient, masked by
//! ReLU and summed per channel, a pass over memory each. Here the forward pass keeps the
//! activations for its backward pass and returns only the pooled output; the backward pass
//! works sample by sample: it routes each pooled gradient to its window's first maximum when
//! that maximum is positive (where ReLU passes it), then takes the bias, weight and (when the
//! input needs one) input gradients from that in-cache buffer, as [`crate::train::conv`] does.

use crate::train::conv::{ConvBackward, Geometry};
use crate::train::cpu_buffers::{with_cpu_f32, with_scratch, written_zeros};
use crate::train::gemm::{MatRef, matmul_into};
use crate::train::pool::{Window, max_pool_3x3_stride2};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::Mutex;

/// Pool window and stride.
const POOL: (usize, usize) = (3, 2);

/// Convolution (no dilation, one group), bias, ReLU, then a 3×3 max-pool at stride 2.
struct ConvReluPool {
    stride: usize,
    padding: usize,
    /// The pre-ReLU activations `[B, O, out_h, out_w]` of the forward pass, for the
    /// backward pass.
    activations: Mutex<Vec<f32>>,
}

/// Activation buffers of finished ops, reused by the next forward passes: a fresh buffer
/// of many megabytes costs a page fault per page every step.
static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Spare buffers kept at most (one per block of a model, for a few models).
const MAX_SPARE: usize = 8;

/// A buffer of `len` elements, reused when one is spare (its contents are unspecified).
fn spare_activations(len: usize) -> Vec<f32> {
    let reused = {
        let mut spare = SPARE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        spare
            .iter()
            .position(|v| v.capacity() >= len)
            .map(|i| spare.swap_remove(i))
    };
    let mut v = reused.unwrap_or_default();
    v.resize(len, 0.0);
    v.truncate(len);
    v
}

impl Drop for ConvReluPool {
    fn drop(&mut self) {
        let buffer = std::mem::take(
            self.activations
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if buffer.capacity() > 0 {
            let mut spare = SPARE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if spare.len() < MAX_SPARE {
                spare.push(buffer);
            }
        }
    }
}

impl ConvReluPool {
    fn geometry(&self, input: &[usize], weight: &[usize]) -> Result<(Geometry, Window)> {
        let g = Geometry::new(input, weight, self.stride, self.padding)?;
        let (_, win) = Window::new(&[g.batch, g.out_channels, g.out_h, g.out_w], POOL.0, POOL.1)?;
        Ok((g, win))
    }
}

impl CustomOp3 for ConvReluPool {
    fn name(&self) -> &'static str {
        "conv-relu-pool"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, win) = self.geometry(xl.dims(), wl.dims())?;
        let (x, w, bias) = g.operands("conv-relu-pool", (xs, xl), (ws, wl), (bs, bl))?;
        let pooled_len = g.out_channels * win.out_plane();
        let mut activations = spare_activations(g.batch * g.output_len());
        let mut pooled = written_zeros(g.batch * pooled_len);
        if !pooled.is_empty() {
            activations
                .par_chunks_exact_mut(g.output_len())
                .zip(pooled.par_chunks_exact_mut(pooled_len))
                .zip(x.par_chunks_exact(g.input_len()))
                .for_each(|((act, out), x)| {
                    with_scratch(g.patch() * g.positions() + g.out_w, |scratch| {
                        let (cols, row_max) = scratch.split_at_mut(g.patch() * g.positions());
                        // The bias first, the product added to it: ReLU commutes with
                        // the max-pool, so it is applied to the pooled values alone.
                        for (plane, &b) in act.chunks_exact_mut(g.positions()).zip(bias) {
                            plane.fill(b);
                        }
                        g.im2col(x, cols);
                        matmul_into(
                            act,
                            true,
                            w,
                            MatRef::row_major(cols, g.patch(), g.positions()),
                        );
                        for (plane, out) in act
                            .chunks_exact_mut(g.positions())
                            .zip(out.chunks_exact_mut(win.out_plane()))
                        {
                            win.pool_plane(plane, out, row_max);
                            out.iter_mut().for_each(|v| *v = v.max(0.0));
                        }
                    })
                });
        }
        *self.activations.lock().expect("activations lock") = activations;
        let shape = Shape::from((g.batch, g.out_channels, win.out_h, win.out_w));
        Ok((CpuStorage::F32(pooled), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        pooled: &Tensor,
        d_pooled: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, win) = self.geometry(x.dims(), w.dims())?;
        let activations = self.activations.lock().expect("activations lock");
        if activations.len() != g.batch * g.output_len() {
            bail!("conv-relu-pool: no activations kept from a forward pass of this shape")
        }
        let d_pooled = d_pooled.contiguous()?;
        with_cpu_f32(pooled, "the output", |pooled| {
            with_cpu_f32(&d_pooled, "the output gradient", |d_pooled| {
                let routing = Routing {
                    g,
                    win,
                    activations: &activations,
                    pooled,
                    d_pooled,
                };
                ConvBackward::gradients(g, x, w, |b, dz, db| routing.to_maxima(b, dz, db))
            })
        })
    }
}

/// What routes the pooled gradients back to the convolution's output.
struct Routing<'a> {
    g: Geometry,
    win: Window,
    activations: &'a [f32],
    pooled: &'a [f32],
    d_pooled: &'a [f32],
}

impl Routing<'_> {
    /// Sample `b`'s gradient before ReLU into `dz` `[O, out_h·out_w]`: each pooled gradient
    /// at its window's first maximum where that maximum is positive (elsewhere ReLU passes
    /// nothing), added per channel to `db`.
    fn to_maxima(&self, b: usize, dz: &mut [f32], db: &mut [f32]) {
        let (g, win) = (&self.g, &self.win);
        let pooled_len = g.out_channels * win.out_plane();
        let act = &self.activations[b * g.output_len()..][..g.output_len()];
        let out = &self.pooled[b * pooled_len..][..pooled_len];
        let d_out = &self.d_pooled[b * pooled_len..][..pooled_len];
        dz.fill(0.0);
        for (o, db) in db.iter_mut().enumerate() {
            let plane = &act[o * g.positions()..][..g.positions()];
            let dz = &mut dz[o * g.positions()..][..g.positions()];
            for oy in 0..win.out_h {
                for ox in 0..win.out_w {
                    let k = o * win.out_plane() + oy * win.out_w + ox;
                    if out[k] > 0.0 {
                        dz[win.position_of(plane, oy, ox, out[k])] += d_out[k];
                        *db += d_out[k];
                    }
                }
            }
        }
    }
}

/// `max_pool_3x3_stride2(relu(conv2d(x, w) + bias))`, with a backward pass: one fused op on
/// CPU, the separate ops ([`crate::train::conv::conv2d`], [`max_pool_3x3_stride2`]) elsewhere.
pub fn conv_relu_pool(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let y = crate::train::conv::conv2d(x, w, bias, padding, stride, true)?;
        return max_pool_3x3_stride2(&y);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias.contiguous()?,
        ConvReluPool {
            stride,
            padding,
            activations: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::conv::conv2d;
    use crate::train::op_checks::{assert_same_outputs_and_gradients, values};
    use candle_core::{Device, Var};

    /// The fused op against the separate convolution and pool: output and every gradient.
    #[test]
    fn matches_the_separate_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (b, c, h, w, o, stride, padding) in [
            (3, 3, 32, 32, 8, 1, 2),
            (2, 5, 15, 15, 4, 1, 2),
            (2, 2, 11, 9, 3, 2, 1),
        ] {
            let x = Var::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
            let wt = Var::randn(0f32, 0.1, (o, c, 5, 5), &dev).unwrap();
            // Biases from -4 (a channel ReLU clamps almost everywhere) to +1.
            let biases: Vec<f32> = (0..o)
                .map(|i| -4.0 + 5.0 * i as f32 / (o - 1) as f32)
                .collect();
            let bias = Var::from_vec(biases, o, &dev).unwrap();
            let fused = conv_relu_pool(
                x.as_tensor(),
                wt.as_tensor(),
                bias.as_tensor(),
                padding,
                stride,
            )
            .unwrap();
            let separate = max_pool_3x3_stride2(
                &conv2d(
                    x.as_tensor(),
                    wt.as_tensor(),
                    bias.as_tensor(),
                    padding,
                    stride,
                    true,
                )
                .unwrap(),
            )
            .unwrap();
            assert!(
                values(&fused).contains(&0.0),
                "some windows are clamped by ReLU"
            );
            let vars = [(&x, "input"), (&wt, "weights"), (&bias, "bias")];
            let context = format!("{h}×{w}, stride {stride}");
            assert_same_outputs_and_gradients(fused, separate, &vars, &context);
        }
    }

    #[test]
    fn a_data_batch_gets_no_input_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 3, 5, 5), &dev).unwrap();
        let b = Var::zeros(4, candle_core::DType::F32, &dev).unwrap();
        let y = conv_relu_pool(&x, w.as_tensor(), b.as_tensor(), 2, 1).unwrap();
        assert_eq!(y.dims(), &[2, 4, 3, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(w.as_tensor()).unwrap().dims(), &[4, 3, 5, 5]);
    }
}
