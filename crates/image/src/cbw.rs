//! Copy-before-write: a point-in-time view of an image that keeps taking writes (what
//! `xdisk backup` exports over NBD while the guest goes on writing).
//!
//! [`CopyBeforeWrite`] is installed as the image's [`WriteObserver`] at the instant (with
//! the image's queues paused). From then on, before a write, write of zeroes or discard
//! changes a granule ([`CopyBeforeWrite::granularity`] bytes) that was not saved yet, the
//! granule's old contents are read from the image (through its backing chain) and written
//! to a scratch storage at the same offset, and the granule is marked saved (one bit per
//! granule: memory bounded by the disk's size, 2 MiB for 1 TiB at 64 KiB). The write waits
//! only for the copy of the granules it changes that were not saved yet, and it does so on a
//! slow-path worker: [`WriteObserver::wants`] answers from the saved bits without a lock, and
//! a write that needs a copy is sent to the slow path by [`Image::map`].
//!
//! [`BackupView`] is the view: a read-only [`Storage`] whose bytes are the image's as of
//! the instant (a saved granule from the scratch, any other from the image itself). A read
//! of the image for a granule not saved yet and the copy of that granule exclude each other
//! (per-granule states under one lock): a reader registers on the granules it reads from
//! the image, a copier waits until no reader is registered on its granule and marks it
//! `copying`, readers wait while a granule they need is being copied. So a read never sees
//! a write made after the instant: the write waits for the copy, the copy for the reader.
//! Nobody waits while holding a granule another waiter needs (a copier claims one granule
//! at a time and waits for nothing during the copy; a reader registers only once none of
//! its granules is being copied), so there is no deadlock.
//!
//! A copy that fails (the scratch's file system full, an I/O error) does not fail the
//! guest's write: it *breaks* the backup instead (QEMU's `on-cbw-error=break-snapshot`
//! rather than its default `break-guest-write`: the guest's disk matters more than one
//! backup). A broken view answers every read with EIO (also a read that was under way when
//! it broke), and the observer stops copying.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use xdisk_io::{Allocation, CacheMode, Storage, StorageRef};

use crate::{Error, Image, Result, WriteObserver};

/// Granules of a run looked up at once by [`BackupView`]'s `allocation` (bounds the time
/// copiers may wait for it).
const STATUS_RUN: u64 = 256;

/// Per-granule state besides the saved bits.
#[derive(Default)]
struct State {
    /// Granules being copied now.
    copying: HashSet<u64>,
    /// Readers of the image (not the scratch) registered on a granule.
    readers: HashMap<u64, u32>,
}

/// The copy-before-write state of one point-in-time view (see the module's documentation).
pub struct CopyBeforeWrite {
    size: u64,
    gran_bits: u32,
    scratch: StorageRef,
    /// One bit per granule: saved to the scratch. Bits only ever go from 0 to 1, set under
    /// `st`'s lock once the copy is in the scratch; read without it by `wants`.
    saved: Vec<AtomicU64>,
    st: Mutex<State>,
    cv: Condvar,
    broken_flag: AtomicBool,
    broken: Mutex<Option<String>>,
    saved_bytes: AtomicU64,
    copies: AtomicU64,
}

