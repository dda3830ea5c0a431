//! One fabric connection to a peer, once its hello is done: a writer task that packs queued
//! frames into one write per flush, always taking the *urgent* queue (votes, heartbeats,
//! replies, control) before the *bulk* queue (appends with entries, proxied requests), so small
//! latency-critical messages wait behind at most one flush of bulk bytes; and a reader task
//! that hands each incoming frame to the fabric. Requests in flight wait on a oneshot keyed by
//! request id; when the connection ends, every one of them fails at once.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::wire::{FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES, FrameHeader, Reply, WireError};
use crate::snapshot_transfer::CancelToken;

/// Bytes packed into one write before the writer checks the urgent queue again.
const FLUSH_BYTES: usize = 256 << 10;
/// Bulk frames queued per connection before senders wait (back-pressure on appends).
const BULK_QUEUE_FRAMES: usize = 1024;
/// A connection with nothing to send for this long sends a keepalive frame, so the peer's
/// idle timeout (`fabric::LINK_IDLE_TIMEOUT`) only fires when the connection is dead.
const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A frame body is read in pieces of this size, so a length the bytes never bring costs at
/// most one piece of memory.
const BODY_READ_CHUNK_BYTES: usize = 1 << 20;

/// Which queue a frame takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Votes, heartbeats, replies, control.
    Urgent,
    /// Appends with entries, proxied requests.
    Bulk,
}

/// A live connection to one peer.
#[derive(Debug)]
pub struct Link {
    /// The peer's node id.
    pub peer: u64,
    /// Distinguishes this connection from earlier ones to the same peer.
    pub serial: u64,
    urgent: mpsc::UnboundedSender<Vec<u8>>,
    bulk: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    closed: CancelToken,
}

impl Link {
    /// Starts the writer over `wr`; returns the link and the writer task. The caller runs the
    /// reader ([`read_frame`] in a loop) and calls [`Link::close`] when it ends.
    pub fn start<W: AsyncWrite + Unpin + Send + 'static>(peer: u64, serial: u64, wr: W) -> Arc<Link> {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::channel(BULK_QUEUE_FRAMES);
        let link = Arc::new(Link {
            peer,
            serial,
            urgent,
            bulk,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: CancelToken::new(),
        });
        let closed = link.closed.clone();
        let l = link.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(wr, urgent_rx, bulk_rx, &closed).await {
                tracing::debug!(peer, "fabric writer stopped: {e}");
            }
            l.close();
        });
        link
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Ends the connection: the writer stops, every request in flight fails.
    pub fn close(&self) {
        self.closed.cancel();
        self.lock_pending().clear();
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Reply>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh request id and the receiver of its reply.
    pub fn register(&self) -> (u64, oneshot::Receiver<Reply>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if !self.is_closed() {
            self.lock_pending().insert(id, tx);
        }
        (id, rx)
    }

    /// Forgets a request whose caller gave up.
    pub fn forget(&self, id: u64) {
        self.lock_pending().remove(&id);
    }

    /// Completes the request `id` (a reply arrived); an unknown id (its caller gave up) is
    /// dropped.
    pub fn complete(&self, id: u64, reply: Reply) {
        if let Some(tx) = self.lock_pending().remove(&id) {
            let _ = tx.send(reply);
        }
    }

    /// Queues an encoded frame.
    pub async fn send(&self, frame: Vec<u8>, priority: Priority) -> io::Result<()> {
        let gone = || io::Error::new(io::ErrorKind::NotConnected, format!("connection to node {} closed", self.peer));
        if self.is_closed() {
            return Err(gone());
        }
        match priority {
            Priority::Urgent => self.urgent.send(frame).map_err(|_| gone()),
            Priority::Bulk => self.bulk.send(frame).await.map_err(|_| gone()),
        }
    }

    /// Queues an urgent frame without waiting (control messages, replies from sync code).
    pub fn send_urgent_now(&self, frame: Vec<u8>) -> bool {
        !self.is_closed() && self.urgent.send(frame).is_ok()
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut urgent: mpsc::UnboundedReceiver<Vec<u8>>,
    mut bulk: mpsc::Receiver<Vec<u8>>,
    closed: &CancelToken,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_BYTES);
    let keepalive =
        super::wire::frame(super::wire::kind::KEEPALIVE, 0, &()).map_err(|e| io::Error::other(e.to_string()))?;
    loop {
        let first = tokio::select! {
            biased;
            () = closed.cancelled() => return Ok(()),
            f = urgent.recv() => f,
            f = bulk.recv() => f,
            () = tokio::time::sleep(KEEPALIVE_EVERY) => Some(keepalive.clone()),
        };
        let Some(first) = first else { return Ok(()) };
        buf.clear();
        buf.extend_from_slice(&first);
        loop {
            while let Ok(f) = urgent.try_recv() {
                buf.extend_from_slice(&f);
            }
            if buf.len() >= FLUSH_BYTES {
                break;
            }
            match bulk.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        wr.write_all(&buf).await?;
        if buf.capacity() > 4 * FLUSH_BYTES {
            buf = Vec::with_capacity(FLUSH_BYTES); // one huge frame passed: give its memory back
        }
    }
}

/// Why reading a frame failed.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed or closed mid-frame.
    Io(io::Error),
    /// The bytes are not a frame.
    Wire(WireError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Wire(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream (between frames). The body buffer
/// grows only as its bytes arrive.
pub async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<(FrameHeader, Vec<u8>)>, ReadError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match rd.read(&mut header[..1]).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(ReadError::Io(e)),
    }
    rd.read_exact(&mut header[1..]).await.map_err(ReadError::Io)?;
    let h = FrameHeader::decode(header).map_err(ReadError::Wire)?;
    let size = h.body_len as usize;
    debug_assert!(size <= FRAME_BODY_BYTES_MAX);
    let mut body = Vec::with_capacity(size.min(BODY_READ_CHUNK_BYTES));
    while body.len() < size {
        let chunk = (size - body.len()).min(BODY_READ_CHUNK_BYTES);
        let got = (&mut *rd).take(chunk as u64).read_to_end(&mut body).await.map_err(ReadError::Io)?;
        if got < chunk {
            return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-frame")));
        }
    }
    Ok(Some((h, body)))
}
