//! One client connection: frames are read and answered strictly in order (so pipelined requests
//! are safe). The header must start within `idle_timeout_ms` and the whole frame must arrive
//! within `frame_timeout_ms`; the body buffer grows only as bytes arrive, under a node-wide
//! budget of buffered request bytes, so half-sent frames cannot exhaust memory. Malformed
//! framing closes the connection; a malformed message inside a good frame gets error 4.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use peregrine_proto::consts::{PROTO_HEADER_BYTES, field, msg_type, result};
use peregrine_proto::{DecodeError, Message, ProtoHeader, compress, decode_message, info};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::batch::execute_batch;
use crate::frames::FrameWriter;
use crate::metrics::Kind;
use crate::node::Node;
use crate::record::{RecordCommand, RecordReply, execute, is_delete, is_write};
use crate::scan::execute_scan;

/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// The body is read (and the byte budget taken) in pieces of this size.
const BODY_READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// The client closed it.
    Eof,
    /// Idle or frame deadline.
    Timeout(&'static str),
    /// Bad framing.
    Protocol(DecodeError),
    /// Socket error.
    Io(std::io::Error),
    /// Security messages are not supported.
    Admin,
    /// The node is shutting down.
    Shutdown,
}

impl From<std::io::Error> for Close {
    fn from(e: std::io::Error) -> Close {
        if e.kind() == std::io::ErrorKind::UnexpectedEof { Close::Eof } else { Close::Io(e) }
    }
}

/// Serves one connection until it closes.
pub async fn serve(
    node: Arc<Node>,
    stream: TcpStream,
    peer: SocketAddr,
    budget: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    // Buffered, so one read system call usually brings in a whole request.
    let rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let end = serve_frames(&node, rd, FrameWriter::new(wr), &budget, shutdown).await;
    let m = &node.metrics;
    match end {
        Close::Eof | Close::Shutdown => {}
        Close::Timeout(what) => {
            m.timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, what, "connection closed: deadline passed");
        }
        Close::Protocol(e) => {
            m.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "connection closed: bad frame");
        }
        Close::Io(e) => tracing::debug!(%peer, error = %e, "connection closed by a socket error"),
        Close::Admin => {
            m.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "connection closed: security (admin) messages are not supported; connect without a user and password");
        }
    }
}

async fn serve_frames<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    node: &Node,
    mut rd: R,
    mut out: FrameWriter<W>,
    budget: &Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) -> Close {
    let cfg = &node.config;
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let frame_time = Duration::from_millis(cfg.frame_timeout_ms);
    loop {
        if *shutdown.borrow() {
            return Close::Shutdown;
        }
        let mut header = [0u8; PROTO_HEADER_BYTES];
        let first = tokio::select! {
            r = tokio::time::timeout(idle, rd.read(&mut header[..1])) => r,
            _ = shutdown.changed() => return Close::Shutdown,
        };
        match first {
            Err(_) => return Close::Timeout("idle"),
            Ok(Ok(0)) => return Close::Eof,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return e.into(),
        }
        let deadline = tokio::time::Instant::now() + frame_time;
        match tokio::time::timeout_at(deadline, rd.read_exact(&mut header[1..])).await {
            Err(_) => return Close::Timeout("frame header"),
            Ok(Err(e)) => return e.into(),
            Ok(Ok(_)) => {}
        }
        let h = match ProtoHeader::decode(header, cfg.max_frame_bytes) {
            Ok(h) => h,
            Err(e) => return Close::Protocol(e),
        };
        let (body, _permit) = match read_body(&mut rd, h.size as usize, budget, deadline).await {
            Ok(b) => b,
            Err(close) => return close,
        };
        if let Err(close) = handle_frame(node, h.msg_type, &body, &mut out).await {
            return close;
        }
    }
}

async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    size: usize,
    budget: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), Close> {
    let mut body = Vec::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    while body.len() < size {
        let chunk = (size - body.len()).min(BODY_READ_CHUNK_BYTES);
        let p = match tokio::time::timeout_at(deadline, budget.clone().acquire_many_owned(chunk as u32)).await {
            Err(_) => return Err(Close::Timeout("request memory budget")),
            Ok(Err(_)) => return Err(Close::Shutdown),
            Ok(Ok(p)) => p,
        };
        match &mut permit {
            Some(held) => held.merge(p),
            None => permit = Some(p),
        }
        body.reserve_exact(chunk);
        let got = match tokio::time::timeout_at(deadline, (&mut *rd).take(chunk as u64).read_to_end(&mut body)).await {
            Err(_) => return Err(Close::Timeout("frame body")),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(n)) => n,
        };
        if got < chunk {
            return Err(Close::Eof);
        }
    }
    Ok((body, permit))
}

