//! Write and read policies, as Aerospike clients express them.

use crate::record::BinName;

/// What a write requires of the record's existence, and whether it merges or replaces bins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RecordExists {
    /// Create the record or merge the written bins into it (Aerospike's default, UPDATE).
    #[default]
    Update,
    /// Merge into an existing record; fail with not-found if there is none.
    UpdateOnly,
    /// Create the record or replace all its bins (CREATE_OR_REPLACE).
    Replace,
    /// Replace all bins of an existing record; fail with not-found if there is none.
    ReplaceOnly,
    /// Create the record; fail with record-exists if it is there.
    CreateOnly,
}

impl RecordExists {
    /// Whether the write merges into the existing bins (so it must read them first).
    pub fn merges(self) -> bool {
        matches!(self, RecordExists::Update | RecordExists::UpdateOnly)
    }
}

/// A generation condition, checked only when the record exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GenerationPolicy {
    /// No condition.
    #[default]
    None,
    /// Apply only if the record's generation equals this.
    Equal(u16),
    /// Apply only if this is greater than the record's generation.
    Greater(u16),
}

/// How long the written record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ttl {
    /// The namespace's `default_ttl_s`.
    #[default]
    NamespaceDefault,
    /// Never expire.
    Never,
    /// Keep the record's current expiry (the default for a new record).
    Keep,
    /// Expire this many seconds from now.
    Seconds(u32),
}

/// The conditions of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WritePolicy {
    /// Existence requirement and merge/replace.
    pub exists: RecordExists,
    /// Generation condition.
    pub generation: GenerationPolicy,
    /// Expiry.
    pub ttl: Ttl,
}

/// Which bins a read returns.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum BinSelection {
    /// Every bin.
    #[default]
    All,
    /// Metadata only (no device read is needed).
    None,
    /// Only the named bins (missing ones are omitted).
    Only(Vec<BinName>),
}

impl BinSelection {
    /// Whether the bin called `name` is selected.
    pub fn wants(&self, name: &[u8]) -> bool {
        match self {
            BinSelection::All => true,
            BinSelection::None => false,
            BinSelection::Only(names) => names.iter().any(|n| n.as_bytes() == name),
        }
    }
}
