//! Fuzz target: the fabric's frame decoder (`peregrine_replication::fabric::wire`) over
//! arbitrary bytes: a header, then the body of its kind (hello, Raft request and reply,
//! control, snapshot frames). Every input decodes to a value or an error, never a panic.
//! Run: `cargo fuzz run fabric_frame -s none` from this folder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = peregrine_replication::fabric::wire::decode_frame_bytes(data);
    // The body decoders of every kind, over the same bytes without a header.
    if let Some((&kind, body)) = data.split_first() {
        let _ = peregrine_replication::fabric::wire::decode_any(kind, body);
    }
});
