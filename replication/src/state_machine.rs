//! The engine as the state machine of one partition group: [`PartitionStateMachine`]
//! implements openraft's `RaftStateMachine` for one (namespace engine, partition).
//!
//! **Apply.** A normal entry's [`Command`] is applied with the engine's monotonic replica apply
//! (`apply_versions_async`, `Durability::Buffered`: the shared log's fsync is the durability
//! point, and replaying entries after a crash skips what the engine kept as stale). Blank and
//! membership entries only move the applied id (and the membership). Every responder is
//! answered right after its entry.
//!
//! **What is persisted, and where.**
//! - The applied log id lives in the engine's per-partition value (27 bytes at most):
//!   `[1, term u64 LE, index u64 LE]` (17 bytes), or `[2]` while a snapshot install is under
//!   way, or empty (nothing applied). `set_partition_values` makes it durable only after a
//!   barrier, so it never claims versions a crash could take back. It is written every
//!   `persist_every` applied entries, before a snapshot is reported, after an install, and on
//!   [`PartitionStateMachine::persist`] (call it at shutdown).
//! - The last applied membership (too big for 27 bytes) and the meta of the last built or
//!   installed snapshot live in a small side file per group, `membership-<pid>.bin` in the
//!   directory given to [`PartitionStateMachine::open`] (postcard with an xxh3 checksum,
//!   written atomically: tmp + fsync + rename + fsync of the directory). It is rewritten only
//!   when either changed, *after* the applied id: the file never names a membership or
//!   snapshot beyond the durable applied id.
//! - At open, `applied_state` reports exactly what is durable. Entries between the durable
//!   applied id and the committed id are re-applied by openraft from the log (stale versions
//!   skipped), which also replays any membership entry the file missed.
//!
//! **Purge is bounded by the durable applied id.** openraft purges only up to the last
//! snapshot's `last_log_id` (and `max_in_snapshot_log_to_keep` behind it). Both
//! `build_snapshot` and `install_snapshot` make the applied id *and* the side file durable
//! before returning the meta, so every purge point is at or below a durable applied id whose
//! membership is durable too, and the log always holds `(durable applied, last log]`.
//!
//! **Snapshots are partition streams.** [`PartitionSnapshot`] is a handle (source engine,
//! partition) that the receiver reads with the engine's snapshot cursor in bounded batches
//! ([`crate::snapshot_transfer`]: one batch in memory, throttled at the receiver's
//! [`SmOptions::snapshot_mb_per_s`], cancellable through [`PartitionSnapshot::with_cancel`]);
//! in this crate's in-process tests the handle is the source node's engine itself (a network
//! transport would stream the same batches). The stream reads the *live* partition, so it may
//! hold versions newer than `meta.last_log_id`; that is sound because the receiver then
//! replays the log after `last_log_id` with the monotonic apply, which skips them as stale
//! (and reads wait for that replay: [`PartitionStateMachine::readable`]).
//! Install = mark the partition value "installing", `truncate_partition`, apply every batch,
//! write the side file, then the applied id (after the barrier). A crash during an install
//! leaves the "installing" mark and [`PartitionStateMachine::open`] refuses the group rather
//! than report contents it does not have (recovering such a replica needs a fresh snapshot
//! from a peer: not built yet). A cancelled or failed install leaves the mark too, and the
//! state machine refuses to apply, snapshot or report state until a later install completes.
//! (openraft treats an install error as a storage error, so the receiving `Raft` stops: a
//! cancel during an in-process install, as in the cluster test's network, costs the receiver
//! its group until the repair path exists.)

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, LogIdOptionExt, OptionalSend, RaftSnapshotBuilder};
use peregrine_engine::snapshot::SNAPSHOT_BATCH_RECORDS_DEFAULT;
use peregrine_engine::{Durability, Engine, PartitionId};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use crate::snapshot_transfer::SnapshotStream;
use crate::snapshot_transfer::{CancelToken, InstallGate, RemoteBatches, SNAPSHOT_MB_PER_S_DEFAULT, Throttle};
use crate::types::{LogId, Outcome, Response, SnapshotMeta, StoredMembership, TypeConfig};

/// A snapshot of a partition group as openraft hands it around.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, PartitionSnapshot>;

/// Default number of applied entries between two persists of the applied id.
pub const PERSIST_EVERY_DEFAULT: u64 = 1024;

const VALUE_APPLIED: u8 = 1;
const VALUE_INSTALLING: u8 = 2;
const SIDE_FILE_MAGIC: u32 = 0x5052_534d; // "PRSM"

