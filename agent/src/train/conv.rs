//! 2-D convolution on CPU as im2col plus one matrix product per sample, forward and backward.
//!
//! candle's CPU convolution computes its input gradient through a transposed convolution
//! several times slower per FLOP than its forward pass, and its forward pass unfolds the
//! whole batch into one buffer many megabytes large. Here every sample is unfolded into a
//! buffer that stays in cache and multiplied there, on the threads of candle's pool:
//!
//! - forward: `y_b = W · cols(x_b)`, `W` the `[O, C·kh·kw]` weights;
//! - input gradient, only when the input needs one: at stride 1 a convolution of `dy_b`
//!   with the flipped kernel, elsewhere `dx_b = col2im(Wᵀ · dy_b)`;
//! - weight gradient: `dW = Σ_b dy_b · cols(x_b)ᵀ`, summed in a fixed number of parts in a
//!   fixed order, so the result does not depend on the thread count.
//!
//! [`conv2d`] runs this on CPU and candle's own convolution on other devices.

use crate::train::cpu_buffers::{contiguous_f32, with_cpu_f32, with_scratch, written_zeros};
use crate::train::gemm::{MatRef, matmul_into};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Parts the weight gradient's sum over the batch is split into (a constant, not the
/// thread count, so the bits are the same on every machine).
const WEIGHT_GRADIENT_PARTS: usize = 8;

