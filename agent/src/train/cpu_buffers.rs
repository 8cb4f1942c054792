//! Slices and buffers for the CPU custom ops (convolution, pooling, linear layers, loss):
//! operands' contiguous elements, outputs written once, per-thread scratch space.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, WithDType, bail};

/// `len` zeros, written rather than allocated zeroed. A zeroed allocation maps the shared
/// zero page, so the first `+=` on each page would copy it and flush every thread's TLB;
/// writing first costs a plain page fault instead.
pub(crate) fn written_zeros(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, 0.0);
    v
}

thread_local! {
    /// Each thread's unfolding buffer, kept between calls: a fresh megabyte-sized buffer
    /// per sample costs page faults and, freed, cross-thread TLB flushes.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` elements (contents unspecified).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// The contiguous elements of a custom op's operand.
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what} is not contiguous")
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The contiguous `f32` elements of a custom op's operand.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    contiguous(storage, layout, what)
}

/// A CPU tensor's contiguous elements, borrowed while `f` runs.
pub(crate) fn with_cpu<T: WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{what} is not on the CPU")
    };
    f(contiguous(cpu, layout, what)?)
}

/// A CPU tensor's contiguous `f32` elements, borrowed while `f` runs.
pub(crate) fn with_cpu_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    with_cpu(t, what, f)
}

/// Overwrites a CPU `f32` tensor's elements with a slice, in place: one copy, where a new
/// tensor and `Var::set` would make two.
struct Overwrite<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for Overwrite<'_> {
    fn name(&self) -> &'static str {
        "overwrite"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            bail!("overwrite: the tensor is not f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("overwrite: the tensor is not contiguous")
        };
        let dst = &mut data[start..end];
        if dst.len() != self.0.len() {
            bail!(
                "overwrite: {} values for a tensor of {}",
                self.0.len(),
                dst.len()
            )
        }
        dst.copy_from_slice(self.0);
        Ok(())
    }
}

/// Whether `t` is a contiguous CPU `f32` tensor: one whose elements the CPU paths here
/// read or write directly.
pub(crate) fn is_contiguous_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

/// Writes `values` into `var` (same element count) in place where it is a contiguous CPU
/// `f32` tensor, and through `Var::set` otherwise.
pub(crate) fn overwrite(var: &candle_core::Var, values: &[f32]) -> Result<()> {
    let t = var.as_tensor();
    if t.elem_count() != values.len() {
        bail!(
            "{} values for a parameter of {} elements",
            values.len(),
            t.elem_count()
        )
    }
    if is_contiguous_cpu_f32(t) {
        t.inplace_op1(&Overwrite(values))
    } else {
        var.set(&Tensor::from_slice(values, t.shape(), t.device())?)
    }
}

/// Runs `f` on a tensor's elements as `f32`: borrowed where it is a contiguous CPU `f32`
/// tensor, copied out (flattened) otherwise.
pub(crate) fn with_f32_elements<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    if !is_contiguous_cpu_f32(t) {
        return f(&t.flatten_all()?.to_vec1::<f32>()?);
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        unreachable!("checked to be on the CPU")
    };
    f(contiguous::<f32>(cpu, layout, "a tensor")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A parameter overwritten in place holds the new values, and a tensor that shared its
    /// storage (as `Var::set` would leave it) sees them too; a wrong count is an error that
    /// says so, and the parameter keeps its values.
    #[test]
    fn overwrite_writes_the_values_in_place() {
        let var = Var::from_slice(&[1.0f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let alias = var.as_tensor().clone();
        overwrite(&var, &[5.0, 6.0, 7.0, 8.0]).unwrap();
        let read = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(read(var.as_tensor()), [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(read(&alias), [5.0, 6.0, 7.0, 8.0]);
        let err = overwrite(&var, &[1.0, 2.0, 3.0]).unwrap_err().to_string();
        assert!(err.contains('3') && err.contains('4'), "{err}");
        assert_eq!(read(var.as_tensor()), [5.0, 6.0, 7.0, 8.0]);
        // Another dtype goes through `Var::set`.
        let wide = Var::from_slice(&[1.0f64, 2.0], 2, &Device::Cpu).unwrap();
        assert!(overwrite(&wide, &[3.0, 4.0]).is_err());
    }

    /// A contiguous tensor's elements are borrowed, a strided one's copied out in order:
    /// the same values either way.
    #[test]
    fn elements_of_contiguous_and_strided_tensors() {
        let t =
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &Device::Cpu).unwrap();
        let seen = with_f32_elements(&t, |v| Ok(v.to_vec())).unwrap();
        assert_eq!(seen, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let transposed = t.t().unwrap();
        assert!(!transposed.is_contiguous());
        let seen = with_f32_elements(&transposed, |v| Ok(v.to_vec())).unwrap();
        assert_eq!(seen, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
