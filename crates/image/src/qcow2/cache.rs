//! A bounded LRU cache of metadata clusters (L2 tables, refcount blocks) keyed by host offset,
//! with dirty tracking.
//!
//! The cache never writes anything itself: the owner ([`super::meta::Meta`]) decides when and
//! in which order dirty entries reach the file (the crash-safety ordering rules live there).

use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug)]
struct Slot<T> {
    val: T,
    tick: u64,
}

#[derive(Debug)]
pub(crate) struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    /// Recency order: tick -> key (the smallest tick is the least recently used).
    order: BTreeMap<u64, u64>,
    /// Keys of dirty entries, sorted (written back in file order).
    dirty: BTreeSet<u64>,
    tick: u64,
    cap: usize,
}

impl<T> Cache<T> {
    pub fn new(cap: usize) -> Cache<T> {
        Cache {
            map: HashMap::new(),
            order: BTreeMap::new(),
            dirty: BTreeSet::new(),
            tick: 0,
            cap: cap.max(2),
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(2);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether an insert needs an entry evicted first.
    pub fn full(&self) -> bool {
        self.map.len() >= self.cap
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.map.get_mut(&key) {
            self.order.remove(&slot.tick);
            slot.tick = tick;
            self.order.insert(tick, key);
        }
    }

    /// Looks an entry up (and marks it recently used).
    pub fn get(&mut self, key: u64) -> Option<&T> {
        if !self.map.contains_key(&key) {
            return None;
        }
        self.touch(key);
        self.map.get(&key).map(|s| &s.val)
    }

    /// Looks an entry up for modification: marks it recently used and dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        if !self.map.contains_key(&key) {
            return None;
        }
        self.touch(key);
        self.dirty.insert(key);
        self.map.get_mut(&key).map(|s| &mut s.val)
    }

    /// Reads an entry without changing its recency or dirtiness.
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.map.get(&key).map(|s| &s.val)
    }

    /// Inserts (or replaces) an entry. The caller makes room first (see [`Cache::victim`]);
    /// the cache may briefly exceed its capacity by the entries the caller pins.
    pub fn insert(&mut self, key: u64, val: T, dirty: bool) {
        self.remove(key);
        self.tick += 1;
        self.map.insert(
            key,
            Slot {
                val,
                tick: self.tick,
            },
        );
        self.order.insert(self.tick, key);
        if dirty {
            self.dirty.insert(key);
        }
    }

    /// Removes an entry, returning it and whether it was dirty.
    pub fn remove(&mut self, key: u64) -> Option<(T, bool)> {
        let slot = self.map.remove(&key)?;
        self.order.remove(&slot.tick);
        let dirty = self.dirty.remove(&key);
        Some((slot.val, dirty))
    }

    /// The entry to evict: the least recently used clean entry among the few oldest, else the
    /// oldest (dirty) one. Returns its key and whether it is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        let mut first = None;
        for (_, &key) in self.order.iter().take(8) {
            let dirty = self.dirty.contains(&key);
            if !dirty {
                return Some((key, false));
            }
            first.get_or_insert((key, true));
        }
        first
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Dirty keys in ascending order.
    pub fn dirty_keys(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    pub fn mark_clean(&mut self, key: u64) {
        self.dirty.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_prefers_clean_victims() {
        let mut c: Cache<u32> = Cache::new(3);
        c.insert(1, 10, true);
        c.insert(2, 20, false);
        c.insert(3, 30, false);
        assert!(c.full());
        // 1 is oldest but dirty: 2 is the oldest clean one.
        assert_eq!(c.victim(), Some((2, false)));
        c.get(2);
        assert_eq!(c.victim(), Some((3, false)));
        *c.get_mut(3).unwrap() = 31;
        assert_eq!(c.victim(), Some((2, false)));
        assert_eq!(c.dirty_keys(), vec![1, 3]);
        c.mark_clean(1);
        assert_eq!(c.victim(), Some((1, false)));
        assert_eq!(c.remove(3), Some((31, true)));
        assert_eq!(c.len(), 2);
        assert_eq!(c.peek(1), Some(&10));
    }
}
