//! Moving request data between granted guest pages and the image: by mapping the pages
//! ([`MapPath`], zero copy, optionally with persistent grants) or by grant copies through a
//! bounce buffer ([`CopyPath`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use xdisk_blkif::wire::{Segment, PAGE_SIZE};
use xdisk_io::{AlignedBuf, IoBuf};
use xdisk_xen::iobuf::{GrantIoBuf, GrantSegment, IovRoom};
use xdisk_xen::platform::{
    CopyDir, DomId, GrantCopyOp, GrantMapper, GrantRef, GrantStatus, MappedRegion, PlatformError,
};

use crate::region::{map_counted, PageOf};
use crate::stats::{add, sub, Counters};

/// Why a request's data could not be reached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DataError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("grant copy of gref {gref} failed: {status:?}")]
    Copy { gref: GrantRef, status: GrantStatus },
}

/// A way of giving the image engine access to a request's data: the implementation of one
/// [`DataPath`](crate::DataPath) choice ([`MapPath`] or [`CopyPath`]).
pub(crate) trait GuestData: Send + 'static {
    type Buf: IoBuf;
    /// Builds the buffer of a request whose data is `segs`, in order. `disk_read`: the disk is
    /// read into the guest's pages (they must be writable).
    fn prepare(&mut self, segs: &[Segment], disk_read: bool) -> Result<Self::Buf, DataError>;
    /// Called when the I/O is over (`ok`: it succeeded): copies read data back to the guest
    /// where needed and releases the buffer.
    fn finish(
        &mut self,
        buf: Self::Buf,
        segs: &[Segment],
        disk_read: bool,
        ok: bool,
    ) -> Result<(), DataError>;
    /// Copies the indirect pages `refs` (read-only access is enough) into `out`, one page each.
    fn read_indirect(
        &mut self,
        refs: &[GrantRef],
        out: &mut [[u8; PAGE_SIZE]],
    ) -> Result<(), DataError>;
}

/// Total bytes of `segs`.
fn total_len(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.len_bytes()).sum()
}

/// Grant copies through an aligned bounce buffer.
pub(crate) struct CopyPath {
    pub gnt: Arc<dyn GrantMapper>,
    pub domid: DomId,
}

impl CopyPath {
    fn copy(&self, buf: &mut [u8], segs: &[Segment], to_guest: bool) -> Result<(), DataError> {
        let mut ops = Vec::with_capacity(segs.len());
        let mut rest: &mut [u8] = buf;
        for s in segs {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(s.len_bytes());
            rest = tail;
            ops.push(GrantCopyOp {
                domid: self.domid,
                gref: s.gref,
                offset: s.offset_bytes() as u16,
                dir: if to_guest {
                    CopyDir::ToForeign(chunk)
                } else {
                    CopyDir::FromForeign(chunk)
                },
                status: GrantStatus::Okay,
            });
        }
        self.gnt.copy(&mut ops)?;
        match ops.iter().find(|op| op.status != GrantStatus::Okay) {
            Some(op) => Err(DataError::Copy {
                gref: op.gref,
                status: op.status,
            }),
            None => Ok(()),
        }
    }
}

impl GuestData for CopyPath {
    type Buf = AlignedBuf;

    fn prepare(&mut self, segs: &[Segment], disk_read: bool) -> Result<AlignedBuf, DataError> {
        let mut buf = AlignedBuf::new(total_len(segs), PAGE_SIZE);
        if !disk_read {
            self.copy(&mut buf, segs, false)?;
        }
        Ok(buf)
    }

    fn finish(
        &mut self,
        buf: AlignedBuf,
        segs: &[Segment],
        disk_read: bool,
        ok: bool,
    ) -> Result<(), DataError> {
        let mut buf = buf;
        if disk_read && ok {
            self.copy(&mut buf, segs, true)?;
        }
        Ok(())
    }

