//! The simulated grant table: entries in shared memory, as `grant_entry_v1` of
//! xen/include/public/grant_table.h, and the hypervisor side that maps and copies them.
//!
//! ```text
//! struct grant_entry_v1 {
//!     uint16_t flags;   /* GTF_xxx: various type and flag information.  [XEN,GST] */
//!     domid_t  domid;   /* The domain being granted foreign privileges. [GST]     */
//!     uint32_t frame;   /* The page frame being granted.                [GST]     */
//! };
//! ```
//!
//! An entry is 8 bytes; the simulation reads and updates it as one little-endian 64-bit atomic
//! word (flags in bits 0..16, domid in 16..32, frame in 32..64). The "hypervisor" reads an
//! entry *once* into a local copy, validates the copy, and then sets `GTF_reading` (and
//! `GTF_writing` for writable access) with a compare-and-exchange against that copy, as Xen's
//! `_set_status_v1` does: a guest changing the entry concurrently makes the exchange fail and
//! the check repeat, never a use of an unchecked value. Pins are counted privately per entry
//! (Xen's "active entries"); the flags are cleared when the last pin goes, so the guest's
//! `end_grant` (Linux `gnttab_end_foreign_access_ref`) fails while a mapping exists.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::mem::{Memfd, MmapRegion, PAGE_SIZE};
use xdisk_xen::platform::{
    page_span, CopyDir, DomId, GrantCopyOp, GrantMapper, GrantRef, GrantStatus, MappedRegion,
    MemError, PlatformError, SharedMem,
};

/// `GTF_invalid`: the entry grants nothing.
pub const GTF_INVALID: u16 = 0;
/// `GTF_permit_access`: allow `domid` to map/access `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_accept_transfer` (not supported by the simulation: never valid for map/copy).
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// `GTF_transitive` (v2 only; never valid here).
pub const GTF_TRANSITIVE: u16 = 3;
/// `GTF_type_mask`.
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_readonly`: restrict `domid` to read-only mappings and accesses. (set by the guest)
pub const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading`: the entry is currently mapped for reading by `domid`. (set by Xen)
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: the entry is currently mapped for writing by `domid`. (set by Xen)
pub const GTF_WRITING: u16 = 1 << 4;
/// `GTF_sub_page` (v2 only; an entry with it is never valid here).
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// Size of one `grant_entry_v1`.
pub const GRANT_ENTRY_SIZE: usize = 8;
/// Grant entries of a domain created by [`super::SimXen::create_domain`]: 32 grant frames of
/// 512 v1 entries (Linux's default `gnttab_max_frames`).
pub const DEFAULT_GRANT_ENTRIES: u32 = 32 * 512;
/// Grant references the guest allocator never hands out (Linux `GNTTAB_NR_RESERVED_ENTRIES`:
/// 0 and 1 are the console and xenstore rings).
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;
/// Most pages [`GrantMapper::map`] maps at once.
pub const MAX_MAP_PAGES: usize = 4096;
/// How often the hypervisor retries an entry that keeps changing under it before failing
/// with `GNTST_general_error` (Xen gives up after 4 retries too).
const PIN_RETRIES: u32 = 5;

/// A decoded `grant_entry_v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantEntry {
    /// `GTF_*` type and flags: the guest sets the type ([`GTF_PERMIT_ACCESS`]) and
    /// [`GTF_READONLY`], the hypervisor [`GTF_READING`]/[`GTF_WRITING`] while the page is in use.
    pub flags: u16,
    /// The domain being given access to the page.
    pub domid: DomId,
    /// The granted page: a page index into the granting domain's memory (a GFN in Xen).
    pub frame: u32,
}

impl GrantEntry {
    /// The entry as its in-memory 64-bit word value (little-endian layout).
    pub fn to_word(self) -> u64 {
        u64::from(self.flags) | (u64::from(self.domid) << 16) | (u64::from(self.frame) << 32)
    }

