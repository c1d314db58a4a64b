//! Power cuts: the image lives on a storage that behaves like a disk with a volatile write
//! cache. Writes since the last completed flush are only *cached*; when the power goes, each
//! of them independently reached the medium or not, torn at 512-byte sectors (a sector is
//! written whole or not at all), applied in the order they were issued. A kill -9 (see
//! `crash.rs` and the backend's `crash_ring.rs`) never loses the page cache; this does, so it
//! checks that every ordering the formats rely on is enforced by a flush, as on real disks.
//!
//! After each cut, on the image as the medium holds it:
//! - `qemu-img check` finds no corruption (leaks are allowed);
//! - xdisk opens it (repairing a dirty image) and reads what `qemu-img convert` reads;
//! - every sector holds a value the operation sequence allows: what it held at the last
//!   completed flush, or something written to it after that flush; nothing else.
//!
//! The cut falls at a random storage operation, so also in the middle of a format's metadata
//! update (cluster allocation, refcount block creation, L2 table write-back, COW).

use std::borrow::Cow;
use std::io;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use xdisk_image::{CacheMode, CreateOptions, Format, Image, OpenOptions};
use xdisk_io::{Allocation, MemStorage, Storage, StorageRef};

mod support;
use support::{qemu_img, tmpdir};

const SIZE: u64 = 8 << 20;
const SECTOR: usize = 512;

