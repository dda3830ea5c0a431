//! Engine integration tests: real files in temp dirs, real io_uring (and the blocking backend:
//! every test runs on both), real processes for crash tests, a loop device for the block path.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

mod common;
mod crash;
mod crash_sim;
mod devices;
mod failpoints;
mod metadata;
mod races;
mod recovery;
mod replica;
mod roundtrip;
mod space;
mod stress;
