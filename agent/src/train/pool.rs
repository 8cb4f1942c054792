//! Max-pooling on CPU with a backward pass, for windows that overlap (candle's own max-pool
//! has a backward only when the window equals the stride).
//!
//! The forward pass takes each window's maximum in one sweep over the planes; the backward
//! pass gives each output's gradient to the first input of its window holding that maximum
//! (row-major order, as PyTorch does). [`max_pool2d`] runs this on CPU and a slice-and-maximum
//! composition, differentiable on every device, elsewhere.

use crate::train::cpu_buffers::{contiguous_f32, written_zeros};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Output side length of a `kernel` window at `stride` over `side` inputs, no padding.
pub(crate) fn pooled_side(side: usize, kernel: usize, stride: usize) -> usize {
    (side - kernel) / stride + 1
}

/// Window and stride of one pooling, and the input it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl Window {
    pub(crate) fn new(dims: &[usize], kernel: usize, stride: usize) -> Result<(usize, Self)> {
        let &[b, c, height, width] = dims else {
            bail!("max_pool2d wants [B, C, H, W], got {dims:?}")
        };
        if kernel == 0 || stride == 0 || kernel > height || kernel > width {
            bail!(
                "max_pool2d: a {kernel}×{kernel} window at stride {stride} does not fit {height}×{width}"
            )
        }
        let out = |side: usize| pooled_side(side, kernel, stride);
        Ok((
            b * c,
            Self {
                kernel,
                stride,
                height,
                width,
                out_h: out(height),
                out_w: out(width),
            },
        ))
    }

    pub(crate) fn plane(&self) -> usize {
        self.height * self.width
    }

    pub(crate) fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Index in the plane of the first maximum of window `(oy, ox)` (row-major).
    pub(crate) fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let mut best = (
            oy * self.stride * self.width + ox * self.stride,
            f32::NEG_INFINITY,
        );
        for i in 0..self.kernel {
            let row = (oy * self.stride + i) * self.width + ox * self.stride;
            for (j, &v) in plane[row..][..self.kernel].iter().enumerate() {
                if v > best.1 {
                    best = (row + j, v);
                }
            }
        }
        best.0
    }

    /// Index in the plane of the first input of window `(oy, ox)` equal to `max`, the
    /// window's maximum (row-major), found by comparing for equality and stopping there.
    pub(crate) fn position_of(&self, plane: &[f32], oy: usize, ox: usize, max: f32) -> usize {
        for i in 0..self.kernel {
            let row = (oy * self.stride + i) * self.width + ox * self.stride;
            if let Some(j) = plane[row..][..self.kernel].iter().position(|&v| v == max) {
                return row + j;
            }
        }
        self.argmax(plane, oy, ox)
    }

    /// Pools one plane into `out`: each output row takes the maximum over its window's input
    /// rows (whole rows at a time, which vectorizes), then over each window of that row.
    pub(crate) fn pool_plane(&self, plane: &[f32], out: &mut [f32], row_max: &mut [f32]) {
        for (oy, out) in out.chunks_exact_mut(self.out_w).enumerate() {
            let top = oy * self.stride;
            row_max.copy_from_slice(&plane[top * self.width..][..self.width]);
            for i in 1..self.kernel {
                let row = &plane[(top + i) * self.width..][..self.width];
                // A select, not a conditional store, so the loop vectorizes.
                for (m, &v) in row_max.iter_mut().zip(row) {
                    *m = if v > *m { v } else { *m };
                }
            }
            for (ox, y) in out.iter_mut().enumerate() {
                let window = &row_max[ox * self.stride..][..self.kernel];
                *y = window[1..]
                    .iter()
                    .fold(window[0], |m, &v| if v > m { v } else { m });
            }
        }
    }
}

struct MaxPool2d {
    kernel: usize,
    stride: usize,
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, win) = Window::new(l.dims(), self.kernel, self.stride)?;
        let x = contiguous_f32(s, l, "the max-pool's input")?;
        let mut y = written_zeros(planes * win.out_plane());
        if !y.is_empty() {
            y.par_chunks_exact_mut(win.out_plane())
                .zip(x.par_chunks_exact(win.plane()))
                .for_each_init(
                    || vec![0f32; win.width],
                    |row_max, (y, x)| win.pool_plane(x, y, row_max),
                );
        }
        let mut dims = l.dims().to_vec();
        dims[2] = win.out_h;
        dims[3] = win.out_w;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let grad = MaxPool2dGradient {
            kernel: self.kernel,
            stride: self.stride,
        };
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &grad)?))
    }
}

/// The input gradient of [`MaxPool2d`] from its input and output gradient.
struct MaxPool2dGradient {
    kernel: usize,
    stride: usize,
}

