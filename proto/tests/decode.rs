//! Decoder tests: round trips, real client frames (the fuzz seed corpus), and hostile input
//! that must give a clear error and never panic, allocate beyond the frame, or loop.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use peregrine_proto::consts::{field, info1, msg_type, op, particle};
use peregrine_proto::encode::{begin_frame, end_frame, put_field, put_msg_header, put_op};
use peregrine_proto::{Batch, DecodeError, MsgHeader, ProtoHeader, decode_message, fuzz};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    let seeds = files.iter().filter(|p| p.to_string_lossy().contains("seed-")).count();
    assert!(seeds >= 20, "seed corpus missing in {}", dir.display());
    files.into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn every_seed_frame_decodes() {
    let mut seen = fuzz::Decoded::default();
    for (name, bytes) in corpus() {
        if !name.contains("seed-") {
            // Inputs a local fuzzing run added: any outcome but a panic is fine.
            fuzz::decode_everything(&bytes);
            continue;
        }
        // Captured client frames must decode completely: any decoder error (frame, message,
        // batch-index rows, partition array, digests, ...) fails the test.
        let d = fuzz::decode_strict(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(d.total() > 0, "{name} decoded nothing");
        assert_eq!(fuzz::decode_everything(&bytes), d.total(), "{name}: lenient and strict decodes disagree");
        seen += d;
    }
    // The corpus must exercise the decoders this test guards.
    assert!(seen.info_commands > 0 && seen.messages > 0, "{seen:?}");
    assert!(seen.batch_rows > 0, "no seed has a batch-index field: {seen:?}");
    assert!(seen.partition_ids > 0, "no seed has a partition-array field: {seen:?}");
}

/// A seed that fails to decode is reported, not skipped: strict decoding names the error.
#[test]
fn strict_decode_reports_batch_and_partition_errors() {
    let odd_partitions = message(&[(field::NAMESPACE, b"test"), (field::PARTITION_ARRAY, &[1, 0, 2])], &[]);
    let e = fuzz::decode_strict(&odd_partitions).unwrap_err();
    assert!(e.contains("partition-array"), "{e}");
    let mut rows = 2u32.to_be_bytes().to_vec();
    rows.push(0);
    let bad_batch = message(&[(field::BATCH_INDEX, &rows)], &[]);
    let e = fuzz::decode_strict(&bad_batch).unwrap_err();
    assert!(e.contains("batch-index"), "{e}");
    let mut cut = message(&[(field::NAMESPACE, b"test")], &[]);
    cut.pop();
    assert!(fuzz::decode_strict(&cut).is_err());
}

/// Truncations and bit flips of real frames: errors are fine, panics and hangs are not.
#[test]
fn mutated_seed_frames_never_panic() {
    let mut state = 0x9E37_79B9_u64;
    for (_, bytes) in corpus() {
        for cut in 0..bytes.len().min(200) {
            fuzz::decode_everything(&bytes[..cut]);
        }
        for _ in 0..300 {
            let mut m = bytes.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state as usize) % m.len();
                m[i] ^= 1 << ((state >> 40) % 8);
            }
            fuzz::decode_everything(&m);
        }
    }
}

fn message(fields: &[(u8, &[u8])], ops: &[(u8, u8, &[u8], &[u8])]) -> Vec<u8> {
    let mut buf = Vec::new();
    let start = begin_frame(&mut buf, msg_type::MESSAGE);
    let h = MsgHeader {
        info1: info1::READ,
        generation: 7,
        record_ttl: 9,
        n_fields: fields.len() as u16,
        n_ops: ops.len() as u16,
        ..MsgHeader::default()
    };
    put_msg_header(&mut buf, &h);
    for (t, d) in fields {
        put_field(&mut buf, *t, d);
    }
    for (t, p, n, v) in ops {
        put_op(&mut buf, *t, *p, n, v);
    }
    end_frame(&mut buf, start);
    buf
}

