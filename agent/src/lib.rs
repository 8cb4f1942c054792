//! WeightGrad: one model trained across regions over slow WAN links.
//!
//! This crate is the per-region agent: the training engine ([`train`]), the update
//! codec ([`codec`], re-exported from `weightgrad-codec`) and the `weightgrad` CLI ([`cli`]).

pub mod admin;
pub mod alloc_tuning;
pub mod atomic_file;
pub mod bench;
pub mod cli;
pub mod config;
pub mod lan;
pub mod loopback_port;
pub mod node;
pub mod policies;
pub mod policy;
pub mod sim;
pub mod sync;
pub mod telemetry;
pub mod train;
pub mod wan;

pub use weightgrad_codec as codec;