/// Tunables of a partition state machine.
#[derive(Clone, Copy, Debug)]
pub struct SmOptions {
    /// Persist the applied id after this many applied entries (at least 1).
    pub persist_every: u64,
    /// Versions per snapshot batch (of the snapshots this state machine serves): the memory
    /// bound of a transfer.
    pub snapshot_batch_records: usize,
    /// Throttle, in MB/s (2^20 bytes), of the snapshot streams this state machine reads as a
    /// receiver; 0 = unlimited.
    pub snapshot_mb_per_s: u64,
}

impl Default for SmOptions {
    fn default() -> SmOptions {
        SmOptions {
            persist_every: PERSIST_EVERY_DEFAULT,
            snapshot_batch_records: SNAPSHOT_BATCH_RECORDS_DEFAULT,
            snapshot_mb_per_s: SNAPSHOT_MB_PER_S_DEFAULT,
        }
    }
}

/// Identity of a state machine instance, so an install can tell its own data from a peer's.
static NEXT_SOURCE_ID: AtomicU64 = AtomicU64::new(1);

/// The data of a partition snapshot: a handle the receiver streams the partition from —
/// the source node's engine itself (in-process), or batches arriving from a peer over the
/// fabric ([`PartitionSnapshot::remote`]).
#[derive(Clone)]
pub struct PartitionSnapshot {
    /// The partition.
    pub partition: PartitionId,
    source: SnapshotSource,
    cancel: CancelToken,
}

#[derive(Clone)]
enum SnapshotSource {
    /// A state machine in this process.
    Local { engine: Engine, gate: Arc<InstallGate>, id: u64, batch_records: usize },
    /// Batches a transport feeds in; the first stream takes the receiver.
    Remote(Arc<std::sync::Mutex<Option<RemoteBatches>>>),
}

impl fmt::Debug for PartitionSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            SnapshotSource::Local { id, .. } => format!("local #{id}"),
            SnapshotSource::Remote(_) => "remote".to_owned(),
        };
        f.debug_struct("PartitionSnapshot")
            .field("partition", &self.partition.get())
            .field("source", &source)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl PartitionSnapshot {
    /// A snapshot of `partition` whose batches a transport delivers through `batches` (see
    /// [`crate::snapshot_transfer::RemoteItem`]); it can be streamed once.
    pub fn remote(partition: PartitionId, batches: RemoteBatches) -> PartitionSnapshot {
        PartitionSnapshot {
            partition,
            source: SnapshotSource::Remote(Arc::new(std::sync::Mutex::new(Some(batches)))),
            cancel: CancelToken::new(),
        }
    }

    /// A stream over the partition in batches of at most `snapshot_batch_records` versions
    /// (the source's option), throttled at `mb_per_s` (0 = unlimited) and stopped by this
    /// handle's cancel token. A remote snapshot streams once; a second stream fails.
    pub fn stream(&self, mb_per_s: u64) -> SnapshotStream {
        match &self.source {
            SnapshotSource::Local { engine, gate, batch_records, .. } => SnapshotStream::new(
                engine.clone(),
                gate.clone(),
                self.partition,
                *batch_records,
                Throttle::new(mb_per_s),
                self.cancel.clone(),
            ),
            SnapshotSource::Remote(rx) => SnapshotStream::remote(
                self.partition,
                rx.lock().unwrap_or_else(|p| p.into_inner()).take(),
                Throttle::new(mb_per_s),
                self.cancel.clone(),
            ),
        }
    }

    /// This handle with `cancel` as its cancel token: streams of the returned handle fail with
    /// `Interrupted` once it is cancelled (see `snapshot_transfer::cancel_on_close`).
    pub fn with_cancel(&self, cancel: CancelToken) -> PartitionSnapshot {
        PartitionSnapshot { cancel, ..self.clone() }
    }

    /// The id of the local state machine this snapshot reads (`None`: remote).
    fn local_source_id(&self) -> Option<u64> {
        match &self.source {
            SnapshotSource::Local { id, .. } => Some(*id),
            SnapshotSource::Remote(_) => None,
        }
    }
}

/// What the side file holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct SideState {
    membership: StoredMembership,
    snapshot: Option<SnapshotMeta>,
}

struct State {
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<SnapshotMeta>,
    /// The applied id last made durable in the engine.
    durable_applied: Option<LogId>,
    /// What the side file holds.
    file: SideState,
    /// Entries applied since the last persist.
    since_persist: u64,
}