async fn handle_frame<W: AsyncWrite + Unpin>(
    node: &Node,
    t: u8,
    body: &[u8],
    out: &mut FrameWriter<W>,
) -> Result<(), Close> {
    let started = Instant::now();
    match t {
        msg_type::INFO => {
            let commands = info::parse_request(body);
            node.info(&commands, out.message(msg_type::INFO));
            out.flush().await?;
            node.metrics.record(Kind::Info, result::OK, started.elapsed());
        }
        msg_type::MESSAGE => handle_message(node, body, out).await?,
        msg_type::COMPRESSED => {
            let inner = compress::inflate(body, node.config.max_frame_bytes).map_err(Close::Protocol)?;
            let header: [u8; PROTO_HEADER_BYTES] = inner
                .get(..PROTO_HEADER_BYTES)
                .and_then(|h| h.try_into().ok())
                .ok_or(Close::Protocol(DecodeError::Truncated("compressed frame")))?;
            let h = ProtoHeader::decode(header, node.config.max_frame_bytes).map_err(Close::Protocol)?;
            if h.msg_type != msg_type::MESSAGE || h.size as usize != inner.len() - PROTO_HEADER_BYTES {
                return Err(Close::Protocol(DecodeError::Malformed(
                    "compressed frame does not hold one message frame",
                )));
            }
            handle_message(node, &inner[PROTO_HEADER_BYTES..], out).await?;
        }
        _ => return Err(Close::Admin),
    }
    Ok(())
}

async fn handle_message<W: AsyncWrite + Unpin>(
    node: &Node,
    body: &[u8],
    out: &mut FrameWriter<W>,
) -> std::io::Result<()> {
    let started = Instant::now();
    let msg = match decode_message(body) {
        Ok((m, _)) => m,
        Err(e) => {
            tracing::debug!(error = %e, "malformed message");
            out.record(msg_type::MESSAGE, &RecordReply { result_code: result::PARAMETER, ..RecordReply::default() }, 0);
            out.flush().await?;
            node.metrics.record(Kind::Read, result::PARAMETER, started.elapsed());
            return Ok(());
        }
    };
    if msg.header.info1 & peregrine_proto::consts::info1::BATCH != 0 {
        let code = execute_batch(node, &msg, out).await?;
        out.flush().await?;
        node.metrics.record(Kind::Batch, code, started.elapsed());
    } else if !msg.has_field(field::DIGEST) {
        let code = execute_scan(node, &msg, out).await?;
        out.flush().await?;
        node.metrics.record(Kind::Scan, code, started.elapsed());
    } else {
        let (kind, reply) = match single(&msg) {
            Ok(cmd) => {
                let kind = if is_delete(&cmd) {
                    Kind::Delete
                } else if is_write(&cmd) {
                    Kind::Write
                } else {
                    Kind::Read
                };
                (kind, execute(node, &cmd).await)
            }
            Err(code) => (Kind::Read, RecordReply { result_code: code, ..RecordReply::default() }),
        };
        out.record(msg_type::MESSAGE, &reply, 0);
        out.flush().await?;
        node.metrics.record(kind, reply.result_code, started.elapsed());
    }
    Ok(())
}

pub(crate) fn single<'a>(msg: &'a Message<'a>) -> Result<RecordCommand<'a>, u8> {
    let digest = msg.digest().map_err(|_| result::PARAMETER)?.ok_or(result::PARAMETER)?;
    let unsupported = msg
        .fields
        .iter()
        .any(|f| matches!(f.field_type, field::FILTER_EXPRESSION | field::TXN_ID | field::UDF_PACKAGE | field::UDF_OP));
    Ok(RecordCommand {
        info1: msg.header.info1,
        info2: msg.header.info2,
        info3: msg.header.info3,
        generation: msg.header.generation,
        record_ttl: msg.header.record_ttl,
        namespace: msg.field(field::NAMESPACE).unwrap_or(b""),
        set: msg.field(field::SET).unwrap_or(b""),
        key: msg.field(field::KEY),
        digest,
        ops: &msg.ops,
        unsupported,
        timeout_ms: msg.header.transaction_ttl,
    })
}