impl CustomOp2 for MaxPool2dGradient {
    fn name(&self) -> &'static str {
        "max-pool2d-gradient"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (planes, win) = Window::new(xl.dims(), self.kernel, self.stride)?;
        let x = contiguous_f32(xs, xl, "the max-pool's input")?;
        let dy = contiguous_f32(dys, dyl, "the max-pool's output gradient")?;
        if dy.len() != planes * win.out_plane() {
            bail!(
                "max_pool2d: {} output gradients for {} outputs",
                dy.len(),
                planes * win.out_plane()
            )
        }
        let mut dx = written_zeros(x.len());
        if !dx.is_empty() {
            dx.par_chunks_exact_mut(win.plane())
                .zip(x.par_chunks_exact(win.plane()))
                .zip(dy.par_chunks_exact(win.out_plane()))
                .for_each(|((dx, x), dy)| {
                    for oy in 0..win.out_h {
                        for ox in 0..win.out_w {
                            dx[win.argmax(x, oy, ox)] += dy[oy * win.out_w + ox];
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Max over windows of 3 at stride 2 along `dim`, built from differentiable ops.
///
/// Output `i` covers inputs `2i, 2i+1, 2i+2`. Splitting `dim` into pairs `(j, a)` with
/// input `2j+a`, the window is `(i,0), (i,1), (i+1,0)`: three slices and two maxima.
fn max_window3_stride2(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let out = pooled_side(n, 3, 2);
    let len = 2 * (out + 1);
    // Input 2·out+1 is never inside a window, so its padding value does not matter.
    let x = if n >= len {
        x.narrow(dim, 0, len)?
    } else {
        x.pad_with_same(dim, 0, len - n)?
    };
    let mut shape = x.dims().to_vec();
    shape[dim] = out + 1;
    shape.insert(dim + 1, 2);
    let pairs = x.reshape(shape)?;
    let even = pairs.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?;
    let odd = pairs.narrow(dim + 1, 1, 1)?.squeeze(dim + 1)?;
    even.narrow(dim, 0, out)?
        .maximum(&odd.narrow(dim, 0, out)?)?
        .maximum(&even.narrow(dim, 1, out)?)
}

/// Overlapping 3×3 max-pool with stride 2 on `[B, C, H, W]` with a backward pass: one
/// sweep per plane on CPU, slices and maxima on other devices.
pub fn max_pool_3x3_stride2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 3 || w < 3 {
        bail!("a 3×3 max-pool needs at least 3×3 inputs, got {h}×{w}")
    }
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(MaxPool2d {
            kernel: 3,
            stride: 2,
        })
    } else {
        max_window3_stride2(&max_window3_stride2(x, 2)?, 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn both_paths_match_candle_forward_and_each_other_backward() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (32, 32), (15, 15), (3, 3)] {
            let x = Var::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            let ours = max_pool_3x3_stride2(x.as_tensor()).unwrap();
            let sliced =
                max_window3_stride2(&max_window3_stride2(x.as_tensor(), 2).unwrap(), 3).unwrap();
            let theirs = x.as_tensor().max_pool2d_with_stride(3, 2).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            // Random inputs have no ties, so both backward passes route every gradient to the same input.
            let weights = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let grad = |y: Tensor| {
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                g.get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            // An input in two windows sums two gradients, in another order on each path.
            for (a, b) in grad(ours).iter().zip(grad(sliced)) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{h}×{w}: {a} against {b}"
                );
            }
        }
    }

    #[test]
    fn overlapping_windows_each_pass_their_gradient_to_their_first_maximum() {
        let dev = Device::Cpu;
        // One row of 7 pooled along the width with 3 rows of height: windows over columns
        // {0,1,2} {2,3,4} {4,5,6}; column 4 (value 9, twice) is the maximum of two windows.
        let row = [1f32, 5.0, 2.0, 0.0, 9.0, 4.0, 9.0];
        let data: Vec<f32> = (0..3)
            .flat_map(|r| row.map(|v| if r == 1 { v } else { -10.0 }))
            .collect();
        let x = Var::from_vec(data, (1, 1, 3, 7), &dev).unwrap();
        let y = max_pool_3x3_stride2(x.as_tensor()).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [5.0, 9.0, 9.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut expected = vec![0f32; 21];
        expected[7 + 1] = 1.0;
        expected[7 + 4] = 2.0;
        assert_eq!(gx, expected);
    }

    #[test]
    fn too_small_an_input_is_named() {
        let x = Tensor::zeros((1, 1, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = max_pool_3x3_stride2(&x).unwrap_err().to_string();
        assert!(err.contains("at least 3×3"), "{err}");
    }
}
