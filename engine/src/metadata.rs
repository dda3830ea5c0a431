//! The namespace metadata kept in the devices' metadata region (see `format::metadata`): the
//! in-memory copy that writes and reads consult (partition epochs, truncation cutoffs) and the
//! writer thread that makes updates durable. Updates queue to that one thread, which applies
//! every queued update to a copy, writes the copy to the alternate slot of every device,
//! syncs them, and only then publishes it and completes the callers: one device write covers
//! every update that arrived meanwhile, and no update is reported durable before it is.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use peregrine_index::{PartitionId, SET_ID_MAX};

use crate::completion::{Completer, Completion, completion};
use crate::error::{Error, Result};
use crate::format::metadata::{self as layout, MetadataImage};
use crate::io::{AlignedBuf, DeviceIo, SharedBuf, WriteSource, wait_io};

/// One device the metadata is written to.
#[derive(Debug, Clone)]
pub(crate) struct MetadataTarget {
    pub(crate) label: String,
    pub(crate) io: Arc<dyn DeviceIo>,
}

type Mutation = Box<dyn FnOnce(&mut MetadataImage) -> Result<()> + Send>;

struct Request {
    mutate: Mutation,
    done: Completer<Result<()>>,
}

struct State {
    /// The durable image (what the newest slot holds).
    image: MetadataImage,
    /// Set truncation cutoffs in force in memory (raised before they are durable).
    set_cutoffs: std::collections::HashMap<Vec<u8>, u64>,
}

/// The namespace's metadata.
pub(crate) struct Metadata {
    epochs: Box<[AtomicU32]>,
    namespace_cutoff_ms: AtomicU64,
    /// Truncation cutoff by set id (0 = none), kept in step with the image's set names.
    set_cutoff_by_id: Box<[AtomicU64]>,
    /// Whether any set has a truncation cutoff (lets writes skip the set lookup).
    any_set_cutoff: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    requests: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metadata")
    }
}

