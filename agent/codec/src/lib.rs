//! Sans-IO update codec for WeightGrad: quantizers, loss-aware weight quantization,
//! the significance filter, bit packing, sparse indices, the wire frame, and data mode's
//! quantized minibatches.
//!
//! Everything here is a pure function of its inputs (randomness comes from an explicit,
//! seeded generator), so the LAN path, the WAN path and the simulator share one codec, and
//! decoding untrusted bytes returns a typed error instead of panicking.

pub mod batch;
pub mod error;
pub mod filter;
pub mod frame;
mod header;
pub mod laq;
pub mod pack;
pub mod quant;
pub mod rng;
mod simd;
pub mod sparse;
#[cfg(test)]
mod test_strategies;

pub use error::CodecError;
pub use filter::{Selection, significance_filter, significant_top};
pub use frame::{
    EncodeOptions, Frame, FrameHeader, FrameMeta, Limits, Update, decode, decode_reusing, encode,
    encode_dense, encode_reusing,
};
pub use quant::{
    Quantized, Quantizer, Scheme, dequantize, dequantize_reusing, quantize, quantize_reusing,
};
pub use rng::DitherRng;
