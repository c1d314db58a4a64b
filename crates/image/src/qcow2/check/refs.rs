//! The expected refcounts: references counted per host cluster.

use std::collections::HashMap;

/// Clusters per chunk of [`Refs`].
pub(super) const CHUNK_BITS: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_BITS;

/// Expected refcounts: 16 bits per cluster, in chunks allocated on first use (memory follows
/// what is referenced, not the file length: a huge sparse file costs little), with the rare
/// values that do not fit in 16 bits on the side.
#[derive(Debug, Default)]
pub(super) struct Refs {
    n: u64,
    chunks: Vec<Option<Box<[u16]>>>,
    big: HashMap<u64, u64>,
}

impl Refs {
    pub(super) fn new(n: u64) -> std::result::Result<Refs, String> {
        let nchunks = usize::try_from(n.div_ceil(CHUNK)).map_err(|_| "too many clusters")?;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(nchunks)
            .map_err(|e| format!("cannot allocate the refcount array: {e}"))?;
        chunks.resize_with(nchunks, || None);
        Ok(Refs {
            n,
            chunks,
            big: HashMap::new(),
        })
    }
    pub(super) fn len(&self) -> u64 {
        self.n
    }
    /// Whether no cluster of `i`'s chunk has a reference.
    pub(super) fn chunk_empty(&self, i: u64) -> bool {
        self.chunks[(i >> CHUNK_BITS) as usize].is_none()
    }
    /// Whether no cluster of `from..to` (within one chunk) has a reference.
    pub(super) fn all_zero(&self, from: u64, to: u64) -> bool {
        debug_assert!(from < to && (from >> CHUNK_BITS) == ((to - 1) >> CHUNK_BITS));
        match &self.chunks[(from >> CHUNK_BITS) as usize] {
            None => true,
            Some(c) => c[(from & (CHUNK - 1)) as usize..=((to - 1) & (CHUNK - 1)) as usize]
                .iter()
                .all(|&x| x == 0),
        }
    }
    pub(super) fn get(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let Some(c) = &self.chunks[(i >> CHUNK_BITS) as usize] else {
            return 0;
        };
        match c[(i & (CHUNK - 1)) as usize] {
            u16::MAX => self.big.get(&i).copied().unwrap_or(u64::from(u16::MAX)),
            x => u64::from(x),
        }
    }
    pub(super) fn set(&mut self, i: u64, val: u64) {
        debug_assert!(i < self.n);
        let chunk = &mut self.chunks[(i >> CHUNK_BITS) as usize];
        if chunk.is_none() && val == 0 {
            return;
        }
        // The last chunk holds only the clusters left (a small image allocates and scans
        // what it has, not 64 Ki counts).
        let start = i & !(CHUNK - 1);
        let len = (self.n - start).min(CHUNK) as usize;
        let c = chunk.get_or_insert_with(|| vec![0u16; len].into_boxed_slice());
        let slot = &mut c[(i & (CHUNK - 1)) as usize];
        if *slot == u16::MAX {
            self.big.remove(&i);
        }
        if val >= u64::from(u16::MAX) {
            *slot = u16::MAX;
            self.big.insert(i, val);
        } else {
            *slot = val as u16;
        }
    }
    pub(super) fn add(&mut self, i: u64, n: u64) {
        let v = self.get(i).saturating_add(n);
        self.set(i, v);
    }
    /// The clusters with at least one reference, in order.
    pub(super) fn nonzero(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| c.as_ref().map(|c| (ci as u64, c)))
            .flat_map(|(ci, c)| {
                c.iter()
                    .enumerate()
                    .filter(|(_, &x)| x != 0)
                    .map(move |(j, _)| (ci << CHUNK_BITS) + j as u64)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_large_values() {
        let mut r = Refs::new(4).unwrap();
        r.add(1, 70_000);
        r.add(1, 5);
        assert_eq!(r.get(1), 70_005);
        r.set(1, 3);
        assert_eq!(r.get(1), 3);
        assert!(r.big.is_empty());
        r.add(2, u64::MAX);
        r.add(2, 1);
        assert_eq!(r.get(2), u64::MAX);
    }

    #[test]
    fn the_last_chunk_holds_only_the_clusters_left() {
        let n = CHUNK + 10;
        let mut r = Refs::new(n).unwrap();
        r.add(n - 1, 2);
        r.add(CHUNK, 1);
        r.add(3, 1);
        assert_eq!(r.chunks[1].as_ref().map(|c| c.len()), Some(10));
        assert_eq!(r.chunks[0].as_ref().map(|c| c.len()), Some(CHUNK as usize));
        assert_eq!(r.get(n - 1), 2);
        assert!(!r.all_zero(CHUNK, n));
        assert!(r.all_zero(CHUNK + 1, n - 1));
        assert_eq!(r.nonzero().collect::<Vec<_>>(), vec![3, CHUNK, n - 1]);
        let mut small = Refs::new(3).unwrap();
        small.add(2, 1);
        assert_eq!(small.chunks[0].as_ref().map(|c| c.len()), Some(3));
    }
}