    /// Grant copies (read-only access), no mapping.
    fn read_indirect(
        &mut self,
        refs: &[GrantRef],
        out: &mut [[u8; PAGE_SIZE]],
    ) -> Result<(), DataError> {
        let mut ops: Vec<GrantCopyOp<'_>> = refs
            .iter()
            .zip(out.iter_mut())
            .map(|(&gref, page)| GrantCopyOp {
                domid: self.domid,
                gref,
                offset: 0,
                dir: CopyDir::FromForeign(&mut page[..]),
                status: GrantStatus::Okay,
            })
            .collect();
        self.gnt.copy(&mut ops)?;
        match ops.iter().find(|op| op.status != GrantStatus::Okay) {
            Some(op) => Err(DataError::Copy {
                gref: op.gref,
                status: op.status,
            }),
            None => Ok(()),
        }
    }
}

/// Hashes a grant reference with one multiplication (Fibonacci hashing): references are
/// small integers chosen by the frontend, and a lookup per data page must be cheap. The
/// cache's size is bounded, so a frontend choosing colliding references only slows itself.
#[derive(Default)]
struct GrefHasher(u64);

impl Hasher for GrefHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The per-queue cache of persistently mapped grants (blkif.h "feature-persistent"; Linux
/// blkback's per-ring `persistent_gnts` tree with `max_pgrants` and LRU purging).
pub(crate) struct PersistentCache {
    max: usize,
    entries: HashMap<GrantRef, Entry, BuildHasherDefault<GrefHasher>>,
    tick: u64,
    counters: Arc<Counters>,
    /// The grants of the request being prepared that are not cached (reused).
    missing: Vec<GrantRef>,
    /// `Counters::detached_pages` when the cache last looked for detached mappings.
    detached_seen: u64,
}

/// A cached mapping.
struct Entry {
    region: Arc<dyn MappedRegion>,
    /// When it was last used (LRU).
    tick: u64,
    /// Mapped by [`PersistentCache::map_missing`] for the request being prepared, which
    /// counted it as a miss: its first lookup is not a hit.
    fresh: bool,
}

impl PersistentCache {
    pub fn new(max: usize, counters: Arc<Counters>) -> PersistentCache {
        PersistentCache {
            max,
            entries: HashMap::default(),
            tick: 0,
            detached_seen: counters.detached_pages.load(Ordering::Relaxed),
            counters,
            missing: Vec::new(),
        }
    }

    /// Drops the least recently used mappings that no request is using, at least `need` of
    /// them if possible (and a sixteenth of the cache, to purge in batches).
    fn evict(&mut self, need: usize) {
        let mut idle: Vec<(u64, GrantRef)> = self
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.region) == 1)
            .map(|(g, e)| (e.tick, *g))
            .collect();
        idle.sort_unstable();
        let n = need.max(self.max / 16).max(1);
        for (_, g) in idle.into_iter().take(n) {
            self.entries.remove(&g);
            sub(&self.counters.persistent_grants, 1);
        }
    }

    /// Drops the cached mappings whose page was detached (a request failed at its deadline
    /// took it out while the storage still had it): the frontend still counts on those grants
    /// being mapped, so their next use maps them again. Looks only when the device's count of
    /// detached pages moved (one atomic load per request otherwise).
    fn forget_detached(&mut self) {
        let now = self.counters.detached_pages.load(Ordering::Relaxed);
        if now == self.detached_seen {
            return;
        }
        self.detached_seen = now;
        let before = self.entries.len();
        self.entries
            .retain(|_, e| !e.region.is_detached(0, PAGE_SIZE));
        sub(
            &self.counters.persistent_grants,
            (before - self.entries.len()) as u64,
        );
    }

    /// The mapping of `gref`: cached, or mapped now (writable, as Linux blkback maps persistent
    /// grants) and cached if there is room. A grant the frontend only gave read-only is mapped
    /// read-only for this request alone when `need_write` is false.
    fn get(
        &mut self,
        gnt: &dyn GrantMapper,
        domid: DomId,
        gref: GrantRef,
        need_write: bool,
    ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
        self.tick += 1;
        self.forget_detached();
        if let Some(e) = self.entries.get_mut(&gref) {
            e.tick = self.tick;
            if !std::mem::take(&mut e.fresh) {
                add(&self.counters.pgrant_hits, 1);
            }
            return Ok(e.region.clone());
        }
        add(&self.counters.pgrant_misses, 1);
        let region = match map_counted(gnt, &self.counters, domid, &[gref], true) {
            Ok(r) => r,
            Err(e) if need_write => return Err(e),
            Err(_) => return map_counted(gnt, &self.counters, domid, &[gref], false),
        };
        if self.entries.len() >= self.max {
            self.evict(1);
        }
        if self.entries.len() < self.max {
            self.entries.insert(
                gref,
                Entry {
                    region: region.clone(),
                    tick: self.tick,
                    fresh: false,
                },
            );
            add(&self.counters.persistent_grants, 1);
        }
        Ok(region)
    }

    /// Maps the grants of `segs` that are not cached yet all at once (one `gntdev` map and
    /// `mmap` instead of one per grant: what a frontend's first large requests cost) and
    /// caches them page by page, as far as there is room. Linux blkback also maps a request's
    /// new persistent grants with one hypercall. Anything this does not map (a single new
    /// grant, a batch that failed: a read-only or bad grant among them, no room) is left to
    /// [`PersistentCache::get`], one by one, with its fallbacks and errors.
    fn map_missing(&mut self, gnt: &dyn GrantMapper, domid: DomId, segs: &[Segment]) {
        self.forget_detached();
        let mut missing = std::mem::take(&mut self.missing);
        missing.clear();
        missing.extend(
            segs.iter()
                .map(|s| s.gref)
                .filter(|g| !self.entries.contains_key(g)),
        );
        missing.sort_unstable();
        missing.dedup();
        if missing.len() >= 2 {
            let room = self.max.saturating_sub(self.entries.len());
            if room < missing.len() {
                self.evict(missing.len() - room);
            }
            let room = self.max.saturating_sub(self.entries.len());
            missing.truncate(room);
        }
        if missing.len() >= 2 {
            if let Ok(region) = map_counted(gnt, &self.counters, domid, &missing, true) {
                for (i, &g) in missing.iter().enumerate() {
                    let Some(page) = PageOf::new(region.clone(), i) else {
                        break;
                    };
                    self.tick += 1;
                    self.entries.insert(
                        g,
                        Entry {
                            region: Arc::new(page),
                            tick: self.tick,
                            fresh: true,
                        },
                    );
                    add(&self.counters.persistent_grants, 1);
                    add(&self.counters.pgrant_misses, 1);
                }
            }
        }
        self.missing = missing;
    }
}

