//! Single-record commands (plain requests and batch rows): reads with bin selection, writes as
//! an ordered list of ops with Aerospike's policies, deletes, touches. A write is one engine
//! read-modify-write: the op list runs inside it, so a concurrent change re-runs the whole list.

use peregrine_engine::{
    Applied, Bin, BinName, BinSelection, Change, Digest, Engine, Error, Record, StoredKey, Ttl, Value,
};
use peregrine_proto::Op;
use peregrine_proto::consts::{
    TTL_CLIENT_DEFAULT, TTL_DONT_UPDATE, TTL_NEVER_EXPIRE, info1, info2, info3, op, particle, result,
};

use peregrine_replication::group::{Group, WriteError};

use crate::node::Node;
use crate::values::{from_wire, result_code, to_wire};

/// Where a write goes: the engine directly (a node alone), or a partition group's leader
/// write path (a cluster: decided here, replicated through the log, applied everywhere).
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A stand-alone namespace.
    Engine(&'a Engine),
    /// The group of the record's partition, led by this node.
    Group(&'a Group),
}

/// Why a write failed.
#[derive(Debug)]
pub enum Failure {
    /// Refused with an engine error (policies, sizes, devices): answered with its code.
    Engine(Error),
    /// The replicated write path could not take it here (not leader, not ready, in doubt).
    Replicated(WriteError),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Engine(e)
    }
}

impl Target<'_> {
    fn engine(&self) -> &Engine {
        match self {
            Target::Engine(e) => e,
            Target::Group(g) => g.engine(),
        }
    }

    async fn modify<F>(&self, digest: &Digest, read_existing: bool, decide: F) -> Result<Applied, Failure>
    where
        F: FnMut(Option<peregrine_engine::Existing<'_>>) -> peregrine_engine::Result<Change>,
    {
        match self {
            Target::Engine(e) => e.modify_async(digest, read_existing, decide).await.map_err(Failure::Engine),
            Target::Group(g) => g.write(digest, read_existing, decide).await.map_err(|e| match e {
                WriteError::Refused(e) => Failure::Engine(e),
                other => Failure::Replicated(other),
            }),
        }
    }
}

/// A single-record command, from a request or a batch row.
#[derive(Debug, Clone, Copy)]
pub struct RecordCommand<'a> {
    /// info1 bits.
    pub info1: u8,
    /// info2 bits.
    pub info2: u8,
    /// info3 bits.
    pub info3: u8,
    /// Expected generation.
    pub generation: u32,
    /// TTL (writes).
    pub record_ttl: u32,
    /// Namespace name.
    pub namespace: &'a [u8],
    /// Set name (empty = none).
    pub set: &'a [u8],
    /// User key field (particle type + bytes) when sent.
    pub key: Option<&'a [u8]>,
    /// Record digest.
    pub digest: [u8; 20],
    /// Ops in request order.
    pub ops: &'a [Op<'a>],
    /// The request used something this server does not implement (expressions, transactions).
    pub unsupported: bool,
    /// The client's total timeout for the command, ms (0: none given).
    pub timeout_ms: u32,
}

/// A single-record reply.
#[derive(Debug, Clone, Default)]
pub struct RecordReply {
    /// Result code.
    pub result_code: u8,
    /// Generation.
    pub generation: u32,
    /// Void time.
    pub void_time: u32,
    /// Number of ops in `ops`.
    pub n_ops: u16,
    /// Encoded reply ops.
    pub ops: Vec<u8>,
}

impl RecordReply {
    fn code(result_code: u8) -> RecordReply {
        RecordReply { result_code, ..RecordReply::default() }
    }

    fn push_bin(&mut self, op_type: u8, name: &[u8], value: Option<&Value>) {
        // The op header needs the value's length: write it, then the value in place.
        let value_len = value.map_or(0, Value::encoded_len);
        self.ops.extend_from_slice(&((4 + name.len() + value_len) as u32).to_be_bytes());
        let pt = value.map_or(particle::NULL, Value::particle_type);
        self.ops.extend_from_slice(&[op_type, pt, 0, name.len() as u8]);
        self.ops.extend_from_slice(name);
        if let Some(v) = value {
            to_wire(v, &mut self.ops);
        }
        self.n_ops += 1;
    }
}

/// What kind of command this is, for metrics.
pub fn is_write(cmd: &RecordCommand<'_>) -> bool {
    cmd.info2 & info2::WRITE != 0
}