/// Same-sized dimensions of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) batch: usize,
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) out_channels: usize,
    pub(crate) kernel_h: usize,
    pub(crate) kernel_w: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl Geometry {
    /// The geometry of input `[B, C, H, W]` and weights `[O, C, kh, kw]`.
    pub(crate) fn new(
        input: &[usize],
        weight: &[usize],
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (&[batch, channels, height, width], &[out_channels, wc, kernel_h, kernel_w]) =
            (input, weight)
        else {
            bail!(
                "conv2d wants input [B, C, H, W] and weights [O, C, kh, kw], got {input:?} and {weight:?}"
            )
        };
        if wc != channels {
            bail!("conv2d: input has {channels} channels, weights expect {wc}")
        }
        if stride == 0 {
            bail!("conv2d: stride 0")
        }
        let (padded_h, padded_w) = (height + 2 * padding, width + 2 * padding);
        if kernel_h == 0 || kernel_w == 0 || kernel_h > padded_h || kernel_w > padded_w {
            bail!(
                "conv2d: a {kernel_h}×{kernel_w} kernel does not fit a {height}×{width} input padded by {padding}"
            )
        }
        Ok(Self {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            out_h: (padded_h - kernel_h) / stride + 1,
            out_w: (padded_w - kernel_w) / stride + 1,
        })
    }

    /// A convolution op's input, weights as the matrix `[O, C·kh·kw]` and bias (its length
    /// checked), from the op's operands; `op` names it in errors.
    pub(crate) fn operands<'a>(
        &self,
        op: &str,
        (xs, xl): (&'a CpuStorage, &Layout),
        (ws, wl): (&'a CpuStorage, &Layout),
        (bs, bl): (&'a CpuStorage, &Layout),
    ) -> Result<(&'a [f32], MatRef<'a>, &'a [f32])> {
        let x = contiguous_f32(xs, xl, "the input")?;
        let w = contiguous_f32(ws, wl, "the weights")?;
        let bias = contiguous_f32(bs, bl, "the bias")?;
        if bias.len() != self.out_channels {
            bail!(
                "{op}: {} bias values for {} output channels",
                bias.len(),
                self.out_channels
            )
        }
        Ok((
            x,
            MatRef::row_major(w, self.out_channels, self.patch()),
            bias,
        ))
    }

    /// Length of one unfolded column: `C·kh·kw`.
    pub(crate) fn patch(&self) -> usize {
        self.channels * self.kernel_h * self.kernel_w
    }

    /// Output positions per sample: `out_h·out_w`.
    pub(crate) fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    pub(crate) fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub(crate) fn output_len(&self) -> usize {
        self.out_channels * self.positions()
    }

    /// For output column `ox` and kernel column `j`: the input column, if inside the image.
    fn input_x(&self, ox: usize, j: usize) -> Option<usize> {
        (ox * self.stride + j)
            .checked_sub(self.padding)
            .filter(|&ix| ix < self.width)
    }

    fn input_y(&self, oy: usize, i: usize) -> Option<usize> {
        (oy * self.stride + i)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.height)
    }

    /// Output columns whose input column for kernel column `j` is inside the image, as a
    /// range (they are contiguous).
    fn valid_out_x(&self, j: usize) -> std::ops::Range<usize> {
        let lo = (0..self.out_w)
            .find(|&ox| self.input_x(ox, j).is_some())
            .unwrap_or(self.out_w);
        let hi = (lo..self.out_w)
            .find(|&ox| self.input_x(ox, j).is_none())
            .unwrap_or(self.out_w);
        lo..hi
    }

    /// Unfolds one sample `[C, H, W]` into `cols`, `[C·kh·kw, out_h·out_w]` row-major.
    pub(crate) fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let positions = self.positions();
        let mut rows = cols.chunks_exact_mut(positions);
        for c in 0..self.channels {
            let plane = &x[c * self.height * self.width..][..self.height * self.width];
            for i in 0..self.kernel_h {
                for j in 0..self.kernel_w {
                    let row = rows.next().expect("one row per (c, i, j)");
                    let valid = self.valid_out_x(j);
                    for (oy, out) in row.chunks_exact_mut(self.out_w).enumerate() {
                        let Some(iy) = self.input_y(oy, i) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * self.width..][..self.width];
                        out[..valid.start].fill(0.0);
                        out[valid.end..].fill(0.0);
                        if self.stride == 1 && !valid.is_empty() {
                            let first = valid.start + j - self.padding;
                            out[valid.clone()].copy_from_slice(&src[first..][..valid.len()]);
                        } else {
                            for ox in valid.clone() {
                                out[ox] = src[ox * self.stride + j - self.padding];
                            }
                        }
                    }
                }
            }
        }
    }

    /// At stride 1 with a square kernel and `padding < kernel`: the convolution that gives
    /// one sample's input gradient from its output gradient, as its geometry and weights
    /// (`[C, O·kh·kw]`, the kernel flipped and its channels swapped; the output gradient
    /// padded by `kernel - 1 - padding`). It unfolds and multiplies, like the forward pass,
    /// where [`Geometry::col2im`] scatters.
    pub(crate) fn input_gradient_convolution(&self, w: &[f32]) -> Option<(Geometry, Vec<f32>)> {
        let k = self.kernel_h;
        if self.stride != 1 || self.kernel_w != k || self.padding >= k {
            return None;
        }
        let g = Geometry::new(
            &[1, self.out_channels, self.out_h, self.out_w],
            &[self.channels, self.out_channels, k, k],
            1,
            k - 1 - self.padding,
        )
        .ok()?;
        debug_assert_eq!((g.out_h, g.out_w), (self.height, self.width));
        let mut flipped = Vec::with_capacity(w.len());
        for c in 0..self.channels {
            for o in 0..self.out_channels {
                for i in (0..k).rev() {
                    let row = ((o * self.channels + c) * k + i) * k;
                    flipped.extend(w[row..][..k].iter().rev());
                }
            }
        }
        Some((g, flipped))
    }

    /// Adds unfolded columns back onto one sample's input gradient (the adjoint of
    /// [`Geometry::im2col`]).
    pub(crate) fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let positions = self.positions();
        let mut rows = cols.chunks_exact(positions);
        for c in 0..self.channels {
            let plane = &mut dx[c * self.height * self.width..][..self.height * self.width];
            for i in 0..self.kernel_h {
                for j in 0..self.kernel_w {
                    let row = rows.next().expect("one row per (c, i, j)");
                    let valid = self.valid_out_x(j);
                    for (oy, src) in row.chunks_exact(self.out_w).enumerate() {
                        let Some(iy) = self.input_y(oy, i) else {
                            continue;
                        };
                        let dst = &mut plane[iy * self.width..][..self.width];
                        if self.stride == 1 && !valid.is_empty() {
                            // Contiguous on both sides: a slice add, which vectorizes.
                            let first = valid.start + j - self.padding;
                            dst[first..][..valid.len()]
                                .iter_mut()
                                .zip(&src[valid.clone()])
                                .for_each(|(d, s)| *d += s);
                        } else {
                            for ox in valid.clone() {
                                dst[ox * self.stride + j - self.padding] += src[ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Convolution of `[B, C, H, W]` by `[O, C, kh, kw]` plus a bias `[O]`, optionally
/// followed by ReLU, to `[B, O, out_h, out_w]`: the bias and ReLU are applied to each
/// sample's product while it is still in cache.
struct Conv2dIm2col {
    stride: usize,
    padding: usize,
    relu: bool,
}

impl CustomOp3 for Conv2dIm2col {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
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
        let g = Geometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let (x, w, bias) = g.operands("conv2d", (xs, xl), (ws, wl), (bs, bl))?;
        let mut y = written_zeros(g.batch * g.output_len());
        if !y.is_empty() {
            y.par_chunks_exact_mut(g.output_len())
                .zip(x.par_chunks_exact(g.input_len()))
                .for_each(|(y, x)| {
                    with_scratch(g.patch() * g.positions(), |cols| {
                        g.im2col(x, cols);
                        let cols = MatRef::row_major(cols, g.patch(), g.positions());
                        matmul_into(y, false, w, cols);
                    });
                    for (plane, &b) in y.chunks_exact_mut(g.positions()).zip(bias) {
                        if self.relu {
                            plane.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                        } else {
                            plane.iter_mut().for_each(|v| *v += b);
                        }
                    }
                });
        }
        let shape = Shape::from((g.batch, g.out_channels, g.out_h, g.out_w));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        with_cpu_f32(y, "the output", |ys| {
            with_cpu_f32(&dy, "the output gradient", |dys| {
                ConvBackward::gradients(g, x, w, |b, dz, db| {
                    let len = g.output_len();
                    let (y, dy) = (&ys[b * len..][..len], &dys[b * len..][..len]);
                    // The gradient before ReLU: zero where the output was clamped.
                    for ((dz, &y), &d) in dz.iter_mut().zip(y).zip(dy) {
                        *dz = if !self.relu || y > 0.0 { d } else { 0.0 };
                    }
                    for (db, plane) in db.iter_mut().zip(dz.chunks_exact(g.positions())) {
                        *db += plane.iter().sum::<f32>();
                    }
                })
            })
        })
    }
}

/// A convolution's bias, weight and input gradients, computed sample by sample from each
/// sample's gradient at the convolution's output (for [`conv2d`] and the fused block of
/// [`crate::train::conv_pool`]).
pub(crate) struct ConvBackward<'a> {
    pub(crate) g: Geometry,
    /// The input `[B, C, H, W]`.
    pub(crate) x: &'a [f32],
    /// The weights `[O, C, kh, kw]`.
    pub(crate) w: &'a [f32],
    /// Whether the input gradient is wanted.
    pub(crate) need_dx: bool,
}

/// Input (empty when not wanted), weight and bias gradients.
pub(crate) type ConvGradients = (Vec<f32>, Vec<f32>, Vec<f32>);

impl ConvBackward<'_> {
    /// The input (when it tracks a gradient), weight and bias gradients of a convolution
    /// of `x` by `w` (CPU tensors of geometry `g`), as tensors; `output_gradient` is as
    /// for [`ConvBackward::run`].
    pub(crate) fn gradients(
        g: Geometry,
        x: &Tensor,
        w: &Tensor,
        output_gradient: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_cpu_f32(x, "the input", |xs| {
            with_cpu_f32(w, "the weights", |ws| {
                let backward = ConvBackward {
                    g,
                    x: xs,
                    w: ws,
                    // Data batches carry no gradient: the input's is computed only when it
                    // is needed.
                    need_dx: x.track_op(),
                };
                let grads = backward.run(output_gradient);
                backward.tensors(grads, x.device())
            })
        })
    }

    /// The gradients, where `output_gradient(b, dz, db)` writes all of sample `b`'s
    /// gradient at the output, `[O, out_h·out_w]`, into `dz` and adds its per-channel sums
    /// to `db`. The batch is split into a fixed number of parts summed in a fixed order,
    /// so the bits do not depend on the thread count.
    pub(crate) fn run(
        &self,
        output_gradient: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
    ) -> ConvGradients {
        let g = &self.g;
        let flipped = g
            .input_gradient_convolution(self.w)
            .filter(|_| self.need_dx);
        let per_part = g.batch.div_ceil(WEIGHT_GRADIENT_PARTS).max(1);
        let dx_len = if self.need_dx { g.input_len() } else { 0 };
        let mut dx = written_zeros(g.batch * dx_len);
        // Each part owns its samples' input gradients (none when not needed).
        let mut dx_parts: Vec<&mut [f32]> = dx.chunks_mut((per_part * dx_len).max(1)).collect();
        dx_parts.resize_with(g.batch.div_ceil(per_part), Default::default);
        let cols_len = match &flipped {
            Some((gt, _)) => gt.patch() * gt.positions(),
            None => 0,
        }
        .max(g.patch() * g.positions());
        let parts: Vec<(Vec<f32>, Vec<f32>)> = dx_parts
            .into_par_iter()
            .enumerate()
            .map(|(part, dx_part)| {
                let mut dw = written_zeros(g.out_channels * g.patch());
                let mut db = written_zeros(g.out_channels);
                let samples = part * per_part..((part + 1) * per_part).min(g.batch);
                with_scratch(cols_len + g.output_len(), |scratch| {
                    let (cols, dz) = scratch.split_at_mut(cols_len);
                    for (i, b) in samples.enumerate() {
                        output_gradient(b, dz, &mut db);
                        let dx_b = &mut dx_part[i * dx_len..][..dx_len];
                        self.sample(b, dz, flipped.as_ref(), cols, &mut dw, dx_b);
                    }
                });
                (dw, db)
            })
            .collect();
        let mut dw = written_zeros(g.out_channels * g.patch());
        let mut db = written_zeros(g.out_channels);
        for (part_dw, part_db) in &parts {
            dw.iter_mut().zip(part_dw).for_each(|(sum, v)| *sum += v);
            db.iter_mut().zip(part_db).for_each(|(sum, v)| *sum += v);
        }
        (dx, dw, db)
    }

    /// From sample `b`'s gradient at the output: `dw += dz · cols(x_b)ᵀ`, and its input
    /// gradient into `dx_b` when needed (through the flipped-kernel convolution where it
    /// applies, else by scattering `Wᵀ · dz`); `cols` is scratch space.
    fn sample(
        &self,
        b: usize,
        dz: &[f32],
        flipped: Option<&(Geometry, Vec<f32>)>,
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
        match flipped {
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

    /// The gradients as tensors for a custom op's backward pass: input (when wanted),
    /// weights, bias.
    pub(crate) fn tensors(
        &self,
        (dx, dw, db): ConvGradients,
        device: &candle_core::Device,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.g;
        let dx = self
            .need_dx
            .then(|| Tensor::from_vec(dx, (g.batch, g.channels, g.height, g.width), device))
            .transpose()?;
        let w_shape = (g.out_channels, g.channels, g.kernel_h, g.kernel_w);
        Ok((
            dx,
            Some(Tensor::from_vec(dw, w_shape, device)?),
            Some(Tensor::from_vec(db, g.out_channels, device)?),
        ))
    }
}

/// `x` `[B, C, H, W]` convolved with `w` `[O, C, kh, kw]` (no dilation, one group) plus
/// `bias` `[O]`, then ReLU when `relu`, with a backward pass: im2col and one matrix product
/// per sample on CPU, candle's `conv2d` and tensor operations elsewhere.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
    relu: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let y = x
            .conv2d(w, padding, stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias.contiguous()?,
        Conv2dIm2col {
            stride,
            padding,
            relu,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::op_checks::{assert_close, assert_same_outputs_and_gradients, values};
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    /// The definition, loop by loop: output, input gradient and weight gradient for output
    /// gradient `dy`.
    fn by_definition(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        g: Geometry,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; g.batch * g.output_len()];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for oy in 0..g.out_h {
                    for ox in 0..g.out_w {
                        let yi = ((b * g.out_channels + o) * g.out_h + oy) * g.out_w + ox;
                        for c in 0..g.channels {
                            for i in 0..g.kernel_h {
                                for j in 0..g.kernel_w {
                                    let (Some(iy), Some(ix)) = (g.input_y(oy, i), g.input_x(ox, j))
                                    else {
                                        continue;
                                    };
                                    let xi = ((b * g.channels + c) * g.height + iy) * g.width + ix;
                                    let wi =
                                        ((o * g.channels + c) * g.kernel_h + i) * g.kernel_w + j;
                                    y[yi] += x[xi] * w[wi];
                                    dx[xi] += w[wi] * dy[yi];
                                    dw[wi] += x[xi] * dy[yi];
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    /// Ours against the definition and against candle's `conv2d`: output, input gradient
    /// and weight gradient, to float tolerance relative to each tensor's largest magnitude.
    /// Gradients compare with candle's at stride 1 only: at larger strides candle's own
    /// backward pass errs or panics on shapes whose transposed convolution does not give back
    /// the input's size.
    #[allow(clippy::too_many_arguments)]
    fn compare(
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        k: (usize, usize),
        stride: usize,
        padding: usize,
    ) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
        let wt = Var::randn(0f32, 1.0, (o, c, k.0, k.1), &dev).unwrap();
        let zero = Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), &zero, padding, stride, false).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        // A loss that weighs every output differently, so each gradient entry is distinct.
        let dy = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
        let g = Geometry::new(x.dims(), wt.dims(), stride, padding).unwrap();
        let (y_def, dx_def, dw_def) = by_definition(
            &values(x.as_tensor()),
            &values(wt.as_tensor()),
            &values(&dy),
            g,
        );
        assert_close(&values(&ours), &y_def, "forward");
        assert_close(&values(&theirs), &y_def, "candle's forward");
        let grads = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            &values(grads.get(x.as_tensor()).unwrap()),
            &dx_def,
            "input gradient",
        );
        assert_close(
            &values(grads.get(wt.as_tensor()).unwrap()),
            &dw_def,
            "weight gradient",
        );
        if stride == 1 {
            let candle = (theirs * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_close(
                &values(grads.get(x.as_tensor()).unwrap()),
                &values(candle.get(x.as_tensor()).unwrap()),
                "input gradient against candle's",
            );
            assert_close(
                &values(grads.get(wt.as_tensor()).unwrap()),
                &values(candle.get(wt.as_tensor()).unwrap()),
                "weight gradient against candle's",
            );
        }
    }

    #[test]
    fn the_models_convolutions_match_candle() {
        compare(3, 3, 32, 32, 8, (5, 5), 1, 2);
        compare(2, 16, 15, 15, 8, (5, 5), 1, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_shapes_strides_and_paddings_match_candle(
            b in 1usize..4, c in 1usize..5, h in 1usize..12, w in 1usize..12, o in 1usize..5,
            kh in 1usize..5, kw in 1usize..5, stride in 1usize..4, padding in 0usize..3,
        ) {
            prop_assume!(kh <= h + 2 * padding && kw <= w + 2 * padding);
            compare(b, c, h, w, o, (kh, kw), stride, padding);
        }
    }

    /// Bias and ReLU fused into the convolution against candle's convolution, broadcast
    /// addition and ReLU: outputs and all three gradients.
    #[test]
    fn bias_and_relu_match_candles_composition() {
        let dev = Device::Cpu;
        for relu in [false, true] {
            let x = Var::randn(0f32, 1.0, (3, 4, 9, 9), &dev).unwrap();
            let w = Var::randn(0f32, 1.0, (5, 4, 3, 3), &dev).unwrap();
            let b = Var::randn(0f32, 1.0, 5, &dev).unwrap();
            let ours = conv2d(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1, 1, relu).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            let theirs = if relu { theirs.relu().unwrap() } else { theirs };
            if relu {
                assert!(values(&ours).contains(&0.0), "some outputs are clamped");
            }
            let vars = [(&x, "input"), (&w, "weights"), (&b, "bias")];
            assert_same_outputs_and_gradients(ours, theirs, &vars, &format!("relu {relu}"));
        }
    }

    #[test]
    fn a_data_batch_gets_no_input_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let b = Var::zeros(4, candle_core::DType::F32, &dev).unwrap();
        let grads = conv2d(&x, w.as_tensor(), b.as_tensor(), 1, 1, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(w.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
        let err = conv2d(&x, &w, &b, 1, 1, false).unwrap_err().to_string();
        assert!(err.contains("3 channels, weights expect 2"), "{err}");
        let w = Tensor::zeros((4, 3, 9, 9), candle_core::DType::F32, &dev).unwrap();
        let err = conv2d(&x, &w, &b, 0, 1, false).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
