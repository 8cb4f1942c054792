//! The codec's error type: every decoding failure is a value, never a panic.

/// Why encoding or decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame does not start with the WeightGrad magic.
    #[error("not a WeightGrad frame (bad magic)")]
    BadMagic,
    /// The frame's protocol version is not one this build speaks.
    #[error("unsupported frame version {found} (this build speaks {supported})")]
    Version {
        /// Version in the frame.
        found: u8,
        /// Version this build speaks.
        supported: u8,
    },
    /// The frame ends before a declared section does.
    #[error("truncated frame: {0}")]
    Truncated(String),
    /// A declared size is over a configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Which section.
        what: &'static str,
        /// Declared or actual size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The CBOR header could not be parsed.
    #[error("bad frame header: {0}")]
    Header(String),
    /// The zstd payload could not be decompressed.
    #[error("bad compressed payload: {0}")]
    Compression(String),
    /// Sections are individually well-formed but inconsistent with each other.
    #[error("invalid frame: {0}")]
    Invalid(String),
}
