//! Bin values between the wire (big-endian integers and floats, particle types) and the engine,
//! and engine errors as Aerospike result codes.

use peregrine_engine::{Error, Value};
use peregrine_proto::consts::{particle, result};

/// Decodes a wire value. `Err` carries the result code for a malformed value.
pub fn from_wire(particle_type: u8, bytes: &[u8]) -> Result<Value, u8> {
    Ok(match particle_type {
        particle::INTEGER => Value::Int(i64::from_be_bytes(bytes.try_into().map_err(|_| result::PARAMETER)?)),
        particle::FLOAT => {
            Value::Float(f64::from_bits(u64::from_be_bytes(bytes.try_into().map_err(|_| result::PARAMETER)?)))
        }
        particle::BOOL => match bytes {
            [b] => Value::Bool(*b != 0),
            _ => return Err(result::PARAMETER),
        },
        particle::STRING => Value::String(bytes.to_vec()),
        particle::BLOB => Value::Blob(bytes.to_vec()),
        particle::LIST => Value::List(bytes.to_vec()),
        particle::MAP => Value::Map(bytes.to_vec()),
        particle::NULL => return Err(result::PARAMETER),
        other => Value::Other { particle_type: other, bytes: bytes.to_vec() },
    })
}

/// Appends a value's wire bytes; returns its particle type.
pub fn to_wire(value: &Value, out: &mut Vec<u8>) -> u8 {
    match value {
        Value::Int(v) => out.extend_from_slice(&v.to_be_bytes()),
        Value::Float(v) => out.extend_from_slice(&v.to_bits().to_be_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(b) | Value::Blob(b) | Value::List(b) | Value::Map(b) | Value::Other { bytes: b, .. } => {
            out.extend_from_slice(b)
        }
    }
    value.particle_type()
}

/// The result code for an engine error.
pub fn result_code(e: &Error) -> u8 {
    match e {
        Error::NotFound => result::KEY_NOT_FOUND,
        Error::Generation { .. } => result::GENERATION,
        Error::RecordExists => result::KEY_EXISTS,
        Error::RecordTooBig { .. } => result::RECORD_TOO_BIG,
        Error::BinName { .. } | Error::TooManyBins { .. } => result::BIN_NAME,
        Error::BinIncompatible(_) => result::BIN_TYPE,
        Error::SetName { .. } | Error::TooManySets { .. } | Error::Parameter(_) => result::PARAMETER,
        Error::KeyBusy => result::KEY_BUSY,
        Error::DeviceFull(_) => result::SERVER_FULL,
        Error::DeviceOverload(_) => result::DEVICE_OVERLOAD,
        Error::Shutdown => result::PARTITION_UNAVAILABLE,
        Error::Corruption { .. }
        | Error::Io { .. }
        | Error::Failed { .. }
        | Error::DeviceInUse { .. }
        | Error::Device { .. }
        | Error::Config(_)
        | Error::Poisoned(_) => result::SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_the_wire() {
        for v in [
            Value::Int(-3),
            Value::Float(0.25),
            Value::Bool(true),
            Value::String(b"x".to_vec()),
            Value::Blob(vec![1]),
            Value::List(vec![0x90]),
            Value::Map(vec![0x80]),
            Value::Other { particle_type: particle::GEOJSON, bytes: b"{}".to_vec() },
        ] {
            let mut out = Vec::new();
            let pt = to_wire(&v, &mut out);
            assert_eq!(from_wire(pt, &out), Ok(v));
        }
        assert_eq!(from_wire(particle::INTEGER, &[1, 2]), Err(result::PARAMETER));
    }
}