impl std::fmt::Debug for CopyBeforeWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyBeforeWrite")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("scratch", &self.scratch.name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CopyBeforeWrite {
    /// The state of a view of a disk of `size` bytes, saving granules of `granularity`
    /// bytes (a power of two from 4 KiB to 64 MiB) to `scratch` at their own offsets
    /// (`scratch` should read zeroes where nothing was written: a sparse file; granules
    /// that read as zeroes are not written to it).
    pub fn new(size: u64, granularity: u64, scratch: StorageRef) -> Result<Arc<CopyBeforeWrite>> {
        if !granularity.is_power_of_two() || !(4096..=(64 << 20)).contains(&granularity) {
            return Err(Error::InvalidArgument(format!(
                "copy-before-write granularity {granularity}: a power of two from 4 KiB to 64 MiB"
            )));
        }
        if scratch.read_only() {
            return Err(Error::InvalidArgument(format!(
                "the scratch storage {} is read-only",
                scratch.name()
            )));
        }
        let gran_bits = granularity.trailing_zeros();
        let granules = size.div_ceil(granularity);
        let words = usize::try_from(granules.div_ceil(64))
            .map_err(|_| Error::NoSpace("a disk too large for this host".into()))?;
        let mut saved = Vec::new();
        saved
            .try_reserve_exact(words)
            .map_err(|_| Error::NoSpace("no memory for the copy-before-write bitmap".into()))?;
        saved.resize_with(words, || AtomicU64::new(0));
        Ok(Arc::new(CopyBeforeWrite {
            size,
            gran_bits,
            scratch,
            saved,
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            broken_flag: AtomicBool::new(false),
            broken: Mutex::new(None),
            saved_bytes: AtomicU64::new(0),
            copies: AtomicU64::new(0),
        }))
    }

    /// Bytes of the disk one saved bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.gran_bits
    }

    /// The disk's size (the view's).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of old data saved so far (granules copied, zero granules included).
    pub fn saved_bytes(&self) -> u64 {
        self.saved_bytes.load(Ordering::Relaxed)
    }

    /// Granules copied so far.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }

    /// Why the view broke (a copy failed), if it did.
    pub fn broken(&self) -> Option<String> {
        if !self.broken_flag.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.broken).clone()
    }

    /// Breaks the view (every read fails from now on, nothing more is copied).
    pub fn break_view(&self, why: &str) {
        {
            let mut b = lock(&self.broken);
            if b.is_none() {
                *b = Some(why.to_owned());
            }
        }
        self.broken_flag.store(true, Ordering::Release);
        tracing::error!("the point-in-time view broke: {why}");
        // Wake whoever waits (they see the flag).
        let _st = lock(&self.st);
        self.cv.notify_all();
    }

    /// The read-only view of `image` (the image this state observes) as of the instant.
    pub fn view(self: &Arc<Self>, image: Arc<Image>) -> Arc<BackupView> {
        Arc::new(BackupView {
            cbw: self.clone(),
            name: format!("point-in-time view of {}", image.storage().name()),
            image,
        })
    }

    fn is_saved(&self, g: u64) -> bool {
        self.saved
            .get((g / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (g % 64)) != 0)
    }

    fn mark_saved(&self, g: u64) {
        if let Some(w) = self.saved.get((g / 64) as usize) {
            w.fetch_or(1 << (g % 64), Ordering::AcqRel);
        }
    }

    /// The granules `[first, last]` that `[offset, offset + len)` touches, clipped to the
    /// size (`None`: none).
    fn granules(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.gran_bits, (end - 1) >> self.gran_bits))
    }

    /// The byte range of granule `g`.
    fn range_of(&self, g: u64) -> (u64, u64) {
        let off = g << self.gran_bits;
        (off, self.granularity().min(self.size - off))
    }

    /// Copies granule `g` (claimed: `copying`) from `image` to the scratch.
    fn copy(&self, image: &Image, g: u64, buf: &mut Vec<u8>) -> std::result::Result<(), String> {
        let (off, len) = self.range_of(g);
        buf.clear();
        buf.resize(len as usize, 0);
        image
            .read_at(buf, off)
            .map_err(|e| format!("reading the old data at {off}+{len}: {e}"))?;
        if buf.iter().any(|&b| b != 0) {
            self.scratch.write_at(buf, off).map_err(|e| {
                format!(
                    "saving the old data at {off}+{len} to {}: {e}",
                    self.scratch.name()
                )
            })?;
        }
        Ok(())
    }

    /// Waits (lock held) until no granule of `[g0, g1]` is being copied; false if the view
    /// broke meanwhile.
    fn wait_no_copy<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        g0: u64,
        g1: u64,
    ) -> Option<MutexGuard<'a, State>> {
        loop {
            if self.broken_flag.load(Ordering::Acquire) {
                return None;
            }
            if !st.copying.iter().any(|&g| g >= g0 && g <= g1) {
                return Some(st);
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn unregister(&self, held: &[u64]) {
        if held.is_empty() {
            return;
        }
        let mut st = lock(&self.st);
        for g in held {
            if let Some(n) = st.readers.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    st.readers.remove(g);
                }
            }
        }
        self.cv.notify_all();
    }

    fn eio() -> io::Error {
        io::Error::from_raw_os_error(libc::EIO)
    }

    /// Reads `buf.len()` bytes at `off` of the view of `image` (see [`BackupView`]).
    fn read_view(&self, image: &Image, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.broken_flag.load(Ordering::Acquire) {
            return Err(Self::eio());
        }
        let len = buf.len() as u64;
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        // Past the end reads as zeroes (the Storage contract).
        let in_end = end.min(self.size);
        if in_end < end {
            let from = in_end.saturating_sub(off) as usize;
            buf[from..].fill(0);
        }
        let Some((g0, g1)) = self.granules(off, in_end.saturating_sub(off)) else {
            return Ok(());
        };
        // Register on the granules read from the image, once none is being copied.
        let mut held = Vec::new();
        {
            let st = self.wait_no_copy(lock(&self.st), g0, g1);
            let Some(mut st) = st else {
                return Err(Self::eio());
            };
            for g in g0..=g1 {
                if !self.is_saved(g) {
                    *st.readers.entry(g).or_insert(0) += 1;
                    held.push(g);
                }
            }
        }
        let r = (|| -> io::Result<()> {
            // Runs of granules from the same place: one read each.
            let mut g = g0;
            while g <= g1 {
                let saved = self.is_saved(g);
                let mut h = g;
                while h < g1 && self.is_saved(h + 1) == saved {
                    h += 1;
                }
                let from = (g << self.gran_bits).max(off);
                let to = ((h + 1) << self.gran_bits).min(in_end);
                let part = &mut buf[(from - off) as usize..(to - off) as usize];
                if saved {
                    self.scratch.read_at(part, from)?;
                } else {
                    image.read_at(part, from).map_err(|e| match e {
                        Error::Io { source, .. } => source,
                        e => io::Error::other(e.to_string()),
                    })?;
                }
                g = h + 1;
            }
            Ok(())
        })();
        self.unregister(&held);
        r?;
        // A copy that failed while this read ran let the guest's write go on: what was read
        // from the image may be newer than the instant.
        if self.broken_flag.load(Ordering::Acquire) {
            return Err(Self::eio());
        }
        Ok(())
    }

    /// The first run of the view at `off` (see [`BackupView`]'s `allocation`).
    fn allocation_view(&self, image: &Image, off: u64, len: u64) -> Allocation {
        let data = Allocation::Data { len };
        if self.broken_flag.load(Ordering::Acquire) {
            return data;
        }
        let Some((g0, g1)) = self.granules(off, len) else {
            return data;
        };
        let in_end = off.saturating_add(len).min(self.size);
        let g1 = g1.min(g0 + STATUS_RUN - 1);
        let Some(mut st) = self.wait_no_copy(lock(&self.st), g0, g1) else {
            return data;
        };
        let saved = self.is_saved(g0);
        let mut h = g0;
        while h < g1 && self.is_saved(h + 1) == saved {
            h += 1;
        }
        let run_end = ((h + 1) << self.gran_bits).min(in_end);
        if saved {
            // Saved data (or zeroes that were skipped): data, as the scratch cannot tell
            // which.
            return Allocation::Data { len: run_end - off };
        }
        for g in g0..=h {
            *st.readers.entry(g).or_insert(0) += 1;
        }
        drop(st);
        let held: Vec<u64> = (g0..=h).collect();
        let status = image.block_status(off, run_end - off);
        self.unregister(&held);
        match status {
            Ok(s) if s.zero && !s.data => Allocation::Hole {
                len: s.len.clamp(1, run_end - off),
            },
            Ok(s) => Allocation::Data {
                len: s.len.clamp(1, run_end - off),
            },
            Err(_) => Allocation::Data { len: run_end - off },
        }
    }
}

