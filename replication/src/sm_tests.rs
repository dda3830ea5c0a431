//! Tests of the engine as state machine: openraft's storage Suite on the shared log's
//! `GroupLog` and a `PartitionStateMachine` over a real engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use peregrine_engine::{Engine, EngineConfig, MaintenanceMode, PartitionId};

use crate::log::{GroupLog, LogOptions, SharedLog};
use crate::state_machine::{PartitionStateMachine, SmOptions};
use crate::types::TypeConfig;

/// A directory on a filesystem with O_DIRECT (not tmpfs).
pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("peregrine-sm-").tempdir_in("/var/tmp").unwrap()
}

/// A small engine for tests: one 16 MiB file, 128 KiB write blocks, external maintenance.
pub(crate) fn engine_config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::single_file("test", dir.join("engine.dat"), 16 << 20);
    c.write_block_bytes = 128 * 1024;
    c.maintenance = MaintenanceMode::External;
    c
}

pub(crate) fn log_options(dir: &Path) -> LogOptions {
    let mut o = LogOptions::new(dir.join("raft-log"));
    o.segment_bytes = 1 << 20;
    o.batch_bytes_max = 256 * 1024;
    o
}

/// A fresh engine, shared log and side directory per build; group = partition 5.
struct EngineStoreBuilder;

type Guard = (tempfile::TempDir, SharedLog<TypeConfig>, Engine);

impl StoreBuilder<TypeConfig, GroupLog<TypeConfig>, PartitionStateMachine, Guard> for EngineStoreBuilder {
    async fn build(&self) -> Result<(Guard, GroupLog<TypeConfig>, PartitionStateMachine), StorageError<TypeConfig>> {
        let dir = tempdir();
        let engine = Engine::open(engine_config(dir.path())).unwrap();
        let (log, _) = SharedLog::<TypeConfig>::open(log_options(dir.path())).unwrap();
        let pid = PartitionId::new(5).unwrap();
        let sm =
            PartitionStateMachine::open(engine.clone(), pid, &dir.path().join("sm"), SmOptions::default()).unwrap();
        let g = log.group(u32::from(pid.get()));
        Ok(((dir, log, engine), g, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_the_shared_log_and_the_engine_state_machine() {
    Suite::test_all(EngineStoreBuilder).await.unwrap();
}