/// Whether it is a delete.
pub fn is_delete(cmd: &RecordCommand<'_>) -> bool {
    is_write(cmd) && cmd.info2 & info2::DELETE != 0
}

/// Runs one command (routed through the cluster when there is one).
pub async fn execute(node: &Node, cmd: &RecordCommand<'_>) -> RecordReply {
    if node.cluster.is_some() {
        return crate::route::execute(node, cmd, 0).await;
    }
    let Some(engine) = std::str::from_utf8(cmd.namespace).ok().and_then(|n| node.namespaces.get(n)) else {
        return RecordReply::code(result::NAMESPACE_NOT_FOUND);
    };
    if cmd.unsupported {
        return RecordReply::code(result::UNSUPPORTED_FEATURE);
    }
    let outcome = if is_write(cmd) {
        execute_write(Target::Engine(engine), cmd).await
    } else {
        read(engine, cmd).await.map_err(Failure::Engine)
    };
    match outcome {
        Ok(reply) => reply,
        Err(Failure::Engine(e)) => RecordReply::code(result_code(&e)),
        Err(Failure::Replicated(e)) => {
            // A stand-alone engine has no replicated path; kept total all the same.
            tracing::error!("a stand-alone write failed on the replicated path: {e}");
            RecordReply::code(result::SERVER_ERROR)
        }
    }
}

/// Runs a write or delete on `target`.
pub async fn execute_write(target: Target<'_>, cmd: &RecordCommand<'_>) -> Result<RecordReply, Failure> {
    let digest = Digest(cmd.digest);
    if is_delete(cmd) { delete(target, &digest, cmd).await } else { write(target, &digest, cmd).await }
}

/// A reply carrying only a result code.
pub fn code_reply(result_code: u8) -> RecordReply {
    RecordReply::code(result_code)
}

/// A command's generation condition, with the generation as the wire carries it (32 bits).
///
/// Record generations are 16 bits (they wrap 65535 → 1), but the AS_MSG header's generation
/// field is 32 bits, and the Aerospike server compares the two as 32-bit numbers (its
/// `generation_check`: `m->generation == r->generation` and `m->generation > r->generation`,
/// with `as_msg.generation` a `uint32_t`; a record being created is not checked). So does this
/// server:
/// "equal" with a generation above 65535 never matches an existing record (error 3), and
/// "greater" with one always holds. Truncating to 16 bits instead would let "equal 65538"
/// match generation 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GenerationCheck {
    None,
    Equal(u32),
    Greater(u32),
}

impl GenerationCheck {
    fn of(cmd: &RecordCommand<'_>) -> GenerationCheck {
        if cmd.info2 & info2::GENERATION != 0 {
            GenerationCheck::Equal(cmd.generation)
        } else if cmd.info2 & info2::GENERATION_GT != 0 {
            GenerationCheck::Greater(cmd.generation)
        } else {
            GenerationCheck::None
        }
    }

    /// Checks an existing record's generation.
    fn check(self, actual: u16) -> Result<(), Error> {
        let (required, ok) = match self {
            GenerationCheck::None => return Ok(()),
            GenerationCheck::Equal(g) => (g, g == u32::from(actual)),
            GenerationCheck::Greater(g) => (g, g > u32::from(actual)),
        };
        if ok {
            return Ok(());
        }
        // The engine's error carries 16 bits; a required generation beyond them is reported as
        // 65535 (only the result code goes on the wire).
        Err(Error::Generation { required: u16::try_from(required).unwrap_or(u16::MAX), actual })
    }
}

/// Deletes a record (a tombstone), checking the generation condition as 32-bit numbers.
async fn delete(target: Target<'_>, digest: &Digest, cmd: &RecordCommand<'_>) -> Result<RecordReply, Failure> {
    let generation = GenerationCheck::of(cmd);
    target
        .modify(digest, false, |existing| {
            let Some(e) = existing else {
                return Err(Error::NotFound);
            };
            generation.check(e.meta.generation)?;
            Ok(Change::Delete)
        })
        .await?;
    Ok(RecordReply::default())
}

fn ttl_of(record_ttl: u32) -> Ttl {
    match record_ttl {
        0 | TTL_CLIENT_DEFAULT => Ttl::NamespaceDefault,
        TTL_NEVER_EXPIRE => Ttl::Never,
        TTL_DONT_UPDATE => Ttl::Keep,
        s => Ttl::Seconds(s),
    }
}