impl Drop for PersistentCache {
    fn drop(&mut self) {
        sub(&self.counters.persistent_grants, self.entries.len() as u64);
    }
}

/// Zero-copy: the granted pages themselves are the I/O buffer.
pub(crate) struct MapPath {
    pub gnt: Arc<dyn GrantMapper>,
    pub domid: DomId,
    pub counters: Arc<Counters>,
    /// Persistent grants in use (both ends offered them).
    pub cache: Option<PersistentCache>,
    /// Segment and iovec lists of finished buffers, for reuse (a request allocates neither).
    pub spare: Vec<(Vec<GrantSegment>, IovRoom)>,
}

impl GuestData for MapPath {
    type Buf = GrantIoBuf;

    fn prepare(&mut self, segs: &[Segment], disk_read: bool) -> Result<GrantIoBuf, DataError> {
        let (mut parts, iov) = self.spare.pop().unwrap_or_default();
        parts.reserve(segs.len());
        match self.cache.as_mut() {
            Some(cache) => {
                cache.map_missing(&*self.gnt, self.domid, segs);
                for s in segs {
                    let r = cache.get(&*self.gnt, self.domid, s.gref, disk_read)?;
                    parts.push(GrantSegment::new(r, s.offset_bytes(), s.len_bytes()));
                }
            }
            None => {
                let refs: Vec<GrantRef> = segs.iter().map(|s| s.gref).collect();
                let region = map_counted(&*self.gnt, &self.counters, self.domid, &refs, disk_read)?;
                for (i, s) in segs.iter().enumerate() {
                    parts.push(GrantSegment::new(
                        region.clone(),
                        i * PAGE_SIZE + s.offset_bytes(),
                        s.len_bytes(),
                    ));
                }
            }
        }
        Ok(GrantIoBuf::with_iov(parts, iov, disk_read)?)
    }

