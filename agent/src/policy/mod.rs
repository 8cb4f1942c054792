//! The policy system's host: WebAssembly components that speak `weightgrad:policy@3.0.0`,
//! run sandboxed (memory cap, per-call deadline), validated, with fallback and hot swap.

pub mod bindings;
pub mod builtin;
pub mod failure_log;
pub mod host;
pub mod runtime;
pub mod scaffold;

pub use builtin::{BUILTIN_WASM, builtin_wasm};
pub use host::{CompiledPolicy, PolicyFailure, Sandbox, SandboxLimits, export_mismatch};
pub use runtime::{
    Breaker, BreakerStatus, Decision, DecisionSource, FailStrategy, PolicyRuntime, Quarantined,
    Suspended, SwapReport, golden_input,
};