struct Shared {
    engine: Engine,
    pid: PartitionId,
    side_path: PathBuf,
    source_id: u64,
    options: SmOptions,
    /// Read without the mutex by [`PartitionStateMachine::readable`] and by the streams of
    /// this partition's snapshots; written under it.
    gate: Arc<InstallGate>,
    state: Mutex<State>,
}

/// The state machine of one partition group on one node (cheap to clone: clones share it, so
/// the caller keeps one to read or persist while openraft owns another).
#[derive(Clone)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
}

impl fmt::Debug for PartitionStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionStateMachine")
            .field("partition", &self.shared.pid.get())
            .field("side_path", &self.shared.side_path)
            .finish_non_exhaustive()
    }
}

fn engine_err(what: &'static str) -> impl Fn(peregrine_engine::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// The error of every state machine call made after an install failed, until one completes.
fn incomplete(pid: PartitionId) -> io::Error {
    io::Error::other(format!(
        "partition {}: a snapshot install did not complete; the partition is incomplete until another install \
         completes",
        pid.get()
    ))
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn encode_applied(applied: Option<LogId>) -> Vec<u8> {
    match applied {
        None => Vec::new(),
        Some(id) => {
            let mut v = Vec::with_capacity(17);
            v.push(VALUE_APPLIED);
            v.extend_from_slice(&id.leader_id.term.to_le_bytes());
            v.extend_from_slice(&id.index.to_le_bytes());
            v
        }
    }
}

fn decode_applied(pid: PartitionId, v: &[u8]) -> io::Result<Option<LogId>> {
    let u64_at = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[at..at + 8]);
        u64::from_le_bytes(b)
    };
    match v {
        [] => Ok(None),
        [VALUE_APPLIED, rest @ ..] if rest.len() == 16 => Ok(Some(LogId::new_term_index(u64_at(1), u64_at(9)))),
        [VALUE_INSTALLING] => Err(io::Error::other(format!(
            "partition {}: a snapshot install was interrupted; its contents are incomplete and the \
             replica must be rebuilt from a peer's snapshot",
            pid.get()
        ))),
        _ => Err(invalid_data(format!("partition {}: unrecognised applied-id value {v:02x?}", pid.get()))),
    }
}

fn side_path(dir: &Path, pid: PartitionId) -> PathBuf {
    dir.join(format!("membership-{}.bin", pid.get()))
}

fn read_side_file(path: &Path) -> io::Result<SideState> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SideState::default()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))),
    };
    let bad = |why: &str| invalid_data(format!("{}: {why}", path.display()));
    if bytes.len() < 12 {
        return Err(bad("too short"));
    }
    let (head, body) = bytes.split_at(12);
    let mut m = [0u8; 4];
    m.copy_from_slice(&head[..4]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&head[4..12]);
    if u32::from_le_bytes(m) != SIDE_FILE_MAGIC {
        return Err(bad("bad magic"));
    }
    if u64::from_le_bytes(c) != xxhash_rust::xxh3::xxh3_64(body) {
        return Err(bad("checksum mismatch"));
    }
    postcard::from_bytes(body).map_err(|e| bad(&format!("decoding: {e}")))
}

