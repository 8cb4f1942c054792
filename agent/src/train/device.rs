//! Compute device selection: the only CUDA-specific code in the project.

use anyhow::{Result, bail};
use candle_core::Device;

/// Whether this process computes on one CPU thread (`CANDLE_NUM_THREADS=1`, as an agent
/// sharing its host with others runs): then a region's LAN workers take turns on the step's
/// thread and the evaluation thread runs at the lowest priority, instead of threads that
/// would only contend for that core.
pub fn one_compute_thread() -> bool {
    candle_core::utils::get_num_threads() == 1
}

/// A device as named on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA GPU with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; expected cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; CUDA without the `cuda` feature is a clear error.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace when RUST_BACKTRACE is set: the cause is the first line.
        let cause = e.to_string();
        let cause = cause.lines().next().unwrap_or_default().to_string();
        anyhow::anyhow!("--device cuda:{ordinal}: cannot open the GPU: {cause}")
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this weightgrad was built without CUDA support; \
         rebuild with `cargo build --release -p weightgrad --features cuda` (its kernels need \
         nvcc: `eval \"$(.ci/cuda-toolchain)\"` installs it; README, \"GPU\") or use --device cpu"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(1).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
}