fn bin_name(name: &[u8]) -> Result<BinName, Error> {
    BinName::new(name)
}

/// Reads a record from `engine` (in a cluster, the caller decided this replica may serve it).
pub async fn read(engine: &Engine, cmd: &RecordCommand<'_>) -> Result<RecordReply, Error> {
    let digest = &Digest(cmd.digest);
    if cmd.info1 & info1::NOBINDATA != 0 {
        let meta = engine.exists(digest)?.ok_or(Error::NotFound)?;
        return Ok(RecordReply {
            generation: u32::from(meta.generation),
            void_time: meta.void_time,
            ..RecordReply::default()
        });
    }
    if cmd.ops.iter().any(|o| o.op_type != op::READ) {
        // List/map, expression, bit and HLL reads are not implemented.
        return Ok(RecordReply::code(result::UNSUPPORTED_FEATURE));
    }
    let all = cmd.info1 & info1::GET_ALL != 0 || cmd.ops.iter().any(|o| o.name.is_empty());
    let selection = if all {
        BinSelection::All
    } else if cmd.ops.is_empty() {
        BinSelection::None
    } else {
        BinSelection::Only(cmd.ops.iter().map(|o| bin_name(o.name)).collect::<Result<_, _>>()?)
    };
    let record = engine.get_async(digest, &selection).await?;
    let mut reply = RecordReply {
        generation: u32::from(record.meta.generation),
        void_time: record.meta.void_time,
        ..RecordReply::default()
    };
    if all {
        for b in &record.bins {
            reply.push_bin(op::READ, b.name.as_bytes(), Some(&b.value));
        }
    } else {
        for o in cmd.ops {
            if let Some(v) = record.bin_named(o.name) {
                reply.push_bin(op::READ, o.name, Some(v));
            }
        }
    }
    Ok(reply)
}

/// A validated write op.
#[derive(Debug, Clone)]
enum WriteOp {
    Write(BinName, Option<Value>),
    Incr(BinName, Value),
    Append(BinName, Value, bool),
    Touch,
    Delete,
    Read(Option<BinName>),
}

fn validate_ops(ops: &[Op<'_>]) -> Result<Vec<(u8, WriteOp)>, u8> {
    let name = |o: &Op<'_>| BinName::new(o.name).map_err(|_| result::BIN_NAME);
    ops.iter()
        .map(|o| {
            let w = match o.op_type {
                op::WRITE if o.particle_type == particle::NULL => WriteOp::Write(name(o)?, None),
                op::WRITE => WriteOp::Write(name(o)?, Some(from_wire(o.particle_type, o.value)?)),
                op::INCR => match o.particle_type {
                    particle::INTEGER | particle::FLOAT => {
                        WriteOp::Incr(name(o)?, from_wire(o.particle_type, o.value)?)
                    }
                    _ => return Err(result::PARAMETER),
                },
                op::APPEND | op::PREPEND => match o.particle_type {
                    particle::STRING | particle::BLOB => {
                        WriteOp::Append(name(o)?, from_wire(o.particle_type, o.value)?, o.op_type == op::APPEND)
                    }
                    _ => return Err(result::PARAMETER),
                },
                op::TOUCH => WriteOp::Touch,
                op::DELETE => WriteOp::Delete,
                op::READ if o.name.is_empty() => WriteOp::Read(None),
                op::READ => WriteOp::Read(Some(name(o)?)),
                _ => return Err(result::UNSUPPORTED_FEATURE),
            };
            Ok((o.op_type, w))
        })
        .collect()
}

fn find<'b>(bins: &'b mut [Bin], name: &BinName) -> Option<&'b mut Bin> {
    bins.iter_mut().find(|b| b.name == *name)
}

fn apply_incr(bins: &mut Vec<Bin>, name: &BinName, delta: &Value) -> Result<(), Error> {
    match (find(bins, name), delta) {
        (None, d) => bins.push(Bin { name: *name, value: d.clone() }),
        (Some(Bin { value: Value::Int(v), .. }), Value::Int(d)) => *v = v.wrapping_add(*d),
        (Some(Bin { value: Value::Float(v), .. }), Value::Float(d)) => *v += d,
        (Some(_), _) => return Err(Error::BinIncompatible(format!("cannot add to bin {name:?} of another type"))),
    }
    Ok(())
}

