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
    /// Name of id `i + 1`; empty for an id given back by [`SetRegistry::retain_ids`].
    names: Vec<Vec<u8>>,
    /// Ids given back, reused before new ones.
    free: Vec<u16>,
}

impl SetRegistry {
    /// The id of `name` (0 for the empty name), assigning one if it is new.
    pub fn id_for(&self, name: &[u8]) -> Result<u16> {
        self.id_for_noting(name).map(|(id, _)| id)
    }

    /// Like [`SetRegistry::id_for`], also saying whether the id was assigned by this call.
    pub fn id_for_noting(&self, name: &[u8]) -> Result<(u16, bool)> {
        if name.is_empty() {
            return Ok((0, false));
        }
        if name.len() > SET_NAME_BYTES_MAX {
            return Err(Error::SetName { len: name.len(), max: SET_NAME_BYTES_MAX });
        }
        if let Some(id) = self.lookup(name) {
            return Ok((id, false));
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = inner.by_name.get(name) {
            return Ok((id, false));
        }
        let id = if let Some(id) = inner.free.pop() {
            inner.names[usize::from(id) - 1] = name.to_vec();
            id
        } else {
            if inner.names.len() >= usize::from(SET_ID_MAX) {
                return Err(Error::TooManySets { max: usize::from(SET_ID_MAX) });
            }
            inner.names.push(name.to_vec());
            inner.names.len() as u16
        };
        inner.by_name.insert(name.to_vec(), id);
        Ok((id, true))
    }

    /// Gives back every id for which `keep` is false (no indexed version uses it); returns how
    /// many. The caller guarantees nobody is about to index a version with such an id.
    pub fn retain_ids(&self, mut keep: impl FnMut(u16) -> bool) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let Inner { by_name, names, free } = &mut *inner;
        let mut freed = 0;
        for (i, name) in names.iter_mut().enumerate() {
            let id = i as u16 + 1;
            if !name.is_empty() && !keep(id) {
                by_name.remove(name.as_slice());
                name.clear();
                free.push(id);
                freed += 1;
            }
        }
        freed
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
        inner.names.iter().enumerate().filter(|(_, n)| !n.is_empty()).map(|(i, n)| (i as u16 + 1, n.clone())).collect()
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
        // Giving ids back makes room; kept names keep their ids.
        let freed = r.retain_ids(|id| id == a);
        assert_eq!(freed, 4094);
        assert_eq!(r.lookup(b"a"), Some(a));
        assert_eq!(r.lookup(b"s7"), None);
        let (again, new) = r.id_for_noting(b"one-too-many").unwrap();
        assert!(new && again != a);
        assert_eq!(r.name(again), b"one-too-many");
        assert_eq!(r.all().len(), 2);
    }
}
