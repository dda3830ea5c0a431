//! The fabric's bytes on the wire: frames and what they carry (layouts in `docs/FORMAT.md`,
//! "Fabric frame").
//!
//! A frame is a 13-byte header — body length (u32 LE), kind (u8), request id (u64 LE) — then a
//! postcard body whose type the kind names. Decoding follows `proto/`'s discipline: a length
//! above [`FRAME_BODY_BYTES_MAX`], an unknown kind or a body that does not decode is an error
//! (the connection is closed), never a panic, and nothing is allocated beyond what the length
//! allows and the bytes bring.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::control::ControlMessage;
use crate::types::{Command, SnapshotMeta, TypeConfig};

/// First bytes of a hello body: "PGFB".
pub const HELLO_MAGIC: u32 = 0x5047_4642;
/// The fabric protocol version; a peer with another one is refused at hello. 2: the
/// `Leaving` control message (a version-1 peer could not decode it).
pub const FABRIC_VERSION: u16 = 2;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 13;
/// Largest frame body accepted: an append of [`crate::node::APPEND_ENTRIES_MAX`] entries of
/// the largest records (8 MiB write blocks) fits with room to spare.
pub const FRAME_BODY_BYTES_MAX: usize = 288 << 20;

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

/// Frame kinds.
pub mod kind {
    /// Hello (first frame of a connection, each way).
    pub const HELLO: u8 = 0;
    /// A request expecting a [`super::Reply`] with the same id.
    pub const REQUEST: u8 = 1;
    /// The reply to a request.
    pub const REPLY: u8 = 2;
    /// A control message (no reply).
    pub const CONTROL: u8 = 3;
    /// Snapshot lane: the transfer's header.
    pub const SNAPSHOT_BEGIN: u8 = 4;
    /// Snapshot lane: one batch of versions.
    pub const SNAPSHOT_BATCH: u8 = 5;
    /// Snapshot lane: the end of the source's stream.
    pub const SNAPSHOT_END: u8 = 6;
    /// Snapshot lane: the install's result (receiver to sender).
    pub const SNAPSHOT_DONE: u8 = 7;
    /// Main lane: nothing else to send for a while (empty body).
    pub const KEEPALIVE: u8 = 8;
}

/// Which connection a hello opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lane {
    /// The one multiplexed connection of a peer pair (Raft messages, control, proxied requests).
    Main,
    /// One snapshot transfer.
    Snapshot,
    /// Discovery: the hellos are exchanged (so each side learns the other's id and client
    /// address) and the connection closes.
    Discover,
}

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: u32,
    /// [`FABRIC_VERSION`].
    pub version: u16,
    /// The cluster's name: peers of different clusters refuse each other.
    pub cluster: String,
    /// The sender's node id.
    pub from: u64,
    /// The node id the sender expects at the other end.
    pub to: u64,
    /// What the connection is for.
    pub lane: Lane,
    /// The replicated namespaces, in configuration order (the index is the group's namespace
    /// number on the wire): both ends must agree.
    pub namespaces: Vec<String>,
    /// The sender's client address (host:port), for the peer lists clients read.
    pub service: String,
    /// Empty from the dialer; the acceptor's answer: empty = accepted, else why not.
    pub refusal: String,
}

/// A Raft message of one group.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftRequest {
    /// Append entries (a heartbeat when empty).
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    /// Vote.
    Vote(openraft::raft::VoteRequest<TypeConfig>),
    /// Pre-vote.
    PreVote(openraft::raft::VoteRequest<TypeConfig>),
    /// Leadership transfer.
    TransferLeader(openraft::raft::TransferLeaderRequest<TypeConfig>),
}

/// The body of a request frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum Request {
    /// To group (`namespace`, `partition`) on the receiver.
    Raft {
        /// Namespace number (index in the hello's list).
        namespace: u16,
        /// Partition.
        partition: u16,
        /// The message.
        rpc: RaftRequest,
    },
    /// A client request forwarded to the node that can execute it (opaque to the fabric; the
    /// server encodes and answers it).
    Proxy(Vec<u8>),
}