fn apply_append(bins: &mut Vec<Bin>, name: &BinName, add: &Value, append: bool) -> Result<(), Error> {
    let join = |old: &mut Vec<u8>, new: &[u8]| {
        if append {
            old.extend_from_slice(new);
        } else {
            old.splice(0..0, new.iter().copied());
        }
    };
    match (find(bins, name), add) {
        (None, v) => bins.push(Bin { name: *name, value: v.clone() }),
        (Some(Bin { value: Value::String(old), .. }), Value::String(new)) => join(old, new),
        (Some(Bin { value: Value::Blob(old), .. }), Value::Blob(new)) => join(old, new),
        (Some(_), _) => return Err(Error::BinIncompatible(format!("cannot append to bin {name:?} of another type"))),
    }
    Ok(())
}

async fn write(target: Target<'_>, digest: &Digest, cmd: &RecordCommand<'_>) -> Result<RecordReply, Failure> {
    let engine = target.engine();
    let ops = match validate_ops(cmd.ops) {
        Ok(ops) => ops,
        Err(code) => return Ok(RecordReply::code(code)),
    };
    if ops.is_empty() {
        return Ok(RecordReply::code(result::PARAMETER));
    }
    let replace = cmd.info3 & (info3::CREATE_OR_REPLACE | info3::REPLACE_ONLY) != 0;
    let create_only = cmd.info2 & info2::CREATE_ONLY != 0;
    let must_exist = cmd.info3 & (info3::UPDATE_ONLY | info3::REPLACE_ONLY) != 0;
    let respond_all = cmd.info2 & info2::RESPOND_ALL_OPS != 0;
    let generation = GenerationCheck::of(cmd);
    let ttl = ttl_of(cmd.record_ttl);
    let key = cmd
        .key
        .and_then(|k| k.split_first())
        .map(|(pt, bytes)| StoredKey { particle_type: *pt, bytes: bytes.to_vec() });
    let mut reply = RecordReply::default();
    let applied = target
        .modify(digest, !replace && !create_only, |existing| {
            reply = RecordReply::default();
            if let Some(e) = &existing {
                generation.check(e.meta.generation)?;
                if create_only {
                    return Err(Error::RecordExists);
                }
            } else if must_exist {
                return Err(Error::NotFound);
            }
            let old: Option<&Record> = existing.as_ref().and_then(|e| e.record);
            let mut bins = match old {
                Some(r) if !replace => r.bins.clone(),
                _ => Vec::new(),
            };
            for (op_type, w) in &ops {
                match w {
                    WriteOp::Write(name, value) => match (find(&mut bins, name), value) {
                        (Some(b), Some(v)) => b.value = v.clone(),
                        (None, Some(v)) => bins.push(Bin { name: *name, value: v.clone() }),
                        (_, None) => bins.retain(|b| b.name != *name),
                    },
                    WriteOp::Incr(name, delta) => apply_incr(&mut bins, name, delta)?,
                    WriteOp::Append(name, v, append) => apply_append(&mut bins, name, v, *append)?,
                    WriteOp::Touch if existing.is_none() => return Err(Error::NotFound),
                    WriteOp::Touch => {}
                    WriteOp::Delete => bins.clear(),
                    WriteOp::Read(None) => {
                        for b in &bins {
                            reply.push_bin(op::READ, b.name.as_bytes(), Some(&b.value));
                        }
                    }
                    WriteOp::Read(Some(name)) => match bins.iter().find(|b| b.name == *name) {
                        Some(b) => reply.push_bin(op::READ, name.as_bytes(), Some(&b.value)),
                        None if respond_all => reply.push_bin(op::READ, name.as_bytes(), None),
                        None => {}
                    },
                }
                if respond_all && !matches!(w, WriteOp::Read(_)) {
                    let name = match w {
                        WriteOp::Write(n, _) | WriteOp::Incr(n, _) | WriteOp::Append(n, _, _) => n.as_bytes(),
                        _ => b"",
                    };
                    reply.push_bin(*op_type, name, None);
                }
            }
            let void_time = engine.void_time_for(ttl, existing.map(|e| e.meta.void_time))?;
            Ok(Change::Put {
                set_name: cmd.set.to_vec(),
                key: key.clone().or_else(|| old.and_then(|r| r.key.clone())),
                bins,
                void_time,
            })
        })
        .await?;
    if let Applied::Written(meta) = applied {
        reply.generation = u32::from(meta.generation);
        reply.void_time = meta.void_time;
    }
    Ok(reply)
}
