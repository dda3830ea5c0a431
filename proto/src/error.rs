//! Decoding errors: what was malformed, in words a log reader understands.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame header's version is not 2 (often TLS bytes on a plain port: 0x16 0x03).
    #[error("protocol version {version} is not 2{hint}", hint = if *.0 == 0x16 { " (TLS handshake on a plain-text port?)" } else { "" }, version = .0)]
    Version(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    MessageType(u8),
    /// The body is larger than the configured maximum.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Claimed size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A length or count runs past the bytes available.
    #[error("{0} runs past the end of the message")]
    Truncated(&'static str),
    /// A field is malformed.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A compressed frame did not inflate.
    #[error("compressed frame: {0}")]
    Compression(String),
}
