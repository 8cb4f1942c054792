//! Allocator tuning at start-up: freed tensor buffers stay in the process.
//!
//! A training step allocates and frees many tensors of a few hundred KiB to a few MiB. glibc
//! serves blocks above its mmap threshold with fresh mappings and returns freed heap tops to
//! the kernel, so each step pays page faults (and zeroing) for memory it just gave back: on
//! the transformer this was a third of the step's time (`docs/benchmarks.md`, "Allocator
//! tuning"). Raising the thresholds keeps those buffers for reuse.

/// Serves blocks up to 32 MiB from the heap and keeps up to 256 MiB of freed memory; call
/// once, before any thread starts. Does nothing off glibc, or when the environment sets
/// `WEIGHTGRAD_MALLOC=default` (glibc's own defaults, for a tight memory limit).
pub fn keep_freed_memory() {
    if std::env::var_os("WEIGHTGRAD_MALLOC").is_some_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters and is called before other threads
    // exist; a refused value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}