/// A cached write, as the medium may or may not hold it after a cut.
#[derive(Debug, Clone)]
enum Cached {
    Write { off: u64, data: Vec<u8> },
    SetSize(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What reads see (the cache's view).
    current: Vec<u8>,
    /// What the medium holds as of the last completed flush.
    durable: Vec<u8>,
    /// Writes since then, in order.
    cached: Vec<Cached>,
    /// Storage operations left before the power goes (`None`: never).
    ops_left: Option<u64>,
    /// The power is gone: every operation fails.
    cut: bool,
    broken: bool,
    /// A disk that acknowledges flushes without making anything durable (for the test of
    /// the checker itself).
    lies: bool,
}

/// A disk with a volatile write cache whose power can be cut.
#[derive(Debug)]
struct PowerCut {
    state: Mutex<State>,
}

impl PowerCut {
    fn new(data: Vec<u8>) -> PowerCut {
        PowerCut {
            state: Mutex::new(State {
                durable: data.clone(),
                current: data,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms the cut: it happens at the `n`-th operation from now (that one fails).
    fn cut_after(&self, n: u64) {
        self.lock().ops_left = Some(n);
    }

    /// Counts an operation; fails once the power is gone.
    fn tick(s: &mut State) -> io::Result<()> {
        if let Some(n) = s.ops_left {
            if n == 0 {
                s.cut = true;
            } else {
                s.ops_left = Some(n - 1);
            }
        }
        if s.cut {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// What the medium holds after the cut: the durable image with each cached sector
    /// write applied or not, in issue order.
    /// Also returns how many writes were cached and how many of them were dropped (in part
    /// or whole).
    fn medium(&self, rng: &mut impl Rng) -> (Vec<u8>, u64, u64) {
        let s = self.lock();
        let mut dropped = 0u64;
        let mut m = s.durable.clone();
        // Some cuts keep nearly everything, some nearly nothing, most a mix.
        let keep: f64 = [0.05, 0.5, 0.95][rng.gen_range(0..3)];
        for c in &s.cached {
            match c {
                Cached::SetSize(n) => {
                    if rng.gen_bool(keep) {
                        m.resize(*n as usize, 0);
                    } else {
                        dropped += 1;
                    }
                }
                Cached::Write { off, data } => {
                    let mut pos = 0usize;
                    let mut lost = false;
                    while pos < data.len() {
                        // Up to the next sector boundary of the medium.
                        let at = *off as usize + pos;
                        let n = (SECTOR - at % SECTOR).min(data.len() - pos);
                        if rng.gen_bool(keep) {
                            if m.len() < at + n {
                                m.resize(at + n, 0);
                            }
                            m[at..at + n].copy_from_slice(&data[pos..pos + n]);
                        } else {
                            lost = true;
                        }
                        pos += n;
                    }
                    dropped += u64::from(lost);
                }
            }
        }
        (m, s.cached.len() as u64, dropped)
    }

    fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        Self::tick(&mut s)?;
        if s.broken {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let end = off as usize + data.len();
        if s.current.len() < end {
            s.current.resize(end, 0);
        }
        s.current[off as usize..end].copy_from_slice(data);
        s.cached.push(Cached::Write {
            off,
            data: data.to_vec(),
        });
        Ok(())
    }
}

impl Storage for PowerCut {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("power-cut disk")
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::tick(&mut s)?;
        s.current.resize(len as usize, 0);
        s.cached.push(Cached::SetSize(len));
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::tick(&mut s)?;
        let start = (off as usize).min(s.current.len());
        let end = (start + buf.len()).min(s.current.len());
        buf[..end - start].copy_from_slice(&s.current[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write(off, buf)
    }
    fn flush(&self) -> io::Result<()> {
        let mut s = self.lock();
        if let Err(e) = Self::tick(&mut s) {
            s.broken = true;
            return Err(e);
        }
        if s.lies {
            return Ok(());
        }
        s.durable = s.current.clone();
        s.cached.clear();
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(off, len)
    }
    fn discard_zeroes(&self) -> bool {
        true
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let size = self.lock().current.len() as u64;
        let end = off.saturating_add(len).min(size);
        if off >= end {
            return Ok(());
        }
        self.write(off, &vec![0u8; (end - off) as usize])
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        let size = self.lock().current.len() as u64;
        if off + len > size {
            self.set_size(off + len)?;
        }
        Ok(())
    }
    fn allocation(&self, _off: u64, len: u64) -> Allocation {
        Allocation::Data { len }
    }
    fn read_only(&self) -> bool {
        false
    }
    fn cache(&self) -> CacheMode {
        CacheMode::WriteBack
    }
    fn is_broken(&self) -> bool {
        self.lock().broken
    }
    fn mark_broken(&self, _err: &io::Error) {
        self.lock().broken = true;
    }
}

/// Sector values the sequence allows: `durable[s]` as of the last completed flush, plus every
/// value written to sector `s` since.
struct Model {
    /// Per sector: the value at the last completed flush (0 = zeroes, else the op's tag).
    durable: Vec<u32>,
    /// Per sector: values written since that flush.
    since: Vec<Vec<u32>>,
    /// The guest's current view.
    current: Vec<u32>,
}

impl Model {
    fn new() -> Model {
        let n = (SIZE as usize) / SECTOR;
        Model {
            durable: vec![0; n],
            since: vec![Vec::new(); n],
            current: vec![0; n],
        }
    }
    fn write(&mut self, first: usize, count: usize, tag: u32) {
        for s in first..first + count {
            self.current[s] = tag;
            self.since[s].push(tag);
        }
    }
    fn flushed(&mut self) {
        self.durable.copy_from_slice(&self.current);
        for v in &mut self.since {
            v.clear();
        }
    }
    fn allows(&self, sector: usize, tag: u32) -> bool {
        self.durable[sector] == tag || self.since[sector].contains(&tag)
    }
}

/// The contents of a sector written by op `tag`: the tag and the sector number, repeated.
fn sector_data(tag: u32, sector: usize) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    for (i, c) in b.chunks_exact_mut(8).enumerate() {
        c[..4].copy_from_slice(&tag.to_le_bytes());
        c[4..].copy_from_slice(&(sector as u32 ^ i as u32).to_le_bytes());
    }
    b
}

/// Which op's data a sector holds (0: zeroes); `None`: neither zeroes nor any op's data.
fn tag_of(data: &[u8], sector: usize) -> Option<u32> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let tag = u32::from_le_bytes(data[..4].try_into().ok()?);
    (data == sector_data(tag, sector)).then_some(tag)
}

/// Runs random guest operations on `image` until the storage fails (the cut) or `ops` ran.
/// Returns the number of flushes acknowledged. With `closes`, some flushes are closes (the
/// image stays usable: qcow2 stores its dirty bitmaps, and the next write marks them in
/// use again).
fn workload(image: &Image, model: &mut Model, rng: &mut impl Rng, ops: usize, closes: bool) -> u64 {
    let mut flushes = 0;
    for i in 0..ops {
        let tag = i as u32 + 1;
        let count = rng.gen_range(1..=48usize);
        let first = rng.gen_range(0..(SIZE as usize / SECTOR) - count);
        let off = (first * SECTOR) as u64;
        let r = match rng.gen_range(0..20) {
            0..=13 => {
                let mut buf = Vec::with_capacity(count * SECTOR);
                for s in first..first + count {
                    buf.extend_from_slice(&sector_data(tag, s));
                }
                // Issued first: a write that fails may still have reached the cache.
                model.write(first, count, tag);
                image.write_at(&buf, off)
            }
            14 => {
                model.write(first, count, 0);
                image.write_zeroes(off, (count * SECTOR) as u64, rng.gen())
            }
            15 => {
                model.write(first, count, 0);
                image.discard(off, (count * SECTOR) as u64)
            }
            16 if closes => image.close().map(|()| {
                model.flushed();
                flushes += 1;
            }),
            _ => image.flush().map(|()| {
                model.flushed();
                flushes += 1;
            }),
        };
        if r.is_err() {
            break;
        }
    }
    flushes
}

fn qcow2_bytes(dir: &std::path::Path, cluster: u64, lazy: bool) -> Vec<u8> {
    let p = dir.join("fresh.qcow2");
    xdisk_image::create(
        &p,
        Format::Qcow2,
        &CreateOptions {
            size: SIZE,
            cluster_size: cluster,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

/// One image kind through `rounds` power cuts.
/// Runs `rounds` cuts (`XDISK_POWER_CUT_ROUNDS` overrides it, `XDISK_POWER_CUT_SEED` is
/// added to the seed; `scripts/power-cut-soak` sets both) and prints what they did.
fn power_cuts(kind: &str, fresh: Vec<u8>, format: Format, rounds: u64, seed: u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let rounds = env("XDISK_POWER_CUT_ROUNDS").unwrap_or(rounds);
    let seed = seed.wrapping_add(env("XDISK_POWER_CUT_SEED").unwrap_or(0));
    let s = power_cuts_on(kind, fresh, format, rounds, seed, false, false);
    eprintln!(
        "power-cut {kind}: {rounds} cuts, {} during open/repair, {} cached writes at the cuts \
         ({} dropped in part or whole), {} flushes acknowledged, 0 corruptions, 0 lost",
        s.cut_in_open, s.cached, s.dropped, s.flushes
    );
}

/// What the cuts of one run did.
#[derive(Debug, Default)]
struct Stats {
    cut_in_open: u64,
    cached: u64,
    dropped: u64,
    flushes: u64,
    /// Enabled bitmaps found consistent (and checked against the writes) / in use.
    bitmaps_consistent: u64,
    bitmaps_in_use: u64,
}

fn power_cuts_on(
    kind: &str,
    fresh: Vec<u8>,
    format: Format,
    rounds: u64,
    seed: u64,
    lies: bool,
    bitmaps: bool,
) -> Stats {
    let mut stats = Stats::default();
    let dir = tmpdir("xdisk-power-cut-");
    let opts = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Each round continues from what the medium held after the last cut.
    let mut medium = fresh;
    let mut model = Model::new();
    // Per enabled bitmap: the disk's contents when it was (re)created.
    let mut baselines: Vec<(&str, Vec<u8>)> = BITMAPS_ON
        .iter()
        .map(|&n| (n, vec![0u8; SIZE as usize]))
        .collect();
    for round in 0..rounds {
        let disk = Arc::new(PowerCut::new(medium.clone()));
        disk.lock().lies = lies;
        let storage: StorageRef = disk.clone();
        // One round in eight cuts within the first operations: during open, or the repair
        // of the last cut's dirty image.
        let early = rng.gen_range(0..8) == 0;
        disk.cut_after(rng.gen_range(0..if early { 30 } else { 400 }));
        if let Ok(image) = Image::open_on(storage, &opts) {
            stats.flushes += workload(&image, &mut model, &mut rng, 400, bitmaps);
            // Whatever close writes happens after the cut: it fails, like the rest.
            drop(image);
        } else {
            stats.cut_in_open += 1;
        }
        let (m, cached, dropped) = disk.medium(&mut rng);
        medium = m;
        stats.cached += cached;
        stats.dropped += dropped;
        let path = dir.path().join(format!("cut.{kind}"));
        std::fs::write(&path, &medium).unwrap();
        if format == Format::Qcow2 {
            let o = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
            let code = o.status.code();
            assert!(
                matches!(code, Some(0) | Some(3)),
                "{kind} round {round}: qemu-img check exit {code:?} (corruption):\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // xdisk reads it (repairing a dirty image first) ...
        let mem: StorageRef = Arc::new(MemStorage::new("after the cut", medium.clone(), false));
        let image = Image::open_on(mem, &opts)
            .unwrap_or_else(|e| panic!("{kind} round {round}: xdisk cannot open: {e}"));
        let mut all = vec![0u8; SIZE as usize];
        image.read_at(&mut all, 0).unwrap();
        image.close().unwrap();
        drop(image);
        // ... as qemu-img does.
        let flat = dir.path().join("flat.raw");
        let fmt = format.as_str();
        support::qemu_img_ok(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            path.to_str().unwrap(),
            flat.to_str().unwrap(),
        ]);
        let theirs = std::fs::read(&flat).unwrap();
        assert!(
            theirs == all,
            "{kind} round {round}: xdisk and qemu-img read different data"
        );
        // Every sector holds a value the sequence allows.
        for (s, data) in all.chunks_exact(SECTOR).enumerate() {
            let tag = tag_of(data, s);
            assert!(
                tag.is_some_and(|t| model.allows(s, t)),
                "{kind} round {round}: sector {s} holds {tag:?}, allowed: durable {} or one of {:?}",
                model.durable[s],
                model.since[s]
            );
        }
        if bitmaps {
            let (c, u) = bitmap_checks(kind, round, &path, &all, &mut baselines);
            stats.bitmaps_consistent += c;
            stats.bitmaps_in_use += u;
            medium = std::fs::read(&path).unwrap();
        }
        // The next round starts from this state: all of it is durable now.
        for (s, data) in all.chunks_exact(SECTOR).enumerate() {
            model.current[s] = tag_of(data, s).unwrap_or(0);
        }
        model.flushed();
        // The next round opens the medium as the cut left it (dirty images are repaired
        // on the power-cut disk then, and that repair can be cut too).
    }
    stats
}

#[test]
fn power_cut_raw_keeps_flushed_writes() {
    power_cuts("raw", vec![0u8; SIZE as usize], Format::Raw, 30, 1);
}

#[test]
fn power_cut_qcow2_keeps_flushed_writes_and_metadata_consistent() {
    let dir = tmpdir("xdisk-power-cut-new-");
    power_cuts(
        "qcow2",
        qcow2_bytes(dir.path(), 65536, false),
        Format::Qcow2,
        40,
        2,
    );
}

#[test]
fn power_cut_qcow2_small_clusters_and_lazy_refcounts() {
    let dir = tmpdir("xdisk-power-cut-new-");
    power_cuts(
        "qcow2-512",
        qcow2_bytes(dir.path(), 512, false),
        Format::Qcow2,
        30,
        3,
    );
    power_cuts(
        "qcow2-lazy",
        qcow2_bytes(dir.path(), 4096, true),
        Format::Qcow2,
        30,
        4,
    );
}

/// The checker itself: on a disk that acknowledges flushes it never honours, flushed writes
/// are lost at the first cuts, and the test must say so.
#[test]
fn power_cut_checker_catches_a_disk_that_loses_flushed_writes() {
    let caught = std::panic::catch_unwind(|| {
        power_cuts_on(
            "lying",
            vec![0u8; SIZE as usize],
            Format::Raw,
            10,
            5,
            true,
            false,
        )
    });
    assert!(caught.is_err(), "lost flushed writes went unnoticed");
}

/// The enabled bitmaps of the bitmap runs (granularity 512 and 64 KiB) and the disabled one.
const BITMAPS_ON: [&str; 2] = ["on512", "on64k"];
const BITMAP_OFF: &str = "off";
/// What the disabled bitmap holds, always.
const OFF_RANGE: (u64, u64) = (1 << 20, 65536);

/// A fresh qcow2 image with QEMU-made bitmaps: two enabled, one disabled with bits set.
fn qcow2_bitmaps_bytes(dir: &std::path::Path) -> Vec<u8> {
    let p = dir.join("fresh-bitmaps.qcow2");
    let ps = p.to_str().unwrap();
    support::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        ps,
        "8M",
    ]);
    support::qemu_img_ok(&["bitmap", "--add", "-g", "512", ps, BITMAPS_ON[0]]);
    support::qemu_img_ok(&["bitmap", "--add", "-g", "64k", ps, BITMAPS_ON[1]]);
    support::qemu_img_ok(&["bitmap", "--add", "-g", "64k", ps, BITMAP_OFF]);
    // Set the disabled bitmap's bits with a write, then zero the data back.
    support::qemu_io(&p, &["write -P 1 1M 4k"]);
    support::qemu_img_ok(&["bitmap", "--disable", ps, BITMAP_OFF]);
    for n in BITMAPS_ON {
        support::qemu_img_ok(&["bitmap", "--clear", ps, n]);
    }
    support::qemu_io(&p, &["write -z 1M 4k"]);
    for n in BITMAPS_ON {
        support::qemu_img_ok(&["bitmap", "--clear", ps, n]);
    }
    std::fs::read(&p).unwrap()
}

/// After a cut: the disabled bitmap is intact; an enabled bitmap is either marked in use
/// (inconsistent: it is then removed and added afresh, as an operator would) or covers every
/// sector that changed since it was created. xdisk reads what QEMU reads.
fn bitmap_checks(
    kind: &str,
    round: u64,
    path: &std::path::Path,
    now: &[u8],
    baselines: &mut [(&str, Vec<u8>)],
) -> (u64, u64) {
    let (mut consistent, mut in_use) = (0, 0);
    let info = support::qemu_img_ok(&["info", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .clone();
    let flags = |name: &str| -> Vec<String> {
        list.iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{kind} round {round}: bitmap {name} is gone"))["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        flags(BITMAP_OFF).is_empty(),
        "{kind} round {round}: the disabled bitmap changed"
    );
    assert_eq!(
        support::qemu_dirty(path, BITMAP_OFF),
        [OFF_RANGE],
        "{kind} round {round}"
    );
    let ro = Image::open(
        path,
        &OpenOptions {
            format: Some(Format::Qcow2),
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let x = ro.as_qcow2().unwrap();
    for (name, base) in baselines.iter_mut() {
        if flags(name).iter().any(|f| f == "in-use") {
            drop_and_readd(path, name);
            base.copy_from_slice(now);
            in_use += 1;
            continue;
        }
        consistent += 1;
        let dirty = support::qemu_dirty(path, name);
        assert_eq!(
            x.bitmap(name).unwrap().dirty_ranges(),
            dirty,
            "{kind} round {round}: xdisk and QEMU read bitmap {name} differently"
        );
        for (sec, (a, b)) in now
            .chunks_exact(SECTOR)
            .zip(base.chunks_exact(SECTOR))
            .enumerate()
        {
            let off = (sec * SECTOR) as u64;
            if a != b {
                assert!(
                    dirty.iter().any(|&(o, l)| o <= off && off < o + l),
                    "{kind} round {round}: sector {sec} changed but bitmap {name} does not say so"
                );
            }
        }
    }
    (consistent, in_use)
}

fn drop_and_readd(path: &std::path::Path, name: &str) {
    let p = path.to_str().unwrap();
    let g = if name == BITMAPS_ON[0] { "512" } else { "64k" };
    support::qemu_img_ok(&["bitmap", "--remove", p, name]);
    support::qemu_img_ok(&["bitmap", "--add", "-g", g, p, name]);
}

/// Power cuts with persistent bitmaps: opens that mark them in use, writes that set bits,
/// closes that store them (and the next write that marks them again) all cut at random
/// points. No corruption, the disabled bitmap intact, and every enabled bitmap either in
/// use (inconsistent, as QEMU would leave it) or covering every write.
#[test]
fn power_cut_qcow2_bitmaps_stay_consistent_or_marked_in_use() {
    let dir = tmpdir("xdisk-power-cut-new-");
    let fresh = qcow2_bitmaps_bytes(dir.path());
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let rounds = env("XDISK_POWER_CUT_ROUNDS").unwrap_or(40);
    let seed = 6u64.wrapping_add(env("XDISK_POWER_CUT_SEED").unwrap_or(0));
    let s = power_cuts_on(
        "qcow2-bitmaps",
        fresh,
        Format::Qcow2,
        rounds,
        seed,
        false,
        true,
    );
    eprintln!(
        "power-cut qcow2-bitmaps: {rounds} cuts, {} during open/repair, {} cached writes at \
         the cuts ({} dropped in part or whole), {} flushes/closes acknowledged; enabled \
         bitmaps after the cuts: {} consistent (covering every write), {} in use",
        s.cut_in_open, s.cached, s.dropped, s.flushes, s.bitmaps_consistent, s.bitmaps_in_use
    );
    assert!(
        rounds < 20 || s.bitmaps_consistent > 0,
        "no cut left a consistent bitmap to check"
    );
}