impl Metadata {
    /// Starts the writer thread over `targets`, from the durable `image`.
    pub(crate) fn start(image: MetadataImage, targets: Vec<MetadataTarget>, label: &str) -> Result<Arc<Metadata>> {
        let epochs = image.partitions.iter().map(|p| AtomicU32::new(p.epoch)).collect();
        let meta = Arc::new(Metadata {
            epochs,
            namespace_cutoff_ms: AtomicU64::new(image.namespace_cutoff_ms),
            set_cutoff_by_id: (0..=SET_ID_MAX).map(|_| AtomicU64::new(0)).collect(),
            any_set_cutoff: std::sync::atomic::AtomicBool::new(!image.sets.is_empty()),
            state: Mutex::new(State { set_cutoffs: image.sets.iter().cloned().collect(), image }),
            requests: Mutex::new(None),
            thread: Mutex::new(None),
        });
        let (tx, rx) = unbounded();
        let worker = Arc::downgrade(&meta);
        let handle = std::thread::Builder::new()
            .name(format!("metadata {label}"))
            .spawn(move || run(&worker, &rx, &targets))
            .map_err(|e| Error::io("starting the metadata thread", e))?;
        *meta.requests.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        *meta.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(meta)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Partition `pid`'s current truncation epoch.
    pub(crate) fn epoch(&self, pid: PartitionId) -> u32 {
        self.epochs[pid.index()].load(Ordering::SeqCst)
    }

    /// Starts a new epoch for `pid` (the caller holds the partition's write lock); returns it.
    pub(crate) fn bump_epoch(&self, pid: PartitionId) -> Result<u32> {
        let e = &self.epochs[pid.index()];
        let now = e.load(Ordering::SeqCst);
        let next = now.checked_add(1).ok_or_else(|| {
            Error::Parameter(format!("partition {} has been truncated 2^32 times; no epoch is left", pid.get()))
        })?;
        e.store(next, Ordering::SeqCst);
        Ok(next)
    }

    /// Undoes [`Metadata::bump_epoch`] after its metadata write failed (the caller holds the
    /// partition's write lock; nothing else moved the epoch meanwhile if it still reads
    /// above the durable one by one).
    pub(crate) fn unbump_epoch(&self, pid: PartitionId) {
        let durable = self.lock().image.partitions[pid.index()].epoch;
        let _ = self.epochs[pid.index()].compare_exchange(durable + 1, durable, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The truncation cutoff that applies to records of set `set_id` (namespace or set, the
    /// later): records last updated at or before it are dead.
    pub(crate) fn cutoff_ms(&self, set_id: u16) -> u64 {
        let ns = self.namespace_cutoff_ms.load(Ordering::SeqCst);
        let set = self.set_cutoff_by_id.get(usize::from(set_id)).map_or(0, |c| c.load(Ordering::SeqCst));
        ns.max(set)
    }

    /// Whether any set carries a truncation cutoff.
    pub(crate) fn any_set_cutoff(&self) -> bool {
        self.any_set_cutoff.load(Ordering::Relaxed)
    }

    /// The namespace's truncation cutoff (0 = none).
    pub(crate) fn namespace_cutoff_ms(&self) -> u64 {
        self.namespace_cutoff_ms.load(Ordering::SeqCst)
    }

    /// Raises the in-memory cutoff of the namespace (`set` = None) or of a set (whose id is
    /// `set_id` if it has one). Durable only once [`Metadata::persist`] completes; if that
    /// fails, [`Metadata::restore_cutoff`] puts back the returned previous value.
    pub(crate) fn raise_cutoff(&self, set: Option<(&[u8], Option<u16>)>, cutoff_ms: u64) -> u64 {
        let mut st = self.lock(); // ordered against `note_set_id`
        match set {
            None => self.namespace_cutoff_ms.fetch_max(cutoff_ms, Ordering::SeqCst),
            Some((name, id)) => {
                self.any_set_cutoff.store(true, Ordering::SeqCst);
                let c = st.set_cutoffs.entry(name.to_vec()).or_insert(0);
                let before = *c;
                *c = before.max(cutoff_ms);
                if let Some(c) = id.and_then(|id| self.set_cutoff_by_id.get(usize::from(id))) {
                    c.fetch_max(cutoff_ms, Ordering::SeqCst);
                }
                before
            }
        }
    }

    /// Undoes a [`Metadata::raise_cutoff`] whose metadata write failed: the truncation did not
    /// happen, so the records it hid read again (as they would after a restart).
    pub(crate) fn restore_cutoff(&self, set: Option<(&[u8], Option<u16>)>, raised_to: u64, before: u64) {
        let mut st = self.lock();
        let durable = match set {
            None => st.image.namespace_cutoff_ms,
            Some((name, _)) => st.image.set_cutoff(name),
        };
        let back = before.max(durable);
        match set {
            None => {
                let _ = self.namespace_cutoff_ms.compare_exchange(raised_to, back, Ordering::SeqCst, Ordering::SeqCst);
            }
            Some((name, id)) => {
                if let Some(c) = st.set_cutoffs.get_mut(name)
                    && *c == raised_to
                {
                    *c = back;
                    if let Some(a) = id.and_then(|id| self.set_cutoff_by_id.get(usize::from(id))) {
                        let _ = a.compare_exchange(raised_to, back, Ordering::SeqCst, Ordering::SeqCst);
                    }
                }
            }
        }
    }

    /// A set name got id `set_id`: load its truncation cutoff (names are what the device keeps).
    pub(crate) fn note_set_id(&self, set_id: u16, name: &[u8]) {
        let st = self.lock();
        let cutoff = st.set_cutoffs.get(name).copied().unwrap_or(0);
        if let Some(c) = self.set_cutoff_by_id.get(usize::from(set_id)) {
            c.store(cutoff, Ordering::SeqCst);
        }
    }

    /// Partition `pid`'s opaque value, as last made durable.
    pub(crate) fn partition_value(&self, pid: PartitionId) -> Vec<u8> {
        self.lock().image.partitions[pid.index()].value.clone()
    }

    /// Queues `mutate` for the next metadata write; the completion settles once a slot holding
    /// it is durable on every device.
    pub(crate) fn persist(
        &self,
        mutate: impl FnOnce(&mut MetadataImage) -> Result<()> + Send + 'static,
    ) -> Completion<Result<()>> {
        let (done, c) = completion();
        let req = Request { mutate: Box::new(mutate), done };
        match &*self.requests.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(tx) => {
                if let Err(crossbeam_channel::SendError(req)) = tx.send(req) {
                    req.done.complete(Err(Error::Shutdown));
                }
            }
            None => req.done.complete(Err(Error::Shutdown)),
        }
        c
    }

    /// Writes the current epochs and cutoffs (with no other change).
    pub(crate) fn persist_epochs(self: &Arc<Self>) -> Completion<Result<()>> {
        let me = self.clone();
        self.persist(move |img| {
            for (p, slot) in img.partitions.iter_mut().enumerate() {
                slot.epoch = slot.epoch.max(me.epochs[p].load(Ordering::SeqCst));
            }
            img.namespace_cutoff_ms = img.namespace_cutoff_ms.max(me.namespace_cutoff_ms.load(Ordering::SeqCst));
            Ok(())
        })
    }

    /// Stops the writer thread after the queued updates.
    pub(crate) fn stop(&self) {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(h) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take()
            && h.thread().id() != std::thread::current().id()
            && h.join().is_err()
        {
            tracing::error!("the metadata thread panicked");
        }
    }
}

/// Reads the newest valid metadata slot over every device, or `None` when no device has one.
pub(crate) fn read_newest(targets: &[MetadataTarget], device_set_id: u64) -> Result<Option<MetadataImage>> {
    let mut best: Option<MetadataImage> = None;
    for t in targets {
        for slot in 0..layout::SLOT_COUNT {
            let buf = wait_io(t.io.read(
                layout::slot_offset(slot),
                AlignedBuf::zeroed(layout::SLOT_BYTES),
                layout::SLOT_BYTES,
            ))
            .map_err(|e| Error::io(format!("reading metadata slot {slot} of {}", t.label), e))?;
            if let Some(img) = MetadataImage::decode(buf.as_slice())
                && img.device_set_id == device_set_id
                && best.as_ref().is_none_or(|b| img.generation > b.generation)
            {
                best = Some(img);
            }
        }
    }
    Ok(best)
}

/// Writes `image` to its slot (by generation parity) on every target and syncs them.
pub(crate) fn write_image(targets: &[MetadataTarget], image: &MetadataImage) -> Result<()> {
    let bytes = image.encode();
    let mut buf = AlignedBuf::zeroed(layout::SLOT_BYTES);
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
    let buf = Arc::new(SharedBuf::new(buf));
    let slot = (image.generation % layout::SLOT_COUNT as u64) as usize;
    let writes: Vec<_> = targets
        .iter()
        .map(|t| {
            t.io.write(layout::slot_offset(slot), WriteSource { buf: buf.clone(), start: 0, len: layout::SLOT_BYTES })
        })
        .collect();
    for (t, w) in targets.iter().zip(writes) {
        wait_io(w).map_err(|e| Error::io(format!("writing metadata slot {slot} of {}", t.label), e))?;
    }
    for t in targets {
        wait_io(t.io.sync()).map_err(|e| Error::io(format!("syncing the metadata of {}", t.label), e))?;
    }
    Ok(())
}

fn run(meta: &std::sync::Weak<Metadata>, rx: &Receiver<Request>, targets: &[MetadataTarget]) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let Some(meta) = meta.upgrade() else {
            for r in batch {
                r.done.complete(Err(Error::Shutdown));
            }
            return;
        };
        let mut next = meta.lock().image.clone();
        next.generation += 1;
        let mut accepted = Vec::new();
        for r in batch {
            let mut trial = next.clone();
            match (r.mutate)(&mut trial) {
                Ok(()) => {
                    next = trial;
                    accepted.push(r.done);
                }
                Err(e) => r.done.complete(Err(e)),
            }
        }
        if accepted.is_empty() {
            continue;
        }
        match write_image(targets, &next) {
            Ok(()) => {
                meta.lock().image = next;
                for d in accepted {
                    d.complete(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "metadata write failed");
                let msg = e.to_string();
                for d in accepted {
                    d.complete(Err(Error::Failed { device: "metadata region".into(), reason: msg.clone() }));
                }
            }
        }
    }
}