#[test]
fn encode_decode_round_trip() {
    let frame = message(
        &[(field::NAMESPACE, b"test"), (field::SET, b"demo"), (field::DIGEST, &[9; 20])],
        &[(op::WRITE, particle::INTEGER, b"bin", &5i64.to_be_bytes()), (op::READ, 0, b"", b"")],
    );
    let header = ProtoHeader::decode(frame[..8].try_into().unwrap(), 1 << 20).unwrap();
    assert_eq!(header.msg_type, msg_type::MESSAGE);
    assert_eq!(header.size as usize, frame.len() - 8);
    let (m, used) = decode_message(&frame[8..]).unwrap();
    assert_eq!(used, frame.len() - 8);
    assert_eq!(m.header.generation, 7);
    assert_eq!(m.field(field::SET), Some(&b"demo"[..]));
    assert_eq!(m.digest().unwrap(), Some([9; 20]));
    assert_eq!(m.ops.len(), 2);
    assert_eq!(m.ops[0].name, b"bin");
    assert_eq!(m.ops[0].value, 5i64.to_be_bytes());
}

#[test]
fn hostile_frames_get_clear_errors() {
    // Not version 2; TLS ClientHello starts with 0x16 0x03.
    let tls = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01];
    let err = ProtoHeader::decode(tls, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // Oversized, refused from the header alone.
    let big = ProtoHeader::encode(msg_type::MESSAGE, 1 << 40);
    assert!(matches!(ProtoHeader::decode(big, 1 << 20), Err(DecodeError::TooLarge { .. })));
    // Unknown type.
    assert!(matches!(ProtoHeader::decode(ProtoHeader::encode(9, 1), 1 << 20), Err(DecodeError::MessageType(9))));
    // Counts that run past the end: 65535 fields in a 30-byte message.
    let mut body = message(&[(field::NAMESPACE, b"t")], &[])[8..].to_vec();
    body[18] = 0xFF;
    body[19] = 0xFF;
    assert!(matches!(decode_message(&body), Err(DecodeError::Truncated(_))));
    // A field claiming 4 GiB.
    let mut body = message(&[(field::NAMESPACE, b"t")], &[])[8..].to_vec();
    body[22..26].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode_message(&body), Err(DecodeError::Truncated(_))));
    // An op whose name is longer than the op.
    let mut body = message(&[], &[(op::READ, 0, b"abc", b"")])[8..].to_vec();
    body[22 + 7] = 200;
    assert!(decode_message(&body).is_err());
    // Header size below 22.
    let mut body = message(&[], &[])[8..].to_vec();
    body[0] = 3;
    assert!(matches!(decode_message(&body), Err(DecodeError::Malformed(_))));
    // A digest that is not 20 bytes.
    let body = message(&[(field::DIGEST, &[1; 19])], &[])[8..].to_vec();
    assert!(decode_message(&body).unwrap().0.digest().is_err());
}

#[test]
fn batch_rows_and_repeats() {
    let mut data = Vec::new();
    data.extend_from_slice(&3u32.to_be_bytes());
    data.push(0x0d);
    // Row 0: full row with info, namespace field, one read op.
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(&[1; 20]);
    data.push(0x02);
    data.extend_from_slice(&[info1::READ, 0, 0]);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    put_field(&mut data, field::NAMESPACE, b"test");
    put_op(&mut data, op::READ, 0, b"a", b"");
    // Rows 1 and 2 repeat it.
    for i in 1..3u32 {
        data.extend_from_slice(&i.to_be_bytes());
        data.extend_from_slice(&[i as u8 + 1; 20]);
        data.push(0x01);
    }
    let b = Batch::decode(&data).unwrap();
    assert_eq!(b.rows.len(), 3);
    assert_eq!(b.commands.len(), 1);
    assert!(b.rows.iter().all(|r| r.command == 0));
    assert_eq!(b.rows[2].digest, [3; 20]);
    assert_eq!(b.commands[0].field(field::NAMESPACE), Some(&b"test"[..]));
    // A count far beyond the data is refused before allocating.
    let mut lie = data.clone();
    lie[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(Batch::decode(&lie), Err(DecodeError::Truncated(_))));
    // REPEAT first is malformed.
    let mut bad = 1u32.to_be_bytes().to_vec();
    bad.push(0);
    bad.extend_from_slice(&0u32.to_be_bytes());
    bad.extend_from_slice(&[0; 20]);
    bad.push(0x01);
    assert!(matches!(Batch::decode(&bad), Err(DecodeError::Malformed(_))));
}
