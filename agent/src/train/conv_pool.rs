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

use crate::train::conv::Geometry;
use crate::train::cpu_buffers::{with_cpu_f32, with_scratch, written_zeros};
use crate::train::gemm::{MatRef, matmul_into};
use crate::train::pool::{Window, max_pool_3x3_stride2};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::Mutex;

/// Parts the batch's weight and bias gradients are summed in (fixed, so the bits do not
/// depend on the thread count).
const GRADIENT_PARTS: usize = 8;

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
        // Data batches carry no gradient: the input's is computed only when it is needed.
        let need_dx = x.track_op();
        let per_part = g.batch.div_ceil(GRADIENT_PARTS).max(1);
        let mut dx = written_zeros(if need_dx { g.batch * g.input_len() } else { 0 });
        let parts: Vec<(Vec<f32>, Vec<f32>)> = with_cpu_f32(x, "the input", |x| {
            with_cpu_f32(w, "the weights", |w| {
                with_cpu_f32(pooled, "the output", |pooled| {
                    with_cpu_f32(&d_pooled, "the output gradient", |d_pooled| {
                        let inputs = BackwardInputs {
                            g,
                            win,
                            x,
                            w,
                            pooled,
                            d_pooled,
                            activations: &activations,
                            flipped: g.input_gradient_convolution(w).filter(|_| need_dx),
                            need_dx,
                        };
                        // Each part owns its samples' input gradients (none when not needed).
                        let mut dx_parts: Vec<&mut [f32]> =
                            dx.chunks_mut((per_part * g.input_len()).max(1)).collect();
                        dx_parts.resize_with(g.batch.div_ceil(per_part), Default::default);
                        Ok(dx_parts
                            .into_par_iter()
                            .enumerate()
                            .map(|(part, dx_part)| {
                                let samples = part * per_part..((part + 1) * per_part).min(g.batch);
                                inputs.part(samples, dx_part)
                            })
                            .collect())
                    })
                })
            })
        })?;
        let mut dw = written_zeros(g.out_channels * g.patch());
        let mut db = written_zeros(g.out_channels);
        for (part_dw, part_db) in &parts {
            dw.iter_mut().zip(part_dw).for_each(|(sum, v)| *sum += v);
            db.iter_mut().zip(part_db).for_each(|(sum, v)| *sum += v);
        }
        let device = x.device();
        let w_shape = (g.out_channels, g.channels, g.kernel_h, g.kernel_w);
        let dx = need_dx
            .then(|| Tensor::from_vec(dx, (g.batch, g.channels, g.height, g.width), device))
            .transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(dw, w_shape, device)?),
            Some(Tensor::from_vec(db, g.out_channels, device)?),
        ))
    }
}

/// What the backward pass reads, borrowed from the op's tensors.
struct BackwardInputs<'a> {
    g: Geometry,
    win: Window,
    x: &'a [f32],
    w: &'a [f32],
    pooled: &'a [f32],
    d_pooled: &'a [f32],
    activations: &'a [f32],
    /// The input gradient's own convolution (geometry, flipped kernel), where it applies.
    flipped: Option<(Geometry, Vec<f32>)>,
    need_dx: bool,
}

impl BackwardInputs<'_> {
    /// The weight and bias gradients summed over `samples`, whose input gradients are
    /// written to `dx_part` (empty when the input needs none).
    fn part(&self, samples: std::ops::Range<usize>, dx_part: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
        let g = &self.g;
        let mut dw = written_zeros(g.out_channels * g.patch());
        let mut db = written_zeros(g.out_channels);
        let cols_len = match &self.flipped {
            Some((gt, _)) => gt.patch() * gt.positions(),
            None => 0,
        }
        .max(g.patch() * g.positions());
        let dx_len = if self.need_dx { g.input_len() } else { 0 };
        with_scratch(cols_len + g.output_len(), |scratch| {
            let (cols, dz) = scratch.split_at_mut(cols_len);
            for (i, b) in samples.enumerate() {
                self.route_to_maxima(b, dz, &mut db);
                let dx_b = &mut dx_part[i * dx_len..][..dx_len];
                self.sample_gradients(b, dz, cols, &mut dw, dx_b);
            }
        });
        (dw, db)
    }

    /// Sample `b`'s gradient before ReLU into `dz` `[O, out_h·out_w]`: each pooled gradient
    /// at its window's first maximum where that maximum is positive (elsewhere ReLU passes
    /// nothing), added per channel to `db`.
    fn route_to_maxima(&self, b: usize, dz: &mut [f32], db: &mut [f32]) {
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

    /// From sample `b`'s gradient before ReLU: `dw += dz · cols(x_b)ᵀ`, and its input
    /// gradient into `dx_b` when needed; `cols` is scratch space.
    fn sample_gradients(
        &self,
        b: usize,
        dz: &[f32],
        cols: &mut [f32],
        dw: &mut [f32],
        dx_b: &mut [f32],
    ) {
        let g = &self.g;
        g.im2col(&self.x[b * g.input_len()..][..g.input_len()], cols);
        let dz = MatRef::row_major(dz, g.out_channels, g.positions());
        let cols_t = MatRef::row_major(cols, g.patch(), g.positions()).t();
        matmul_into(dw, true, dz, cols_t);
        if !self.need_dx {
            return;
        }
        match &self.flipped {
            Some((gt, flipped)) => {
                let cols = &mut cols[..gt.patch() * gt.positions()];
                gt.im2col(dz.data, cols);
                matmul_into(
                    dx_b,
                    false,
                    MatRef::row_major(flipped, g.channels, gt.patch()),
                    MatRef::row_major(cols, gt.patch(), gt.positions()),
                );
            }
            None => {
                let w = MatRef::row_major(self.w, g.out_channels, g.patch());
                matmul_into(cols, false, w.t(), dz);
                g.col2im(cols, dx_b);
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