/// Writes the side file atomically: tmp file, fsync, rename, fsync of the directory.
fn write_side_file(path: &Path, state: &SideState) -> io::Result<()> {
    let body = postcard::to_allocvec(state).map_err(|e| invalid_data(format!("encoding the side file: {e}")))?;
    let mut bytes = Vec::with_capacity(12 + body.len());
    bytes.extend_from_slice(&SIDE_FILE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let tmp = path.with_extension("tmp");
    let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", tmp.display()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| ctx("creating", e))?;
        f.write_all(&bytes).map_err(|e| ctx("writing", e))?;
        f.sync_all().map_err(|e| ctx("syncing", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ctx("renaming", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ctx("syncing the directory of", e))?;
    }
    Ok(())
}

/// [`write_side_file`] on the blocking pool (it fsyncs twice).
async fn write_side_file_async(path: &Path, state: &SideState) -> io::Result<()> {
    let (path, state) = (path.to_path_buf(), state.clone());
    tokio::task::spawn_blocking(move || write_side_file(&path, &state))
        .await
        .map_err(|e| io::Error::other(format!("the side-file writer task failed: {e}")))?
}

impl PartitionStateMachine {
    /// Opens the state machine of partition `pid` on `engine`, with its side file in `dir`
    /// (created if missing). Reports exactly what is durable: the applied id from the engine's
    /// partition value, the membership and snapshot meta from the side file.
    pub fn open(engine: Engine, pid: PartitionId, dir: &Path, options: SmOptions) -> io::Result<PartitionStateMachine> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        let applied = decode_applied(pid, &engine.partition_value(pid))?;
        let path = side_path(dir, pid);
        let file = read_side_file(&path)?;
        if file.membership.log_id().as_ref() > applied.as_ref() {
            return Err(invalid_data(format!(
                "partition {}: the side file's membership is beyond the durable applied id",
                pid.get()
            )));
        }
        if file.snapshot.as_ref().and_then(|s| s.last_log_id.as_ref()) > applied.as_ref() {
            return Err(invalid_data(format!(
                "partition {}: the side file's snapshot is beyond the durable applied id",
                pid.get()
            )));
        }
        let state = State {
            applied,
            membership: file.membership.clone(),
            snapshot: file.snapshot.clone(),
            durable_applied: applied,
            file,
            since_persist: 0,
        };
        let options = SmOptions { persist_every: options.persist_every.max(1), ..options };
        Ok(PartitionStateMachine {
            shared: Arc::new(Shared {
                engine,
                pid,
                side_path: path,
                source_id: NEXT_SOURCE_ID.fetch_add(1, Ordering::Relaxed),
                options,
                gate: Arc::new(InstallGate::new(applied.next_index())),
                state: Mutex::new(state),
            }),
        })
    }

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.shared.pid
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// Whether the partition may serve reads: no snapshot install is under way or was left
    /// incomplete, and the group has *caught up* past the last installed snapshot. Cheap (a
    /// few atomic loads; never takes the state machine's mutex).
    ///
    /// "Caught up" means: the applied id has reached the catch-up index of the last install,
    /// the source's applied index when the install's stream ended (at least the snapshot's
    /// `last_log_id`). The stream reads the source's live partition, so right after an install
    /// some records may hold versions newer than `last_log_id` and others not: a mix no single
    /// log position explains. Every version the stream read came from an entry at or below the
    /// catch-up index, so once openraft has applied the log that far (the monotonic apply
    /// skipping what the install already holds), each record holds its latest version as of
    /// the applied id. Without an install since open, only the first condition applies. The
    /// catch-up index lives in memory: a restart before the group gets there re-applies the log
    /// up to the durable committed id and then reports readable. A state machine is never
    /// opened with the "installing" mark ([`PartitionStateMachine::open`] refuses it).
    pub fn readable(&self) -> bool {
        self.shared.gate.readable()
    }

    /// The applied id in memory and the one last made durable.
    pub async fn applied_ids(&self) -> (Option<LogId>, Option<LogId>) {
        let st = self.shared.state.lock().await;
        (st.applied, st.durable_applied)
    }

    /// Makes the applied id (after a barrier) and the membership durable now.
    pub async fn persist(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock().await;
        self.persist_locked(&mut st).await
    }

    /// [`PartitionStateMachine::persist`] for many groups of one engine at once: one barrier and
    /// one metadata write for every applied id that moved (instead of one each), then the side
    /// files that changed. For a node's shutdown, after its groups stopped applying.
    pub async fn persist_all(machines: &[PartitionStateMachine]) -> io::Result<()> {
        let Some(first) = machines.first() else { return Ok(()) };
        let engine = first.shared.engine.clone();
        let mut states = Vec::with_capacity(machines.len());
        for m in machines {
            assert!(m.shared.engine.same_as(&engine), "persist_all takes the groups of one engine");
            states.push(m.shared.state.lock().await);
        }
        let mut values = Vec::new();
        for (m, st) in machines.iter().zip(&states) {
            if !m.shared.gate.is_installing() && st.durable_applied != st.applied {
                values.push((m.shared.pid, encode_applied(st.applied)));
            }
        }
        if !values.is_empty() {
            engine.set_partition_values(values).await.map_err(engine_err("persisting the applied ids"))?;
        }
        for (m, st) in machines.iter().zip(states.iter_mut()) {
            if !m.shared.gate.is_installing() {
                st.durable_applied = st.applied;
                m.persist_locked(st).await?; // the side file, if it changed
            }
        }
        Ok(())
    }

    /// The applied id first (the engine barriers before it), then the side file if it changed:
    /// the file never names anything beyond the durable applied id.
    ///
    /// Writes nothing while an install is incomplete: the "installing" mark must stay.
    async fn persist_locked(&self, st: &mut State) -> io::Result<()> {
        let s = &self.shared;
        if s.gate.is_installing() {
            return Ok(());
        }
        if st.durable_applied != st.applied {
            s.engine
                .set_partition_values(vec![(s.pid, encode_applied(st.applied))])
                .await
                .map_err(engine_err("persisting the applied id"))?;
            st.durable_applied = st.applied;
        }
        st.since_persist = 0;
        let want = SideState { membership: st.membership.clone(), snapshot: st.snapshot.clone() };
        if want != st.file {
            write_side_file_async(&s.side_path, &want).await?;
            st.file = want;
        }
        Ok(())
    }

    fn snapshot_of(&self, meta: SnapshotMeta) -> Snapshot {
        Snapshot {
            meta,
            snapshot: PartitionSnapshot {
                partition: self.shared.pid,
                source: SnapshotSource::Local {
                    engine: self.shared.engine.clone(),
                    gate: self.shared.gate.clone(),
                    id: self.shared.source_id,
                    batch_records: self.shared.options.snapshot_batch_records,
                },
                cancel: CancelToken::new(),
            },
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    type SnapshotData = PartitionSnapshot;

    /// Reports the current applied id and membership, made durable first (so openraft's purge,
    /// bounded by this snapshot, never passes the durable applied id).
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let mut st = self.shared.state.lock().await;
        if self.shared.gate.is_installing() {
            return Err(incomplete(self.shared.pid));
        }
        let meta = SnapshotMeta { last_log_id: st.applied, last_membership: st.membership.clone() };
        st.snapshot = Some(meta.clone());
        self.persist_locked(&mut st).await?;
        Ok(self.snapshot_of(meta))
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = PartitionSnapshot;
    type SnapshotBuilder = PartitionStateMachine;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let st = self.shared.state.lock().await;
        if self.shared.gate.is_installing() {
            return Err(incomplete(self.shared.pid));
        }
        Ok((st.applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut st = self.shared.state.lock().await;
        let gate = &self.shared.gate;
        if gate.is_installing() {
            return Err(incomplete(self.shared.pid));
        }
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(cmd) => {
                    let versions = cmd.to_versions()?;
                    gate.will_apply(entry.log_id.index);
                    let outcomes = self
                        .shared
                        .engine
                        .apply_versions_async(&versions, Durability::Buffered)
                        .await
                        .map_err(engine_err("applying a log entry"))?;
                    Response { outcomes: outcomes.into_iter().map(Outcome::from).collect() }
                }
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            st.applied = Some(entry.log_id);
            gate.applied(entry.log_id.index);
            st.since_persist += 1;
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if st.since_persist >= self.shared.options.persist_every {
            self.persist_locked(&mut st).await?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: PartitionSnapshot) -> io::Result<()> {
        let s = &self.shared;
        if snapshot.partition != s.pid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a snapshot of partition {} offered to partition {}", snapshot.partition.get(), s.pid.get()),
            ));
        }
        if snapshot.local_source_id() == Some(s.source_id) {
            // openraft offers the current snapshot back only when it is newer than the applied
            // id, which persist's ordering rules out; installing from oneself would wipe it.
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a partition cannot install its own snapshot"));
        }
        let mut st = s.state.lock().await;
        // From here until the install completes, the partition is not readable, streams of it
        // fail, and an error leaves it so (the mark stays; see the module doc).
        s.gate.begin_install();
        st.durable_applied = None; // the mark: nothing is durable until the install completes
        s.engine
            .set_partition_values(vec![(s.pid, vec![VALUE_INSTALLING])])
            .await
            .map_err(engine_err("marking a snapshot install"))?;
        s.engine.truncate_partition(s.pid).await.map_err(engine_err("truncating the partition"))?;
        // One batch in memory at a time: applied, then dropped before the next is read.
        let mut stream = snapshot.stream(s.options.snapshot_mb_per_s);
        while let Some(batch) = stream.next_batch().await.map_err(|e| {
            io::Error::new(e.kind(), format!("installing a snapshot into partition {}: {e}", s.pid.get()))
        })? {
            s.engine
                .apply_versions_async(&batch, Durability::Buffered)
                .await
                .map_err(engine_err("applying a snapshot batch"))?;
        }
        let applied_next = meta.last_log_id.next_index();
        let catch_up_next = stream.end_covers_next().unwrap_or(0).max(applied_next);
        let stats = stream.stats();
        st.applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        st.snapshot = Some(meta.clone());
        // Side file first (its membership is the snapshot's, not in the local log), then the
        // applied id, which replaces the install mark after the barrier.
        let want = SideState { membership: st.membership.clone(), snapshot: st.snapshot.clone() };
        write_side_file_async(&s.side_path, &want).await?;
        st.file = want;
        s.engine
            .set_partition_values(vec![(s.pid, encode_applied(st.applied))])
            .await
            .map_err(engine_err("persisting the installed applied id"))?;
        st.durable_applied = st.applied;
        st.since_persist = 0;
        s.gate.end_install(applied_next, catch_up_next);
        tracing::info!(
            partition = s.pid.get(),
            batches = stats.batches,
            versions = stats.versions,
            bytes = stats.bytes,
            applied_next,
            catch_up_next,
            "installed a partition snapshot"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let st = self.shared.state.lock().await;
        if self.shared.gate.is_installing() {
            return Err(incomplete(self.shared.pid));
        }
        Ok(st.snapshot.clone().map(|meta| self.snapshot_of(meta)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn applied_ids_fit_the_partition_value_and_round_trip() {
        let pid = PartitionId::new(7).unwrap();
        for id in [None, Some(LogId::new_term_index(0, 0)), Some(LogId::new_term_index(u64::MAX, u64::MAX - 1))] {
            let v = encode_applied(id);
            assert!(v.len() <= 27);
            assert_eq!(decode_applied(pid, &v).unwrap(), id);
        }
        assert!(decode_applied(pid, &[VALUE_INSTALLING]).is_err());
        assert!(decode_applied(pid, &[VALUE_APPLIED, 1, 2]).is_err());
    }

    /// docs/FORMAT.md ("Partition group applied id", "Partition group side file") states what
    /// the code writes.
    #[test]
    fn the_format_doc_matches_the_applied_id_and_side_file() {
        let doc = include_str!("../../docs/FORMAT.md");
        let section = |title: &str| -> Vec<(usize, usize, String)> {
            let start = doc.find(&format!("## {title}\n")).unwrap_or_else(|| panic!("no section {title}"));
            let rest = &doc[start + title.len() + 4..];
            let body = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
            body.lines()
                .filter_map(|l| {
                    let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                    let offset = cells.get(1)?.parse().ok()?;
                    let size = cells.get(2)?.parse().unwrap_or(0);
                    Some((offset, size, cells.get(3)?.trim_matches('`').to_owned()))
                })
                .collect()
        };
        let applied = section("Partition group applied id");
        assert_eq!(applied, vec![(0, 1, "kind".to_owned()), (1, 8, "term".to_owned()), (9, 8, "index".to_owned())]);
        let v = encode_applied(Some(LogId::new_term_index(0x0102, 0x0304)));
        assert_eq!(v.len(), 17);
        assert_eq!(v[0], VALUE_APPLIED);
        assert_eq!(v[0], 1);
        assert_eq!(VALUE_INSTALLING, 2);
        assert_eq!(&v[1..9], &0x0102u64.to_le_bytes());
        assert_eq!(&v[9..17], &0x0304u64.to_le_bytes());
        let side = section("Partition group side file");
        assert_eq!(side[..2], [(0, 4, "magic".to_owned()), (4, 8, "checksum".to_owned())]);
        assert_eq!(side[2].0, 12);
        assert!(doc.contains(&format!("0x{SIDE_FILE_MAGIC:08x}")));
        assert_eq!(side_path(Path::new("/d"), PartitionId::new(7).unwrap()), Path::new("/d/membership-7.bin"));
    }

    #[test]
    fn the_side_file_round_trips_and_detects_damage() {
        let dir = tempfile::Builder::new().prefix("peregrine-sm-").tempdir_in("/var/tmp").unwrap();
        let path = side_path(dir.path(), PartitionId::new(3).unwrap());
        assert_eq!(read_side_file(&path).unwrap(), SideState::default());
        let m = openraft::Membership::new_with_defaults(vec![[1u64, 2, 3].into_iter().collect()], []);
        let state = SideState {
            membership: StoredMembership::new(Some(LogId::new_term_index(2, 5)), m.clone()),
            snapshot: Some(SnapshotMeta {
                last_log_id: Some(LogId::new_term_index(2, 9)),
                last_membership: StoredMembership::new(Some(LogId::new_term_index(2, 5)), m),
            }),
        };
        write_side_file(&path, &state).unwrap();
        assert_eq!(read_side_file(&path).unwrap(), state);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_side_file(&path).is_err());
    }
}