impl WriteObserver for CopyBeforeWrite {
    fn wants(&self, offset: u64, len: u64) -> bool {
        if self.broken_flag.load(Ordering::Relaxed) {
            return false;
        }
        match self.granules(offset, len) {
            Some((g0, g1)) => (g0..=g1).any(|g| !self.is_saved(g)),
            None => false,
        }
    }

    fn before_write(&self, image: &Image, offset: u64, len: u64) {
        let Some((g0, g1)) = self.granules(offset, len) else {
            return;
        };
        let mut buf = Vec::new();
        for g in g0..=g1 {
            if self.broken_flag.load(Ordering::Acquire) {
                return;
            }
            if self.is_saved(g) {
                continue;
            }
            // Claim the granule: nobody copies it, nobody reads it from the image.
            {
                let mut st = lock(&self.st);
                loop {
                    if self.broken_flag.load(Ordering::Acquire) {
                        return;
                    }
                    if self.is_saved(g) {
                        break;
                    }
                    if !st.copying.contains(&g) && !st.readers.contains_key(&g) {
                        st.copying.insert(g);
                        break;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if self.is_saved(g) {
                    continue;
                }
            }
            let r = self.copy(image, g, &mut buf);
            {
                let mut st = lock(&self.st);
                st.copying.remove(&g);
                if r.is_ok() {
                    self.mark_saved(g);
                    self.saved_bytes
                        .fetch_add(self.range_of(g).1, Ordering::Relaxed);
                    self.copies.fetch_add(1, Ordering::Relaxed);
                }
                self.cv.notify_all();
            }
            if let Err(e) = r {
                self.break_view(&e);
                return;
            }
        }
    }
}

/// The point-in-time view of an image (see the module's documentation): a read-only
/// [`Storage`] of the image's size, to be opened as a raw [`Image`]
/// ([`Image::open_on`]) and served (the NBD export of `xdisk backup`). `allocation` answers
/// from the image for granules not saved yet (a hole where it reads as zeroes, looked up
/// with the granules held like a read), data for saved ones.
pub struct BackupView {
    cbw: Arc<CopyBeforeWrite>,
    image: Arc<Image>,
    name: String,
}

impl std::fmt::Debug for BackupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupView")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl BackupView {
    /// Its copy-before-write state.
    pub fn cbw(&self) -> &Arc<CopyBeforeWrite> {
        &self.cbw
    }
}

fn read_only_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl Storage for BackupView {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.name)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.cbw.size)
    }
    fn set_size(&self, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.cbw.read_view(&self.image, buf, off)
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn write_zeroes(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn preallocate(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn allocation(&self, off: u64, len: u64) -> Allocation {
        self.cbw.allocation_view(&self.image, off, len)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn cache(&self) -> CacheMode {
        CacheMode::WriteBack
    }
    fn is_broken(&self) -> bool {
        self.cbw.broken_flag.load(Ordering::Acquire)
    }
    fn mark_broken(&self, err: &io::Error) {
        self.cbw.break_view(&err.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenOptions;
    use xdisk_io::MemStorage;

    fn mem(name: &str, data: Vec<u8>) -> StorageRef {
        Arc::new(MemStorage::new(name, data, false))
    }

    fn raw(data: Vec<u8>) -> Arc<Image> {
        Image::open_on(
            mem("disk", data),
            &OpenOptions {
                format: Some(crate::Format::Raw),
                ..OpenOptions::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn the_view_keeps_the_instant_while_the_image_changes() {
        let size = 1 << 20;
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        let img = raw(old.clone());
        let cbw = CopyBeforeWrite::new(size as u64, 65536, mem("scratch", Vec::new())).unwrap();
        img.set_write_observer(Some(cbw.clone()));
        let view = cbw.view(img.clone());
        assert!(cbw.wants(0, 1));
        // The fast path sends writes that need a copy to the slow path.
        let mut ext = Vec::new();
        assert!(matches!(
            img.map(0, 4096, true, &mut ext).unwrap(),
            crate::Mapping::Slow
        ));
        assert!(matches!(
            img.map(0, 4096, false, &mut ext).unwrap(),
            crate::Mapping::Mapped(_)
        ));
        img.write_at(&[0xaa; 4096], 70000).unwrap();
        img.write_zeroes(200_000, 100_000, false).unwrap();
        img.discard(900_000, 65536).unwrap();
        assert!(!cbw.wants(65536, 65536));
        assert!(cbw.wants(0, 65536));
        let mut got = vec![0u8; size];
        view.read_at(&mut got, 0).unwrap();
        assert!(got == old, "the view changed");
        // Unaligned reads across saved and live granules.
        let mut part = vec![0u8; 300_000];
        view.read_at(&mut part, 12345).unwrap();
        assert!(part[..] == old[12345..312_345]);
        // The image itself changed.
        let mut now = vec![0u8; 4096];
        img.read_at(&mut now, 70000).unwrap();
        assert_eq!(now, vec![0xaa; 4096]);
        assert_eq!(cbw.copies(), 1 + 3 + 1);
        assert!(view.write_at(&[1], 0).is_err());
        img.set_write_observer(None);
        img.write_at(&[0xbb; 10], 0).unwrap();
        assert_eq!(cbw.copies(), 5, "removed observer still called");
    }

    #[test]
    fn zero_granules_skip_the_scratch_and_a_broken_view_fails_reads_not_writes() {
        let size = 256 << 10;
        let mut old = vec![0u8; size];
        old[65536..131072].fill(7);
        let img = raw(old.clone());
        let cbw = CopyBeforeWrite::new(size as u64, 65536, mem("s", Vec::new())).unwrap();
        img.set_write_observer(Some(cbw.clone()));
        let view = cbw.view(img.clone());
        // A zero granule: copied without touching the scratch.
        img.write_at(&[1; 512], 0).unwrap();
        assert!(cbw.broken().is_none());
        let mut b = vec![1u8; 65536];
        view.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            view.allocation(65536, 65536),
            Allocation::Data { len: 65536 }
        );
        assert!(cbw.broken().is_none());
        // Broken (as by a failed copy): the write still goes through, reads fail.
        cbw.break_view("test");
        img.write_at(&[2; 512], 65536).unwrap();
        let mut now = [0u8; 512];
        img.read_at(&mut now, 65536).unwrap();
        assert_eq!(now, [2; 512]);
        assert!(view.read_at(&mut b, 0).is_err());
        assert_eq!(cbw.broken().as_deref(), Some("test"));
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_later_data() {
        let size: usize = 4 << 20;
        let old: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 | 1).collect();
        let img = raw(old.clone());
        let cbw = CopyBeforeWrite::new(size as u64, 65536, mem("s", Vec::new())).unwrap();
        img.set_write_observer(Some(cbw.clone()));
        let view = cbw.view(img.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for t in 0..3u64 {
            let img = img.clone();
            let stop = stop.clone();
            writers.push(std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (size as u64 - 8192);
                    img.write_at(&[0u8; 8192], off).unwrap();
                }
            }));
        }
        for _ in 0..20 {
            let mut got = vec![0u8; size];
            view.read_at(&mut got, 0).unwrap();
            assert!(got == old, "a read of the view saw a later write");
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(cbw.copies() > 0);
    }
}
