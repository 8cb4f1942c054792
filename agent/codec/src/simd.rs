//! Which vector instructions this CPU offers, checked once. The codec's hot loops are
//! written once in plain Rust and compiled a second time with AVX2 enabled; they run that
//! copy where the CPU has it. Both copies perform the same IEEE operations in the same
//! order, so they give the same bits.

/// Whether this CPU has AVX2.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}
