//! Test helpers shared by the integration tests: temp files that accept O_DIRECT, a
//! multi-segment test buffer and engine construction without fallback.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use xdisk_io::engine::{NativeEngine, ThreadsEngine, UringEngine};
use xdisk_io::{AioKind, AlignedBuf, CacheMode, Engine, EngineConfig, ImageFile, IoBuf};

/// Alignment of every buffer, offset and length in the engine tests (O_DIRECT safe).
pub const BLOCK: usize = 4096;

/// A temporary directory on a filesystem that supports O_DIRECT: the system temp dir when
/// it does (tmpfs may not), else the target directory's tmp.
pub fn direct_capable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let probe = dir.path().join("probe");
    std::fs::write(&probe, [0u8; BLOCK]).unwrap();
    if ImageFile::open(&probe, false, CacheMode::None).is_ok() {
        return dir;
    }
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir in target")
}

/// A file of `size` bytes (sparse, zero) in its own temp dir, opened with `cache`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub file: ImageFile,
}

impl Fixture {
    pub fn new(cache: CacheMode, size: u64) -> Fixture {
        Self::with_contents(cache, size, None)
    }

    pub fn with_contents(cache: CacheMode, size: u64, contents: Option<&[u8]>) -> Fixture {
        let dir = direct_capable_dir();
        let path = dir.path().join("disk.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        if let Some(c) = contents {
            use std::os::unix::fs::FileExt;
            f.write_all_at(c, 0).unwrap();
        }
        drop(f);
        let file = ImageFile::open(&path, false, cache).expect("open image file");
        Fixture { dir, path, file }
    }

    pub fn fd(&self) -> i32 {
        self.file.fd()
    }

    /// The file's bytes, read through a separate buffered descriptor.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A buffer made of several separately allocated aligned segments (a vectored I/O buffer),
/// optionally counting its drops.
pub struct SegBuf {
    segs: Vec<AlignedBuf>,
    iov: Vec<libc::iovec>,
    drops: Option<Arc<AtomicUsize>>,
}

// SAFETY: the iovec array only describes the segments this value owns.
unsafe impl Send for SegBuf {}

// SAFETY: each segment is a heap allocation that does not move when the SegBuf moves; the
// iovecs are rebuilt from the segments on every call.
unsafe impl IoBuf for SegBuf {
    fn iovecs(&mut self) -> &[libc::iovec] {
        self.iov.clear();
        for s in &mut self.segs {
            self.iov.push(libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            });
        }
        &self.iov
    }
    fn total_len(&self) -> usize {
        self.segs.iter().map(|s| s.len()).sum()
    }
}

impl SegBuf {
    /// Zeroed segments of the given lengths.
    pub fn zeroed(lens: &[usize]) -> SegBuf {
        SegBuf {
            segs: lens.iter().map(|&l| AlignedBuf::new(l, BLOCK)).collect(),
            iov: Vec::with_capacity(lens.len()),
            drops: None,
        }
    }

    /// Segments of the given lengths holding `data` (whose length is their sum).
    pub fn from_data(data: &[u8], lens: &[usize]) -> SegBuf {
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let mut b = Self::zeroed(lens);
        let mut pos = 0;
        for s in &mut b.segs {
            let n = s.len();
            s.copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        b
    }

    pub fn counting(mut self, drops: &Arc<AtomicUsize>) -> SegBuf {
        self.drops = Some(Arc::clone(drops));
        self
    }

    /// The bytes of all segments, concatenated.
    pub fn to_vec(&self) -> Vec<u8> {
        self.segs.iter().flat_map(|s| s.iter().copied()).collect()
    }

    pub fn segments(&self) -> usize {
        self.segs.len()
    }
}

impl Drop for SegBuf {
    fn drop(&mut self) {
        if let Some(d) = &self.drops {
            d.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Splits `len` (a multiple of BLOCK) into up to `max_segs` block-multiple segments.
pub fn split_lens(rng: &mut impl rand::Rng, len: usize, max_segs: usize) -> Vec<usize> {
    let blocks = len / BLOCK;
    let segs = rng.gen_range(1..=max_segs.min(blocks).max(1));
    let mut cuts: Vec<usize> = (1..blocks).collect();
    // Pick segs-1 distinct cut points.
    for i in 0..segs.saturating_sub(1) {
        let j = rng.gen_range(i..cuts.len());
        cuts.swap(i, j);
    }
    let mut cuts: Vec<usize> = cuts[..segs.saturating_sub(1)].to_vec();
    cuts.sort_unstable();
    let mut lens = Vec::with_capacity(segs);
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(blocks)) {
        lens.push((c - prev) * BLOCK);
        prev = c;
    }
    lens
}

pub fn config(queue_depth: u32) -> EngineConfig {
    EngineConfig {
        queue_depth,
        threads: 4,
        register_fds: Vec::new(),
    }
}

/// Whether this machine refuses io_uring outright (then the io_uring tests are skipped
/// with a note instead of failing: open_engine would fall back there anyway).
fn uring_refused(e: &std::io::Error) -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim() != "0")
        .unwrap_or(false);
    disabled || matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
}

/// Builds exactly the engine asked for (no fallback). None only when io_uring is refused by
/// the kernel (see `uring_refused`).
pub fn try_engine<B: IoBuf>(kind: AioKind, cfg: &EngineConfig) -> Option<Box<dyn Engine<B>>> {
    let e: Box<dyn Engine<B>> = match kind {
        AioKind::IoUring => match UringEngine::<B>::new(cfg) {
            Ok(e) => Box::new(e),
            Err(e) if uring_refused(&e) => {
                eprintln!("NOTE: io_uring refused by this kernel ({e}); test skipped");
                return None;
            }
            Err(e) => panic!("io_uring engine: {e}"),
        },
        AioKind::Native => Box::new(NativeEngine::<B>::new(cfg).expect("native AIO engine")),
        AioKind::Threads => Box::new(ThreadsEngine::<B>::new(cfg).expect("threads engine")),
    };
    assert_eq!(e.kind(), kind);
    Some(e)
}

/// poll(2) an fd for readability.
pub fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    r == 1
}
