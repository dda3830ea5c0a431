//! Compressed frames (type 4): a big-endian u64 giving the inflated size (including the inner
//! frame's 8-byte header), then a zlib stream of a complete type-3 frame. Both the claimed and
//! the actual inflated size are held to a limit.

use std::io::Read;

use crate::error::DecodeError;

/// Inflates a type-4 body into the inner frame (header included), refusing more than `max` bytes.
pub fn inflate(body: &[u8], max: u64) -> Result<Vec<u8>, DecodeError> {
    let claimed: [u8; 8] =
        body.get(..8).and_then(|b| b.try_into().ok()).ok_or(DecodeError::Truncated("compressed size"))?;
    let claimed = u64::from_be_bytes(claimed);
    if claimed > max {
        return Err(DecodeError::TooLarge { size: claimed, max });
    }
    let mut out = Vec::with_capacity(claimed.min(1 << 20) as usize);
    let decoder = flate2::read::ZlibDecoder::new(&body[8..]);
    decoder.take(max + 1).read_to_end(&mut out).map_err(|e| DecodeError::Compression(format!("zlib: {e}")))?;
    if out.len() as u64 > max {
        return Err(DecodeError::TooLarge { size: out.len() as u64, max });
    }
    if out.len() as u64 != claimed {
        return Err(DecodeError::Compression(format!("inflated to {} bytes, header said {claimed}", out.len())));
    }
    Ok(out)
}

/// Compresses a complete frame into a type-4 body (used by tests and the bench client).
pub fn deflate(frame: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = (frame.len() as u64).to_be_bytes().to_vec();
    let mut enc = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(frame);
    let _ = enc.finish();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let frame = vec![7u8; 10_000];
        let body = deflate(&frame);
        assert_eq!(inflate(&body, 1 << 20).unwrap(), frame);
        assert!(matches!(inflate(&body, 100), Err(DecodeError::TooLarge { .. })));
        // A lying size header is caught.
        let mut lie = body.clone();
        lie[..8].copy_from_slice(&5u64.to_be_bytes());
        assert!(inflate(&lie, 1 << 20).is_err());
        assert!(inflate(&body[..5], 1 << 20).is_err());
        assert!(inflate(&[0, 0, 0, 0, 0, 0, 0, 9, 1, 2, 3], 1 << 20).is_err());
    }

    /// A zip bomb: the size header is honest but huge; refused before inflating.
    #[test]
    fn bombs_are_refused() {
        let big = vec![0u8; 50 << 20];
        let body = deflate(&big);
        assert!(body.len() < 1 << 20, "a bomb is small: {} bytes", body.len());
        assert!(matches!(inflate(&body, 8 << 20), Err(DecodeError::TooLarge { .. })));
        let mut lie = body.clone();
        lie[..8].copy_from_slice(&(1u64 << 20).to_be_bytes());
        assert!(matches!(inflate(&lie, 8 << 20), Err(DecodeError::TooLarge { .. })));
    }
}
