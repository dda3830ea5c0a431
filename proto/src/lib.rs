//! The Aerospike client wire protocol as the official clients speak it: 8-byte frame headers,
//! AS_MSG messages (header, fields, ops), the info protocol, batch-index requests, partition
//! scans and zlib-compressed frames.
//!
//! Architecture invariant: this is the only crate that knows the wire format. It depends on
//! nothing of the engine; values stay (particle type, bytes) here. Record identity and the
//! particle-type codes come from `peregrine-index`.

pub mod batch;
#[cfg(feature = "client")]
pub mod client;
pub mod compress;
pub mod consts;
pub mod decode;
pub mod encode;
pub mod error;
pub mod fuzz;
pub mod info;

pub use batch::{Batch, BatchRow, RowCommand};
pub use decode::{Field, Message, MsgHeader, Op, ProtoHeader, decode_message};
pub use error::DecodeError;
