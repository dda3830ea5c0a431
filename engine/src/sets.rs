//! Set names ↔ 12-bit set ids for the index. Ids live only in memory: records carry their set
//! name on the device, and recovery assigns ids again as it meets them.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use peregrine_index::SET_ID_MAX;

use crate::error::{Error, Result};
use crate::record::SET_NAME_BYTES_MAX;

/// The registry of one namespace.
#[derive(Debug, Default)]
pub struct SetRegistry {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<Vec<u8>, u16>,
    names: Vec<Vec<u8>>,
}

impl SetRegistry {
    /// The id of `name` (0 for the empty name), assigning one if it is new.
    pub fn id_for(&self, name: &[u8]) -> Result<u16> {
        if name.is_empty() {
            return Ok(0);
        }
        if name.len() > SET_NAME_BYTES_MAX {
            return Err(Error::SetName { len: name.len(), max: SET_NAME_BYTES_MAX });
        }
        if let Some(id) = self.lookup(name) {
            return Ok(id);
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = inner.by_name.get(name) {
            return Ok(id);
        }
        if inner.names.len() >= usize::from(SET_ID_MAX) {
            return Err(Error::TooManySets { max: usize::from(SET_ID_MAX) });
        }
        inner.names.push(name.to_vec());
        let id = inner.names.len() as u16;
        inner.by_name.insert(name.to_vec(), id);
        Ok(id)
    }

    /// The id of `name` if it is known.
    pub fn lookup(&self, name: &[u8]) -> Option<u16> {
        if name.is_empty() {
            return Some(0);
        }
        self.inner.read().unwrap_or_else(PoisonError::into_inner).by_name.get(name).copied()
    }

    /// The name of set `id` (empty for 0).
    pub fn name(&self, id: u16) -> Vec<u8> {
        if id == 0 {
            return Vec::new();
        }
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.names.get(usize::from(id) - 1).cloned().unwrap_or_default()
    }

    /// Every known set name with its id.
    pub fn all(&self) -> Vec<(u16, Vec<u8>)> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.names.iter().enumerate().map(|(i, n)| (i as u16 + 1, n.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_bounded() {
        let r = SetRegistry::default();
        assert_eq!(r.id_for(b"").unwrap(), 0);
        let a = r.id_for(b"a").unwrap();
        assert_eq!(r.id_for(b"a").unwrap(), a);
        assert_ne!(r.id_for(b"b").unwrap(), a);
        assert_eq!(r.name(a), b"a");
        assert!(matches!(r.id_for(&[b'x'; 64]), Err(Error::SetName { .. })));
        for i in 0..4093u32 {
            r.id_for(format!("s{i}").as_bytes()).unwrap();
        }
        assert!(matches!(r.id_for(b"one-too-many"), Err(Error::TooManySets { .. })));
    }
}
