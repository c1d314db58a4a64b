//! Moving request data between granted guest pages and the image: by mapping the pages
//! ([`MapPath`], zero copy, optionally with persistent grants) or by grant copies through a
//! bounce buffer ([`CopyPath`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use xdisk_blkif::wire::{Segment, PAGE_SIZE};
use xdisk_io::{AlignedBuf, IoBuf};
use xdisk_xen::iobuf::{GrantIoBuf, GrantSegment};
use xdisk_xen::platform::{
    CopyDir, DomId, GrantCopyOp, GrantMapper, GrantRef, GrantStatus, MappedRegion, PlatformError,
};

use crate::region::map_counted;
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
    entries: HashMap<GrantRef, (Arc<dyn MappedRegion>, u64), BuildHasherDefault<GrefHasher>>,
    tick: u64,
    counters: Arc<Counters>,
}

impl PersistentCache {
    pub fn new(max: usize, counters: Arc<Counters>) -> PersistentCache {
        PersistentCache {
            max,
            entries: HashMap::default(),
            tick: 0,
            counters,
        }
    }

    /// Drops the least recently used mappings that no request is using, at least `need` of
    /// them if possible (and a sixteenth of the cache, to purge in batches).
    fn evict(&mut self, need: usize) {
        let mut idle: Vec<(u64, GrantRef)> = self
            .entries
            .iter()
            .filter(|(_, (r, _))| Arc::strong_count(r) == 1)
            .map(|(g, (_, t))| (*t, *g))
            .collect();
        idle.sort_unstable();
        let n = need.max(self.max / 16).max(1);
        for (_, g) in idle.into_iter().take(n) {
            self.entries.remove(&g);
            sub(&self.counters.persistent_grants, 1);
        }
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
        if let Some((r, t)) = self.entries.get_mut(&gref) {
            *t = self.tick;
            add(&self.counters.pgrant_hits, 1);
            return Ok(r.clone());
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
            self.entries.insert(gref, (region.clone(), self.tick));
            add(&self.counters.persistent_grants, 1);
        }
        Ok(region)
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
    /// Segment lists of finished buffers, for reuse.
    pub spare: Vec<Vec<GrantSegment>>,
}

impl GuestData for MapPath {
    type Buf = GrantIoBuf;

    fn prepare(&mut self, segs: &[Segment], disk_read: bool) -> Result<GrantIoBuf, DataError> {
        let mut parts = self.spare.pop().unwrap_or_default();
        parts.reserve(segs.len());
        match self.cache.as_mut() {
            Some(cache) => {
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
        Ok(GrantIoBuf::new(parts, disk_read)?)
    }

    fn finish(
        &mut self,
        buf: GrantIoBuf,
        _segs: &[Segment],
        _disk_read: bool,
        _ok: bool,
    ) -> Result<(), DataError> {
        // Unmaps what is not cached (the segments hold the mappings), keeps the list.
        let mut parts = buf.into_segments();
        parts.clear();
        if self.spare.len() < 1024 {
            self.spare.push(parts);
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