/// The body of a reply frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum Reply {
    /// To [`RaftRequest::Append`].
    Append(openraft::raft::AppendEntriesResponse<TypeConfig>),
    /// To a vote or pre-vote.
    Vote(openraft::raft::VoteResponse<TypeConfig>),
    /// To a leadership transfer.
    TransferLeader(openraft::raft::TransferLeaderResponse<TypeConfig>),
    /// To [`Request::Proxy`].
    Proxy(Vec<u8>),
    /// The request could not be handled (no such group, the group stopped, ...).
    Error(String),
}

/// The body of a control frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Namespace number.
    pub namespace: u16,
    /// The message.
    pub message: ControlMessage,
}

/// The body of a snapshot-begin frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct SnapshotBegin {
    /// Namespace number.
    pub namespace: u16,
    /// Partition.
    pub partition: u16,
    /// The sender's vote.
    pub vote: Vote,
    /// The snapshot's meta.
    pub meta: SnapshotMeta,
}

/// The body of a snapshot-done frame: the install's response, or why it failed.
pub type SnapshotDone = Result<openraft::raft::SnapshotResponse<TypeConfig>, String>;

/// The body of a snapshot-batch frame.
pub type SnapshotBatch = Command;

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body bytes.
    pub body_len: u32,
    /// Kind ([`kind`]).
    pub kind: u8,
    /// Request id (0 for frames that are not requests or replies).
    pub id: u64,
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A length above the limit.
    TooLong(usize),
    /// A kind this version does not know.
    UnknownKind(u8),
    /// A body that does not decode as its kind's type.
    Body(&'static str, String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLong(n) => write!(f, "frame body of {n} bytes exceeds {FRAME_BODY_BYTES_MAX}"),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::Body(what, e) => write!(f, "malformed {what} body: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl FrameHeader {
    /// Decodes and checks a header.
    pub fn decode(bytes: [u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, WireError> {
        let [l0, l1, l2, l3, kind, i0, i1, i2, i3, i4, i5, i6, i7] = bytes;
        let body_len = u32::from_le_bytes([l0, l1, l2, l3]);
        if body_len as usize > FRAME_BODY_BYTES_MAX {
            return Err(WireError::TooLong(body_len as usize));
        }
        if kind > kind::KEEPALIVE {
            return Err(WireError::UnknownKind(kind));
        }
        Ok(FrameHeader { body_len, kind, id: u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]) })
    }
}

/// Appends one frame (header and postcard body) to `out`; fails (leaving `out` as it was) when
/// the body exceeds [`FRAME_BODY_BYTES_MAX`] or does not encode.
pub fn encode_frame<T: Serialize>(out: &mut Vec<u8>, kind: u8, id: u64, body: &T) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let encoded = postcard::to_extend(body, std::mem::take(out));
    *out = match encoded {
        Ok(v) => v,
        Err(e) => return Err(WireError::Body("outgoing", e.to_string())),
    };
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    if body_len > FRAME_BODY_BYTES_MAX {
        out.truncate(start);
        return Err(WireError::TooLong(body_len));
    }
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4] = kind;
    out[start + 5..start + FRAME_HEADER_BYTES].copy_from_slice(&id.to_le_bytes());
    Ok(())
}

/// One frame as bytes.
pub fn frame<T: Serialize>(kind: u8, id: u64, body: &T) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_frame(&mut out, kind, id, body)?;
    Ok(out)
}

