//! [`Slab`]: values under small integer keys that are reused, the bookkeeping of everything
//! in flight (an engine's operations, keyed by the kernel-side `user_data`; an image queue's
//! requests; a backend reactor's guest requests).

/// Values stored under small integer keys; a removed key is handed out again by a later
/// insert (so keys stay small and dense, fit in a `user_data` field, and index a `Vec`).
///
/// A slab is either **bounded** ([`Slab::with_capacity`]: allocated once at its full size,
/// never reallocated, `insert` fails when full — for engines, whose slots the kernel
/// addresses) or **growable** ([`Slab::new`]).
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
    bounded: bool,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab::new()
    }
}

impl<T> Slab<T> {
    /// An empty growable slab.
    pub fn new() -> Slab<T> {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            bounded: false,
        }
    }

    /// A bounded slab of `capacity` slots, allocated now.
    pub fn with_capacity(capacity: usize) -> Slab<T> {
        let mut slots = Vec::with_capacity(capacity);
        slots.resize_with(capacity, || None);
        Slab {
            slots,
            // Pop order: low keys first (purely cosmetic).
            free: (0..capacity).rev().collect(),
            len: 0,
            bounded: true,
        }
    }

    /// The most values it can hold: its capacity if bounded, else `usize::MAX`.
    pub fn capacity(&self) -> usize {
        if self.bounded {
            self.slots.len()
        } else {
            usize::MAX
        }
    }

    /// Keys handed out so far (the largest key + 1): what a per-key side table needs.
    pub fn key_space(&self) -> usize {
        self.slots.len()
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether an insert would fail (only a bounded slab fills up).
    pub fn is_full(&self) -> bool {
        self.bounded && self.free.is_empty()
    }

    /// Stores `value` and returns its key; `None` when a bounded slab is full.
    pub fn insert(&mut self, value: T) -> Option<usize> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None if self.bounded => return None,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        debug_assert!(self.slots[idx].is_none());
        self.slots[idx] = Some(value);
        self.len += 1;
        Some(idx)
    }

    /// Removes and returns the value at `key` (`None` for a key that is not in use).
    pub fn remove(&mut self, key: usize) -> Option<T> {
        let v = self.slots.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(v)
    }

    /// The value at `key`.
    pub fn get(&self, key: usize) -> Option<&T> {
        self.slots.get(key)?.as_ref()
    }

    /// The value at `key`, mutably.
    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.slots.get_mut(key)?.as_mut()
    }

    /// Keys in use, in increasing order.
    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|_| i))
    }

    /// Values stored, in key order.
    pub fn values(&self) -> impl Iterator<Item = &T> + '_ {
        self.slots.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_slab_reuses_keys_and_never_grows() {
        let mut s: Slab<u32> = Slab::with_capacity(3);
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        let c = s.insert(3).unwrap();
        assert!(s.is_full());
        assert!(s.insert(4).is_none());
        assert_eq!(s.len(), 3);
        assert_eq!(s.remove(b), Some(2));
        assert_eq!(s.remove(b), None);
        let d = s.insert(5).unwrap();
        assert_eq!(d, b);
        assert_eq!(s.keys().collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(s.capacity(), 3);
        *s.get_mut(a).unwrap() = 9;
        assert_eq!(s.remove(a), Some(9));
        assert_eq!(s.get(a), None);
    }

    #[test]
    fn growable_slab_grows_and_reuses_keys() {
        let mut s: Slab<&str> = Slab::new();
        assert!(s.is_empty() && !s.is_full());
        let keys: Vec<usize> = (0..100).map(|_| s.insert("x").unwrap()).collect();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
        assert_eq!(s.remove(42), Some("x"));
        assert_eq!(s.insert("y"), Some(42), "a freed key comes back first");
        assert_eq!(s.get(42), Some(&"y"));
        assert_eq!(s.len(), 100);
        assert_eq!(s.key_space(), 100);
        assert_eq!(s.values().count(), 100);
        assert_eq!(s.remove(1000), None);
    }
}