    /// Decodes an entry from its 64-bit word (the inverse of [`GrantEntry::to_word`]).
    pub fn from_word(w: u64) -> GrantEntry {
        GrantEntry {
            flags: w as u16,
            domid: (w >> 16) as u16,
            frame: (w >> 32) as u32,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Pins of one entry held by the hypervisor (maps and copies in progress).
#[derive(Debug, Default, Clone, Copy)]
struct Pin {
    total: u32,
    writers: u32,
}

/// One simulated domain's memory and grant table (shared by [`super::SimDomain`], mappers and
/// mappings; it outlives `destroy_domain` while any of them holds it).
#[derive(Debug)]
pub(crate) struct DomainMem {
    pub(crate) domid: DomId,
    pub(crate) pages: usize,
    pub(crate) mem: Memfd,
    /// The guest's grant table (a writable mapping of its own memfd).
    table: MmapRegion,
    pub(crate) entries: u32,
    pins: Mutex<HashMap<GrantRef, Pin>>,
    pub(crate) alive: AtomicBool,
    /// The guest's allocator of free grant references.
    free: Mutex<std::collections::BTreeSet<GrantRef>>,
}

impl DomainMem {
    pub(crate) fn new(domid: DomId, pages: usize, entries: u32) -> std::io::Result<DomainMem> {
        let size = (pages as u64)
            .checked_mul(PAGE_SIZE as u64)
            .ok_or_else(|| std::io::Error::other("domain memory size overflows"))?;
        let mem = Memfd::new(c"xdisk-sim-guest-memory", size)?;
        let table_bytes = (entries as usize * GRANT_ENTRY_SIZE).next_multiple_of(PAGE_SIZE);
        let table_fd = Memfd::new(c"xdisk-sim-grant-table", table_bytes as u64)?;
        let table = table_fd.map(0, table_bytes / PAGE_SIZE, true)?;
        Ok(DomainMem {
            domid,
            pages,
            mem,
            table,
            entries,
            pins: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            free: Mutex::new((GNTTAB_NR_RESERVED_ENTRIES.min(entries)..entries).collect()),
        })
    }

    fn entry(&self, gref: GrantRef) -> Option<&AtomicU64> {
        if gref >= self.entries {
            return None;
        }
        self.table.atomic_u64(gref as usize * GRANT_ENTRY_SIZE).ok()
    }

    // ---- guest side ----

    pub(crate) fn load_entry(&self, gref: GrantRef) -> Option<GrantEntry> {
        self.entry(gref)
            .map(|e| GrantEntry::from_word(u64::from_le(e.load(Ordering::Acquire))))
    }

    pub(crate) fn store_entry(&self, gref: GrantRef, entry: GrantEntry) -> bool {
        match self.entry(gref) {
            Some(e) => {
                e.store(entry.to_word().to_le(), Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Allocates a grant reference and fills it in (frame and domid first, then flags: one
    /// release store of the whole entry).
    pub(crate) fn grant(&self, frame: u32, to: DomId, readonly: bool) -> Option<GrantRef> {
        let gref = lock(&self.free).pop_first()?;
        let mut flags = GTF_PERMIT_ACCESS;
        if readonly {
            flags |= GTF_READONLY;
        }
        self.store_entry(
            gref,
            GrantEntry {
                flags,
                domid: to,
                frame,
            },
        );
        Some(gref)
    }

    /// `gnttab_end_foreign_access_ref`: clears the flags unless the entry is mapped
    /// (`GTF_reading`/`GTF_writing`), with a compare-and-exchange so a concurrent map either
    /// sees the revoked entry or makes this fail. `None` for a bad reference.
    pub(crate) fn end_grant(&self, gref: GrantRef) -> Option<bool> {
        let e = self.entry(gref)?;
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let ent = GrantEntry::from_word(u64::from_le(cur));
            if ent.flags & (GTF_READING | GTF_WRITING) != 0 {
                return Some(false);
            }
            let new = GrantEntry { flags: 0, ..ent }.to_word().to_le();
            match e.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if gref >= GNTTAB_NR_RESERVED_ENTRIES {
            lock(&self.free).insert(gref);
        }
        Some(true)
    }

    // ---- hypervisor side ----

    /// Pins `gref` for access by `mapper` (writes if `write`): reads the entry once, checks
    /// the copy, sets `GTF_reading` (and `GTF_writing`) by compare-and-exchange against the
    /// copy. Returns the frame of the checked copy.
    fn pin(&self, mapper: DomId, gref: GrantRef, write: bool) -> Result<u32, GrantStatus> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(GrantStatus::BadDomain);
        }
        let e = self.entry(gref).ok_or(GrantStatus::BadGntref)?;
        let mut pins = lock(&self.pins);
        let mut cur = e.load(Ordering::Acquire);
        for _ in 0..PIN_RETRIES {
            let snap = GrantEntry::from_word(u64::from_le(cur));
            if snap.flags & (GTF_TYPE_MASK | GTF_SUB_PAGE) != GTF_PERMIT_ACCESS
                || snap.domid != mapper
            {
                return Err(GrantStatus::PermissionDenied);
            }
            if write && snap.flags & GTF_READONLY != 0 {
                return Err(GrantStatus::PermissionDenied);
            }
            if snap.frame as usize >= self.pages {
                // Xen: the frame is not a page of the granting domain (GNTST_bad_page).
                return Err(GrantStatus::GeneralError);
            }
            let mut flags = snap.flags | GTF_READING;
            if write {
                flags |= GTF_WRITING;
            }
            let new = GrantEntry { flags, ..snap }.to_word().to_le();
            match e.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let p = pins.entry(gref).or_default();
                    p.total += 1;
                    if write {
                        p.writers += 1;
                    }
                    return Ok(snap.frame);
                }
                Err(now) => cur = now,
            }
        }
        // "Shared grant entry is unstable".
        Err(GrantStatus::GeneralError)
    }

    /// Drops one pin taken by [`DomainMem::pin`]; clears `GTF_writing` with the last writer
    /// and `GTF_reading` with the last pin.
    fn unpin(&self, gref: GrantRef, write: bool) {
        let mut pins = lock(&self.pins);
        let Some(p) = pins.get_mut(&gref) else {
            return;
        };
        p.total = p.total.saturating_sub(1);
        if write {
            p.writers = p.writers.saturating_sub(1);
        }
        let mut clear = 0u16;
        if p.writers == 0 {
            clear |= GTF_WRITING;
        }
        if p.total == 0 {
            clear |= GTF_READING | GTF_WRITING;
            pins.remove(&gref);
        }
        if let Some(e) = self.entry(gref) {
            e.fetch_and((!u64::from(clear)).to_le(), Ordering::AcqRel);
        }
    }

    /// Number of pins held on `gref` (maps and copies in progress).
    pub(crate) fn pin_count(&self, gref: GrantRef) -> u32 {
        lock(&self.pins).get(&gref).map_or(0, |p| p.total)
    }
}

/// The pins of one mapping, a grant per page (`None` once detached); released on drop.
struct PinGuard {
    dom: Arc<DomainMem>,
    refs: Vec<Option<GrantRef>>,
    write: bool,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        for &r in self.refs.iter().flatten() {
            self.dom.unpin(r, self.write);
        }
    }
}

/// A grant mapping made by [`SimGrantMapper::map`]: the pages are unmapped first, then the
/// pins dropped (field order), as Xen clears `GTF_reading`/`GTF_writing` on unmap. Any part
/// can be detached ([`MappedRegion::detach`], as a PV domain's gntdev can): those pages are
/// replaced by private memory and their pins dropped at once.
struct SimMapping {
    region: MmapRegion,
    pins: Mutex<PinGuard>,
    /// Whether any page was detached (spares the lock on the data path).
    any_detached: AtomicBool,
}

impl SharedMem for SimMapping {
    fn size(&self) -> usize {
        self.region.size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        self.region.read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.region.write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.region.copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.region.copy_to(offset, src)
    }
}

impl MappedRegion for SimMapping {
    fn writable(&self) -> bool {
        self.region.is_writable()
    }
    fn io_base(&self) -> *mut u8 {
        self.region.io_base()
    }
    fn can_detach(&self, offset: usize, len: usize) -> bool {
        page_span(offset, len, self.size()).is_ok()
    }
    fn detach(&self, offset: usize, len: usize) -> Result<(), PlatformError> {
        let (first, end) = page_span(offset, len, self.size())?;
        let mut pins = lock(&self.pins);
        if pins.refs[first..end].iter().all(Option::is_none) {
            return Ok(());
        }
        self.region
            .replace_with_private(first, end)
            .map_err(|source| PlatformError::Io {
                context: "mmap(MAP_FIXED) over a grant mapping".into(),
                source,
            })?;
        // Unmapped: as Xen on unmap, the grants' pins go (GTF_reading/GTF_writing cleared
        // with the last).
        self.any_detached.store(true, Ordering::Release);
        let (dom, write) = (pins.dom.clone(), pins.write);
        for r in pins.refs[first..end].iter_mut() {
            if let Some(g) = r.take() {
                dom.unpin(g, write);
            }
        }
        Ok(())
    }
    fn is_detached(&self, offset: usize, len: usize) -> bool {
        if !self.any_detached.load(Ordering::Acquire) {
            return false;
        }
        let Ok((first, end)) = page_span(offset, len, self.size()) else {
            return false;
        };
        lock(&self.pins).refs[first..end]
            .iter()
            .any(Option::is_none)
    }
}

/// The domains known to the simulated hypervisor.
#[derive(Debug, Default)]
pub(crate) struct Hypervisor {
    pub(crate) domains: RwLock<HashMap<DomId, Arc<DomainMem>>>,
}

impl Hypervisor {
    pub(crate) fn domain(&self, domid: DomId) -> Option<Arc<DomainMem>> {
        self.domains
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&domid)
            .cloned()
    }
}

/// [`GrantMapper`] of the simulation for the backend domain `domid`
/// (`GNTTABOP_map_grant_ref` / `GNTTABOP_copy` as that domain).
///
/// Statuses: an unknown or destroyed granting domain is `BadDomain`; a reference past the
/// table `BadGntref`; an entry that is not `GTF_permit_access` for us (revoked, another
/// domain's, garbage type, `GTF_sub_page`) or read-only for a write `PermissionDenied`; a
/// frame outside the granting domain's memory, or an entry that keeps changing, `GeneralError`
/// (real Xen reports `GNTST_general_error` for most of these; callers should treat every
/// status but `Okay` as "not usable"); a copy past the page `BadCopyArg`. A map of no pages
/// or of more than [`MAX_MAP_PAGES`] fails with [`PlatformError::TooLarge`].
pub struct SimGrantMapper {
    hyp: Arc<Hypervisor>,
    domid: DomId,
}

impl SimGrantMapper {
    pub(crate) fn new(hyp: Arc<Hypervisor>, domid: DomId) -> SimGrantMapper {
        SimGrantMapper { hyp, domid }
    }

    /// The domain this mapper acts as.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    fn copy_one(&self, op: &mut GrantCopyOp<'_>) -> GrantStatus {
        let Some(dom) = self.hyp.domain(op.domid) else {
            return GrantStatus::BadDomain;
        };
        let len = match &op.dir {
            CopyDir::FromForeign(d) => d.len(),
            CopyDir::ToForeign(s) => s.len(),
        };
        if usize::from(op.offset) + len > PAGE_SIZE {
            return GrantStatus::BadCopyArg;
        }
        let write = matches!(op.dir, CopyDir::ToForeign(_));
        let frame = match dom.pin(self.domid, op.gref, write) {
            Ok(f) => f,
            Err(s) => return s,
        };
        let at = u64::from(frame) * PAGE_SIZE as u64 + u64::from(op.offset);
        let r = match &mut op.dir {
            CopyDir::FromForeign(d) => dom.mem.read_at(at, d),
            CopyDir::ToForeign(s) => dom.mem.write_at(at, s),
        };
        dom.unpin(op.gref, write);
        match r {
            Ok(()) => GrantStatus::Okay,
            Err(_) => GrantStatus::GeneralError,
        }
    }
}

impl GrantMapper for SimGrantMapper {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
        if refs.is_empty() || refs.len() > MAX_MAP_PAGES {
            return Err(PlatformError::TooLarge(refs.len()));
        }
        let err = |gref, status| PlatformError::Grant {
            domid,
            gref,
            status,
        };
        let dom = self
            .hyp
            .domain(domid)
            .ok_or_else(|| err(refs[0], GrantStatus::BadDomain))?;
        let mut guard = PinGuard {
            dom: dom.clone(),
            refs: Vec::with_capacity(refs.len()),
            write: writable,
        };
        let mut frames = Vec::with_capacity(refs.len());
        for &r in refs {
            // On failure, `guard` drops the pins taken so far.
            let frame = dom.pin(self.domid, r, writable).map_err(|s| err(r, s))?;
            guard.refs.push(Some(r));
            frames.push(u64::from(frame));
        }
        let region = dom
            .mem
            .map_pages(&frames, writable)
            .map_err(|source| PlatformError::Io {
                context: format!("mapping {} grants of domain {domid}", refs.len()),
                source,
            })?;
        Ok(Arc::new(SimMapping {
            region,
            pins: Mutex::new(guard),
            any_detached: AtomicBool::new(false),
        }))
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        for op in ops.iter_mut() {
            op.status = self.copy_one(op);
        }
        Ok(())
    }
}