/// Decodes a body as `T` (all of it: trailing bytes are an error).
pub fn decode_body<'de, T: Deserialize<'de>>(what: &'static str, body: &'de [u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(WireError::Body(what, format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(WireError::Body(what, e.to_string())),
    }
}

/// Decodes whatever a frame of `kind` carries, for the fuzz target and the tests: every
/// input gives a value or an error.
pub fn decode_any(kind: u8, body: &[u8]) -> Result<(), WireError> {
    match kind {
        kind::HELLO => decode_body::<Hello>("hello", body).map(drop),
        kind::REQUEST => decode_body::<Request>("request", body).map(drop),
        kind::REPLY => decode_body::<Reply>("reply", body).map(drop),
        kind::CONTROL => decode_body::<Control>("control", body).map(drop),
        kind::SNAPSHOT_BEGIN => decode_body::<SnapshotBegin>("snapshot begin", body).map(drop),
        kind::SNAPSHOT_BATCH => decode_body::<SnapshotBatch>("snapshot batch", body).map(drop),
        kind::SNAPSHOT_END => decode_body::<u64>("snapshot end", body).map(drop),
        kind::SNAPSHOT_DONE => decode_body::<SnapshotDone>("snapshot done", body).map(drop),
        kind::KEEPALIVE => decode_body::<()>("keepalive", body),
        k => Err(WireError::UnknownKind(k)),
    }
}

/// Decodes a whole frame from `bytes` (header then body): the fuzz target's entry point.
pub fn decode_frame_bytes(bytes: &[u8]) -> Result<FrameHeader, WireError> {
    let header: [u8; FRAME_HEADER_BYTES] = bytes
        .get(..FRAME_HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Body("frame", "shorter than a header".into()))?;
    let h = FrameHeader::decode(header)?;
    let body = bytes
        .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + h.body_len as usize)
        .ok_or(WireError::Body("frame", "body shorter than its length".into()))?;
    decode_any(h.kind, body)?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn frames_round_trip_and_the_header_is_as_documented() {
        let c = Control { namespace: 2, message: ControlMessage::Wake { partition: 4095 } };
        let f = frame(kind::CONTROL, 0x0102_0304_0506_0708, &c).unwrap();
        assert_eq!(&f[0..4], &((f.len() - FRAME_HEADER_BYTES) as u32).to_le_bytes());
        assert_eq!(f[4], kind::CONTROL);
        assert_eq!(&f[5..13], &0x0102_0304_0506_0708u64.to_le_bytes());
        let h = decode_frame_bytes(&f).unwrap();
        assert_eq!(h.id, 0x0102_0304_0506_0708);
        assert_eq!(decode_body::<Control>("control", &f[FRAME_HEADER_BYTES..]).unwrap(), c);
    }

    /// docs/FORMAT.md ("Fabric frame") states the header the code writes.
    #[test]
    fn the_format_doc_matches_the_frame_header() {
        let doc = include_str!("../../../docs/FORMAT.md");
        let start = doc.find("## Fabric frame\n").unwrap();
        let body = &doc[start + 16..];
        let body = &body[..body.find("\n## ").unwrap_or(body.len())];
        let rows: Vec<(usize, String)> = body
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                Some((cells.get(1)?.parse().ok()?, cells.get(3)?.trim_matches('`').to_owned()))
            })
            .collect();
        let want: Vec<(usize, String)> = [(0, "body_len"), (4, "kind"), (5, "id"), (FRAME_HEADER_BYTES, "body")]
            .map(|(o, n)| (o, n.to_owned()))
            .into();
        assert_eq!(rows, want);
        assert!(body.contains(&format!("0x{HELLO_MAGIC:08x}")));
        assert!(body.contains(&format!("{} MiB", FRAME_BODY_BYTES_MAX >> 20)));
        assert!(body.contains("8 keepalive") && kind::KEEPALIVE == 8 && kind::SNAPSHOT_DONE == 7);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let mut too_long = [0u8; FRAME_HEADER_BYTES];
        too_long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(FrameHeader::decode(too_long), Err(WireError::TooLong(_))));
        let mut unknown = [0u8; FRAME_HEADER_BYTES];
        unknown[4] = 200;
        assert_eq!(FrameHeader::decode(unknown), Err(WireError::UnknownKind(200)));
        // Every prefix of a good frame, and every single-byte corruption of its body, decodes
        // to a value or an error.
        let hello = Hello {
            magic: HELLO_MAGIC,
            version: FABRIC_VERSION,
            cluster: "c".into(),
            from: 1,
            to: 2,
            lane: Lane::Main,
            namespaces: vec!["test".into()],
            service: "127.0.0.1:3000".into(),
            refusal: String::new(),
        };
        let f = frame(kind::HELLO, 0, &hello).unwrap();
        for n in 0..f.len() {
            assert!(decode_frame_bytes(&f[..n]).is_err());
        }
        for i in FRAME_HEADER_BYTES..f.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut g = f.clone();
                g[i] ^= flip;
                let _ = decode_frame_bytes(&g);
            }
        }
        for k in 0..=kind::KEEPALIVE {
            for body in [&[][..], &[0xFF; 9][..], &[0x80; 32][..]] {
                let _ = decode_any(k, body);
            }
        }
        assert!(decode_body::<u64>("x", &[1, 2]).is_err(), "trailing bytes");
    }
}
