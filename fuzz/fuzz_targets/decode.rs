//! Fuzz target: every wire decoder over arbitrary bytes (frames, messages, batch rows, partition
//! and digest arrays, compressed frames). Run: `cargo fuzz run decode -s none` from this folder.
//! The seed corpus (real frames of the official Python client) is also decoded by
//! `proto/tests/decode.rs` in the normal test run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = peregrine_proto::fuzz::decode_everything(data);
});