    fn finish(
        &mut self,
        buf: GrantIoBuf,
        _segs: &[Segment],
        _disk_read: bool,
        _ok: bool,
    ) -> Result<(), DataError> {
        // Unmaps what is not cached (the segments hold the mappings), keeps the list.
        let (mut parts, iov) = buf.into_parts();
        parts.clear();
        if self.spare.len() < 1024 {
            self.spare.push((parts, iov));
        }
        Ok(())
    }

    /// With persistent grants, indirect pages go through the cache like data pages (Linux
    /// blkback maps them with `xen_blkbk_map` and its persistent tree too); otherwise they are
    /// mapped read-only for this request.
    fn read_indirect(
        &mut self,
        refs: &[GrantRef],
        out: &mut [[u8; PAGE_SIZE]],
    ) -> Result<(), DataError> {
        match self.cache.as_mut() {
            Some(cache) => {
                for (&gref, page) in refs.iter().zip(out.iter_mut()) {
                    let r = cache.get(&*self.gnt, self.domid, gref, false)?;
                    r.copy_from(0, page).map_err(PlatformError::from)?;
                }
            }
            None => {
                let region = map_counted(&*self.gnt, &self.counters, self.domid, refs, false)?;
                for (i, page) in out.iter_mut().enumerate().take(refs.len()) {
                    region
                        .copy_from(i * PAGE_SIZE, page)
                        .map_err(PlatformError::from)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use xdisk_blkif::mem::{MemError, SharedMem, VecMem};

    use super::*;

    /// Pages of `VecMem`, each page filled with its grant reference's low byte.
    struct Region {
        mem: VecMem,
    }

    impl SharedMem for Region {
        fn size(&self) -> usize {
            self.mem.size()
        }
        fn read_u32_volatile(&self, o: usize) -> Result<u32, MemError> {
            self.mem.read_u32_volatile(o)
        }
        fn write_u32_volatile(&self, o: usize, v: u32) -> Result<(), MemError> {
            self.mem.write_u32_volatile(o, v)
        }
        fn copy_from(&self, o: usize, dst: &mut [u8]) -> Result<(), MemError> {
            self.mem.copy_from(o, dst)
        }
        fn copy_to(&self, o: usize, src: &[u8]) -> Result<(), MemError> {
            self.mem.copy_to(o, src)
        }
    }

    impl MappedRegion for Region {
        fn writable(&self) -> bool {
            true
        }
        fn io_base(&self) -> *mut u8 {
            std::ptr::null_mut()
        }
    }

    /// Counts map calls (and the grants of each); `bad` grants fail any map that has them.
    #[derive(Default)]
    struct Mapper {
        calls: Mutex<Vec<usize>>,
        bad: Vec<GrantRef>,
        live: Arc<AtomicUsize>,
    }

    impl GrantMapper for Mapper {
        fn map(
            &self,
            _: DomId,
            refs: &[GrantRef],
            _: bool,
        ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
            self.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(refs.len());
            if let Some(&g) = refs.iter().find(|g| self.bad.contains(g)) {
                return Err(PlatformError::Grant {
                    domid: 3,
                    gref: g,
                    status: GrantStatus::BadGntref,
                });
            }
            let mem = VecMem::pages(refs.len());
            for (i, g) in refs.iter().enumerate() {
                mem.copy_to(i * PAGE_SIZE, &[g.to_le_bytes()[0]; PAGE_SIZE])
                    .map_err(PlatformError::from)?;
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(Region { mem }))
        }
        fn copy(&self, _: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
            Ok(())
        }
    }

    fn seg(gref: GrantRef) -> Segment {
        Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
        }
    }

    fn map_path(gnt: Arc<Mapper>, max: usize) -> (MapPath, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let path = MapPath {
            gnt,
            domid: 3,
            counters: counters.clone(),
            cache: Some(PersistentCache::new(max, counters.clone())),
            spare: Vec::new(),
        };
        (path, counters)
    }

    /// Each segment's page, as the buffer sees it: the first byte of each.
    fn first_bytes(buf: &GrantIoBuf) -> Vec<u8> {
        buf.segments()
            .iter()
            .map(|s| {
                let mut b = [0u8; 1];
                s.region.copy_from(s.offset, &mut b).unwrap();
                b[0]
            })
            .collect()
    }

    #[test]
    fn new_persistent_grants_of_a_request_are_mapped_in_one_call() {
        let gnt = Arc::new(Mapper::default());
        let (mut path, c) = map_path(gnt.clone(), 64);
        // 8 new grants (one twice) and then again with two more: one map call each time.
        let segs: Vec<Segment> = [10, 11, 12, 13, 14, 15, 16, 10, 17].map(seg).to_vec();
        let buf = path.prepare(&segs, true).unwrap();
        assert_eq!(first_bytes(&buf), [10, 11, 12, 13, 14, 15, 16, 10, 17]);
        path.finish(buf, &segs, true, true).unwrap();
        assert_eq!(*gnt.calls.lock().unwrap(), [8]);
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        assert_eq!((g(&c.pgrant_misses), g(&c.pgrant_hits)), (8, 1));
        assert_eq!((g(&c.persistent_grants), g(&c.mappings)), (8, 8));
        let segs2: Vec<Segment> = [12, 20, 21, 13].map(seg).to_vec();
        let buf = path.prepare(&segs2, false).unwrap();
        assert_eq!(first_bytes(&buf), [12, 20, 21, 13]);
        path.finish(buf, &segs2, false, true).unwrap();
        assert_eq!(*gnt.calls.lock().unwrap(), [8, 2]);
        assert_eq!((g(&c.pgrant_misses), g(&c.pgrant_hits)), (10, 3));
        // A single new grant is mapped alone, as before.
        let buf = path.prepare(&[seg(30)], false).unwrap();
        path.finish(buf, &[seg(30)], false, true).unwrap();
        assert_eq!(*gnt.calls.lock().unwrap(), [8, 2, 1]);
        assert_eq!(g(&c.persistent_grants), 11);
    }

    #[test]
    fn a_bad_grant_among_new_ones_fails_only_its_request_and_the_rest_stay_usable() {
        let gnt = Arc::new(Mapper {
            bad: vec![7],
            ..Mapper::default()
        });
        let (mut path, c) = map_path(gnt.clone(), 64);
        let segs: Vec<Segment> = [5, 6, 7, 8].map(seg).to_vec();
        assert!(path.prepare(&segs, true).is_err());
        // The batch failed; one by one up to the bad grant, which fails the request.
        assert_eq!(*gnt.calls.lock().unwrap(), [4, 1, 1, 1]);
        let ok: Vec<Segment> = [5, 6, 8].map(seg).to_vec();
        let buf = path.prepare(&ok, true).unwrap();
        assert_eq!(first_bytes(&buf), [5, 6, 8]);
        path.finish(buf, &ok, true, true).unwrap();
        assert_eq!(c.persistent_grants.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn pages_of_a_batch_mapping_are_evicted_one_by_one_and_unmapped_with_the_last() {
        let gnt = Arc::new(Mapper::default());
        let (mut path, c) = map_path(gnt.clone(), 4);
        let segs: Vec<Segment> = [1, 2, 3, 4].map(seg).to_vec();
        let buf = path.prepare(&segs, true).unwrap();
        path.finish(buf, &segs, true, true).unwrap();
        assert_eq!(c.mappings.load(Ordering::SeqCst), 4);
        // Four new grants: the cache makes room by evicting the idle ones (LRU).
        let segs2: Vec<Segment> = [5, 6, 7, 8].map(seg).to_vec();
        let buf = path.prepare(&segs2, true).unwrap();
        assert_eq!(first_bytes(&buf), [5, 6, 7, 8]);
        path.finish(buf, &segs2, true, true).unwrap();
        assert_eq!(c.persistent_grants.load(Ordering::SeqCst), 4);
        // The first mapping went with its last page.
        assert_eq!(c.mappings.load(Ordering::SeqCst), 4);
        assert_eq!(*gnt.calls.lock().unwrap(), [4, 4]);
    }
}
