//! A bounds-checked `f32` matrix product over slices, on the `gemm` crate (the kernels
//! candle's CPU matmul uses).

/// A matrix stored in a slice: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
/// A transposed view swaps the strides; no data moves.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same elements as a `cols × rows` matrix.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Panics unless every element the view names lies inside `data`.
    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "{what}: a {}×{} view with strides ({}, {}) reaches element {last} of {}",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// Multiply-adds from which [`matmul_into_parallel`] uses every thread of the pool.
const PARALLEL_FROM: usize = 1 << 22;

/// `dst = a · b`, or `dst += a · b` when `accumulate`; `dst` is row-major `a.rows × b.cols`.
/// Runs on the calling thread: callers parallelize over independent products.
///
/// Panics if the shapes disagree or a view reaches outside its slice.
pub fn matmul_into(dst: &mut [f32], accumulate: bool, a: MatRef<'_>, b: MatRef<'_>) {
    product(dst, accumulate, a, b, gemm::Parallelism::None)
}

/// [`matmul_into`] on every thread of rayon's pool when the product is large enough to
/// gain from it (for a whole batch at once, outside any parallel loop).
pub fn matmul_into_parallel(dst: &mut [f32], accumulate: bool, a: MatRef<'_>, b: MatRef<'_>) {
    let threads = rayon::current_num_threads();
    let parallelism = if a.rows * a.cols * b.cols >= PARALLEL_FROM && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    product(dst, accumulate, a, b, parallelism)
}

fn product(
    dst: &mut [f32],
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    parallelism: gemm::Parallelism,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions of a matrix product");
    assert_eq!(
        dst.len(),
        a.rows * b.cols,
        "destination of a matrix product"
    );
    a.check("left operand");
    b.check("right operand");
    if dst.is_empty() {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: every element each pointer is read or written at lies inside its slice: the
    // views were checked above and `dst` holds exactly `a.rows × b.cols` row-major
    // elements. `dst` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                out[r * b.cols + c] = (0..a.cols)
                    .map(|k| {
                        a.data[r * a.row_stride + k * a.col_stride]
                            * b.data[k * b.row_stride + c * b.col_stride]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn products_of_plain_and_transposed_views_match_the_definition() {
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..20).map(|i| (i % 7) as f32 - 3.0).collect();
        let a34 = MatRef::row_major(&a, 3, 4);
        let b45 = MatRef::row_major(&b, 4, 5);
        let mut dst = vec![7.0; 15];
        matmul_into(&mut dst, false, a34, b45);
        assert_eq!(dst, naive(a34, b45));
        // Accumulating adds the product to what is there.
        let before = dst.clone();
        matmul_into(&mut dst, true, a34, b45);
        let twice: Vec<f32> = before.iter().map(|v| 2.0 * v).collect();
        assert_eq!(dst, twice);
        // aᵀ (4×3) times a (3×4), both views of the same slice.
        let a43 = MatRef::row_major(&a, 3, 4).t();
        let mut gram = vec![0.0; 16];
        matmul_into(&mut gram, false, a43, a34);
        assert_eq!(gram, naive(a43, a34));
    }

    #[test]
    #[should_panic(expected = "reaches element")]
    fn a_view_past_its_slice_is_refused() {
        let a = vec![1.0; 11];
        let mut dst = vec![0.0; 9];
        matmul_into(
            &mut dst,
            false,
            MatRef::row_major(&a, 3, 4),
            MatRef::row_major(&a, 4, 3),
        );
    }
}
