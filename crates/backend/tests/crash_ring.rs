//! Crash consistency through the ring: a child process runs the backend and a multi-queue
//! frontend (4 queues, several requests in flight on each) in the Xen simulation, writing a
//! deterministic sequence of operations to an image, and is SIGKILLed at a random moment,
//! many times over the same image. Three images: raw, qcow2, and qcow2 over a raw backing file
//! (`qemu-img create -b base.raw -F raw`); the rounds alternate cache=none (O_DIRECT) with
//! cache=writeback, the mapped data path with the grant-copy one, rotate the I/O engine
//! (io_uring, native, threads), and on qcow2 shrink the metadata caches to two entries every
//! other four rounds (evictions then write metadata back between flushes). After every kill:
//! - `qemu-img check` finds no corruption (leaks are acceptable after a crash);
//! - the image read back by `qemu-img convert -O raw` holds every write made durable by an
//!   acknowledged flush, and nothing else changed (the rule below).
//!
//! The child is this test binary, re-run with `XDISK_CRASH_RING_CHILD` set. It is killed
//! either early (one round in eight, at a random moment of its start-up: while it opens, and
//! maybe repairs, the image left by the previous kill) or at a random moment of the workload.
//!
//! # The workload
//!
//! Operation `i` of round seed `seed` is [`step`]`(seed, i)`: a write, a write barrier (with
//! data, or empty), a flush (empty, or with data as Linux blkfront sends a write with
//! `REQ_PREFLUSH`/`REQ_FUA`) or a discard, on a queue chosen by the sequence; writes of 1 to
//! 512 sectors (the large ones indirect), half of them 4 KiB aligned, half anywhere. Every
//! sector written by operation `i` holds [`sector_data`]`(seed, i, sector)`: a header naming the
//! round, the operation and the sector, then bytes derived from them, so that any sector read
//! back says which write (if any) it came from.
//!
//! The child submits the operations in order, at most [`PER_QUEUE`] in flight per queue. As a
//! well-behaved guest it never has two overlapping writes or discards in flight at once: an
//! operation that overlaps one in flight waits for its completion. So the writes to any one
//! sector are ordered, each submitted after the previous one completed.
//!
//! # What a flush makes durable
//!
//! As on any disk, a flush covers the writes whose completion was seen before it was issued.
//! The backend promises more (reactor.rs): it starts a `BLKIF_OP_FLUSH_DISKCACHE` once the
//! writes consumed before it on its ring have completed, then flushes the whole image; a
//! write barrier drains its ring, writes its data and flushes. Requests in flight on other
//! queues are not covered. So when the child submits a flush or a barrier on queue `q` it
//! takes a snapshot of the operations whose completion it has seen (all below a prefix `p`,
//! plus some above) and of the writes and discards in flight on `q` (ahead of it on the
//! ring); when the backend answers it OKAY, those operations, and the request's own data
//! (a barrier or a flush with data), are *durable*: the child prints
//! `XDISK-FLUSHED p e1 e2 ... END` (the `e` are the others).
//! Before submitting operation `n` it has always printed `XDISK-ISSUE m` with `m > n`:
//! operations at or beyond the last such `m` were never submitted. (Any write to a sector
//! that is durable was submitted after every earlier write to that sector had completed, so
//! those are durable too: the durable writes of a sector are a prefix of its writes.)
//!
//! # What the image may hold after the kill
//!
//! Per 512-byte sector, starting from the contents before the round (`Pre`), the operations
//! `0..m` of the round are replayed in order on a set of allowed contents:
//! - a durable write (or barrier or flush data) of the sector: the set becomes {that write};
//! - a write that is not durable (it may or may not have reached the image, being in flight,
//!   or completed but not flushed): the write is added to the set;
//! - a discard, durable or not: zeroes and the backing file's data are added (a discard may
//!   deallocate, zero, or do nothing: QEMU ignores discards of partial qcow2 clusters).
//!
//! Each sector must then hold one of the contents of its set. A sector that does not is a
//! *lost* flushed write when some durable operation wrote it, and a *corruption* otherwise (as
//! is anything `qemu-img check` reports as corrupt). A sector is taken as written whole or not
//! at all (a process kill does not tear a sector: the kernel completes or does not start each
//! copy into the page cache, and an O_DIRECT bio is submitted whole). This is a process crash,
//! not a power failure: the host's page cache survives it, so the test is about what the
//! backend and the image layer keep in memory (qcow2 metadata caches, allocation order,
//! request ordering), not about the disk's volatile cache.
//!
//! Rounds per image: `XDISK_CRASH_ROUNDS` (default 4); the first round's seed:
//! `XDISK_CRASH_SEED`. `scripts/crash-soak` runs many rounds.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xdisk_backend::DataPath;
use xdisk_blkfront::{FrontConfig, Frontend, Op};
use xdisk_blkif::wire::{DirectIo, Request, RequestKind, Segment, Segments, Status, SECTOR_SIZE};
use xdisk_image::{CacheMode, Format, Image, OpenOptions};
use xdisk_io::AioKind;
use xdisk_xen::platform::GrantRef;

/// The disk.
const SIZE: u64 = 16 << 20;
const SECTORS: u64 = SIZE / SECTOR_SIZE as u64;
/// Queues of the device.
const QUEUES: usize = 4;
/// Requests in flight per queue at most.
const PER_QUEUE: usize = 8;
/// Pages of the child's guest.
const CHILD_GUEST_PAGES: usize = 32768;
/// First bytes of every sector the workload writes.
const MAGIC: u64 = 0x5352_4358_4b53_4944;
/// The child promises not to submit more than this many operations beyond its last promise.
const ISSUE_AHEAD: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2,
    Qcow2Backing,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
            Kind::Qcow2Backing => "qcow2+backing",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "raw" => Kind::Raw,
            "qcow2" => Kind::Qcow2,
            _ => Kind::Qcow2Backing,
        }
    }

    fn format(self) -> Format {
        match self {
            Kind::Raw => Format::Raw,
            _ => Format::Qcow2,
        }
    }
}

/// One operation of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Write {
        sector: u64,
        sectors: u64,
    },
    /// `BLKIF_OP_WRITE_BARRIER`; `sectors` 0: without data.
    Barrier {
        sector: u64,
        sectors: u64,
    },
    /// `BLKIF_OP_FLUSH_DISKCACHE` with data: how Linux blkfront sends a write with
    /// `REQ_PREFLUSH`/`REQ_FUA` (the blkfront crate's `Op::Flush` has no data, so the child
    /// builds it as a raw request).
    FlushData {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Flush,
}

impl Step {
    /// The sectors the operation may change.
    fn range(self) -> Option<(u64, u64)> {
        match self {
            Step::Write { sector, sectors }
            | Step::Barrier { sector, sectors }
            | Step::FlushData { sector, sectors }
            | Step::Discard { sector, sectors }
                if sectors > 0 =>
            {
                Some((sector, sector + sectors))
            }
            _ => None,
        }
    }
}

/// Operation `i` of the sequence of `seed`, and its queue.
fn step(seed: u64, i: u64) -> (Step, usize) {
    let mut r = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let queue = r.gen_range(0..QUEUES);
    let roll = r.gen_range(0..100);
    let mut sectors = if r.gen_range(0..10) == 0 {
        r.gen_range(65..=512u64)
    } else {
        r.gen_range(1..=64u64)
    };
    if (8..=14).contains(&roll) {
        // Barriers and flushes are direct requests: 11 pages at most.
        sectors = sectors.min(88);
    }
    let sector = if r.gen_bool(0.5) {
        r.gen_range(0..(SECTORS - sectors) / 8) * 8
    } else {
        r.gen_range(0..=SECTORS - sectors)
    };
    let s = match roll {
        0..=7 => Step::Flush,
        8..=9 => Step::Barrier { sector, sectors },
        10 => Step::Barrier {
            sector: 0,
            sectors: 0,
        },
        11..=14 => Step::FlushData { sector, sectors },
        15..=22 => Step::Discard { sector, sectors },
        _ => Step::Write { sector, sectors },
    };
    (s, queue)
}

/// The contents operation `i` of round `seed` writes to `sector`.
fn sector_data(seed: u64, i: u64, sector: u64, out: &mut [u8]) {
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&i.to_le_bytes());
    out[24..32].copy_from_slice(&sector.to_le_bytes());
    let mut x = (seed ^ i.rotate_left(21) ^ sector.rotate_left(42)) | 1;
    for c in out[32..SECTOR_SIZE].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// What the header of a sector says: (round seed, operation, sector), if it has one.
fn header(b: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |k: usize| u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().unwrap());
    (word(0) == MAGIC).then(|| (word(1), word(2), word(3)))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---- The child ----

/// How the child's backend does its I/O.
#[derive(Clone, Copy, Debug)]
struct Setup {
    cache: CacheMode,
    data_path: DataPath,
    aio: AioKind,
    /// qcow2 metadata caches of 2 L2 tables and 2 refcount blocks: evictions write metadata
    /// back between flushes.
    small_caches: bool,
}

/// A request of the child in flight.
struct Flight {
    op: u64,
    queue: usize,
    range: Option<(u64, u64)>,
    /// For flushes and barriers: the operations it covers (see the module comment), as a
    /// prefix and others.
    snapshot: Option<(u64, Vec<u64>)>,
    /// A barrier or a flush with data.
    own_data: bool,
    /// The guest pages of a raw request (given back to the pool when it completes).
    pages: Vec<(usize, GrantRef)>,
}

/// Tags of the child's raw requests (flushes with data): their operation number plus this.
const RAW_TAG: u64 = 1 << 40;

/// The child: opens the image, starts the backend and a frontend, and runs the sequence until
/// killed.
fn child(path: &Path, kind: Kind, setup: Setup, seed: u64) {
    let Setup {
        cache,
        data_path,
        aio,
        small_caches,
    } = setup;
    let image = Image::open(
        path,
        &OpenOptions {
            format: Some(kind.format()),
            cache,
            ..OpenOptions::default()
        },
    )
    .expect("child opens the image");
    if let (true, Some(q)) = (small_caches, image.as_qcow2()) {
        q.set_cache_limits(2, 2);
    }
    let host = host();
    let (domid, devid) = (1u16, 768u32);
    let dom = host
        .xen
        .create_domain(domid, CHILD_GUEST_PAGES)
        .expect("domain");
    host.add_vbd(domid, devid, "w", &[]);
    let mut cfg = device_config(domid, devid);
    cfg.max_queues = QUEUES as u32;
    cfg.data_path = data_path;
    cfg.queue.aio = aio;
    let _device = start_device(&host, cfg, image);
    let mut front = Frontend::connect(
        dom.xenstore().expect("guest xenstore"),
        dom.clone(),
        &fe_dir(domid, devid),
        FrontConfig {
            max_queues: QUEUES as u32,
            ..FrontConfig::default()
        },
    )
    .expect("frontend connects");
    let info = front.info().clone();
    assert_eq!(info.queues, QUEUES, "{info:?}");
    assert!(
        info.flush && info.barrier && info.discard && info.sectors == SECTORS,
        "{info:?}"
    );
    println!("XDISK-READY");

    let mut flights: HashMap<u64, Flight> = HashMap::new();
    let mut per_queue = [0usize; QUEUES];
    // Operations below `prefix` and those in `above` have completed.
    let mut prefix = 0u64;
    let mut above = BTreeSet::new();
    let mut promised = 0u64;
    // Granted guest pages for the data of raw requests.
    let mut pool: Vec<(usize, GrantRef)> = Vec::new();
    /// Handles the completions of one poll; prints the durable mark of flushes and barriers.
    fn complete(
        front: &mut Frontend,
        flights: &mut HashMap<u64, Flight>,
        per_queue: &mut [usize; QUEUES],
        prefix: &mut u64,
        above: &mut BTreeSet<u64>,
        pool: &mut Vec<(usize, GrantRef)>,
    ) {
        let done = front.poll(Duration::from_secs(1)).expect("poll");
        for c in done {
            let f = flights.remove(&c.tag).expect("a request of ours");
            assert_eq!(c.status, Status::Okay, "operation {} failed", f.op);
            per_queue[f.queue] -= 1;
            above.insert(f.op);
            while above.remove(prefix) {
                *prefix += 1;
            }
            pool.extend(f.pages.iter().copied());
            if let Some((p, mut extra)) = f.snapshot {
                if f.own_data {
                    extra.push(f.op);
                }
                let list: Vec<String> = extra.iter().map(u64::to_string).collect();
                println!("XDISK-FLUSHED {p} {} END", list.join(" "));
            }
        }
    }
    for i in 0u64.. {
        let (s, q) = step(seed, i);
        let range = s.range();
        let overlaps = |flights: &HashMap<u64, Flight>| {
            range.is_some_and(|(a, b)| {
                flights
                    .values()
                    .any(|f| f.range.is_some_and(|(c, d)| a < d && c < b))
            })
        };
        while per_queue[q] >= PER_QUEUE || overlaps(&flights) {
            complete(
                &mut front,
                &mut flights,
                &mut per_queue,
                &mut prefix,
                &mut above,
                &mut pool,
            );
        }
        if i >= promised {
            promised = i + ISSUE_AHEAD;
            println!("XDISK-ISSUE {promised}");
        }
        let data = |front: &mut Frontend, sector: u64, sectors: u64| {
            let mut buf = front.buffer(sectors as usize * SECTOR_SIZE);
            for (k, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
                sector_data(seed, i, sector + k as u64, chunk);
            }
            buf
        };
        // What a flush (or barrier) covers: everything completed, and the writes and
        // discards in flight on its own queue (consumed before it: see the module comment).
        let snapshot = matches!(
            s,
            Step::Flush | Step::Barrier { .. } | Step::FlushData { .. }
        )
        .then(|| {
            let mut covered: Vec<u64> = above.iter().copied().collect();
            covered.extend(
                flights
                    .values()
                    .filter(|f| f.queue == q && f.range.is_some())
                    .map(|f| f.op),
            );
            (prefix, covered)
        });
        let mut pages = Vec::new();
        let op = match s {
            Step::Write { sector, sectors } => Op::Write {
                sector,
                data: data(&mut front, sector, sectors),
            },
            Step::Barrier { sector, sectors } => Op::Barrier {
                sector,
                data: data(&mut front, sector, sectors),
            },
            Step::Discard { sector, sectors } => Op::Discard {
                sector,
                nr_sectors: sectors,
                secure: false,
            },
            Step::Flush => Op::Flush,
            Step::FlushData { sector, sectors } => {
                pages = flush_with_data(&mut front, &mut pool, q, seed, i, sector, sectors);
                Op::Flush
            }
        };
        let tag = match s {
            // Pushed as a raw request above.
            Step::FlushData { .. } => RAW_TAG + i,
            _ => front.submit(q, op).expect("submit"),
        };
        per_queue[q] += 1;
        flights.insert(
            tag,
            Flight {
                op: i,
                queue: q,
                range,
                snapshot,
                own_data: matches!(
                    s,
                    Step::Barrier { sectors, .. } | Step::FlushData { sectors, .. } if sectors > 0
                ),
                pages,
            },
        );
    }
}

/// Pushes operation `i`, a `BLKIF_OP_FLUSH_DISKCACHE` with data, on queue `q` as a raw
/// request (tag `RAW_TAG + i`) whose data pages come from `pool`; returns the pages.
fn flush_with_data(
    front: &mut Frontend,
    pool: &mut Vec<(usize, GrantRef)>,
    q: usize,
    seed: u64,
    i: u64,
    sector: u64,
    sectors: u64,
) -> Vec<(usize, GrantRef)> {
    let mut pages = Vec::new();
    let mut segs = Vec::new();
    for first in (0..sectors).step_by(8) {
        let (page, gref) = match pool.pop() {
            Some(p) => p,
            None => {
                let page = front.alloc_page().expect("guest page");
                (page, front.grant_page(page, false).expect("grant"))
            }
        };
        let n = (sectors - first).min(8);
        let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
        for (k, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            sector_data(seed, i, sector + first + k as u64, chunk);
        }
        front.write_page(page, 0, &buf).expect("guest page");
        segs.push(Segment {
            gref,
            first_sect: 0,
            last_sect: (n - 1) as u8,
        });
        pages.push((page, gref));
    }
    let req = Request {
        id: RAW_TAG + i,
        handle: 0,
        kind: RequestKind::Flush(DirectIo {
            sector,
            segments: Segments::from_slice(&segs).expect("11 segments at most"),
        }),
    };
    front.push_raw_request(q, &req).expect("push");
    front.publish(q).expect("publish");
    pages
}

#[test]
fn crash_ring_child() {
    // Only does something when re-run as the child by a parent test.
    let Ok(path) = std::env::var("XDISK_CRASH_RING_CHILD") else {
        return;
    };
    let var = |n: &str| std::env::var(n).unwrap();
    let cache = if var("XDISK_CRASH_RING_CACHE") == "writeback" {
        CacheMode::WriteBack
    } else {
        CacheMode::None
    };
    let data_path = if var("XDISK_CRASH_RING_PATH") == "copy" {
        DataPath::Copy
    } else {
        DataPath::Map
    };
    let setup = Setup {
        cache,
        data_path,
        aio: var("XDISK_CRASH_RING_AIO").parse().unwrap(),
        small_caches: var("XDISK_CRASH_RING_CACHES") == "small",
    };
    child(
        Path::new(&path),
        Kind::parse(&var("XDISK_CRASH_RING_KIND")),
        setup,
        var("XDISK_CRASH_RING_SEED").parse().unwrap(),
    );
}

// ---- The parent ----

/// What the child reported before it died.
#[derive(Default)]
struct Report {
    /// Operations below this are durable...
    prefix: u64,
    /// ...and these.
    extra: BTreeSet<u64>,
    /// Operations at or beyond this were never submitted.
    issued_below: u64,
    ready: bool,
}

impl Report {
    fn durable(&self, i: u64) -> bool {
        i < self.prefix || self.extra.contains(&i)
    }
}

/// Reads the child's stdout; sends () once it is ready.
fn read_child(out: std::process::ChildStdout, ready: mpsc::Sender<()>) -> Report {
    let mut r = Report::default();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let Some(at) = line.find("XDISK-") else {
            continue;
        };
        let mut words = line[at..].split_whitespace();
        match words.next() {
            Some("XDISK-READY") => {
                r.ready = true;
                let _ = ready.send(());
            }
            Some("XDISK-ISSUE") => {
                let n = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                r.issued_below = r.issued_below.max(n);
            }
            Some("XDISK-FLUSHED") => {
                let words: Vec<&str> = words.collect();
                // A line cut short by the kill (no END) promises nothing.
                if words.last() != Some(&"END") {
                    continue;
                }
                let nums: Vec<u64> = words[..words.len() - 1]
                    .iter()
                    .map(|w| w.parse().unwrap())
                    .collect();
                r.prefix = r.prefix.max(nums[0]);
                r.extra.extend(&nums[1..]);
            }
            _ => {}
        }
    }
    r
}

/// A content a sector may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// What it held before the round.
    Pre,
    Zero,
    /// The backing file's data (zeroes without one).
    Base,
    /// Written by this operation.
    Op(u64),
}

/// Totals of one image kind.
#[derive(Default)]
struct Tally {
    kills: u64,
    early: u64,
    corruptions: u64,
    lost: u64,
    durable_ops: u64,
    submitted_ops: u64,
    /// Kills after which `qemu-img check` found more leaked clusters than before.
    leaky: u64,
    /// Leaked clusters `qemu-img check` found after the last kill.
    leaked: u64,
}

/// Checks the image after a round; returns (corrupt sectors, lost sectors) and describes the
/// first few.
fn verify(seed: u64, rep: &Report, pre: &[u8], base: &[u8], now: &[u8]) -> (u64, u64, String) {
    let n = SECTORS as usize;
    let mut allowed: Vec<Vec<Src>> = vec![vec![Src::Pre]; n];
    let mut durably_written = vec![false; n];
    for i in 0..rep.issued_below {
        let (s, _) = step(seed, i);
        let durable = rep.durable(i);
        match s {
            Step::Write { sector, sectors }
            | Step::Barrier { sector, sectors }
            | Step::FlushData { sector, sectors } => {
                for k in sector..sector + sectors {
                    let a = &mut allowed[k as usize];
                    if durable {
                        a.clear();
                        durably_written[k as usize] = true;
                    }
                    a.push(Src::Op(i));
                }
            }
            Step::Discard { sector, sectors } => {
                for k in sector..sector + sectors {
                    let a = &mut allowed[k as usize];
                    for src in [Src::Zero, Src::Base] {
                        if !a.contains(&src) {
                            a.push(src);
                        }
                    }
                }
            }
            Step::Flush => {}
        }
    }
    let (mut corrupt, mut lost) = (0, 0);
    let mut report = String::new();
    let mut expect = [0u8; SECTOR_SIZE];
    for (k, srcs) in allowed.iter().enumerate() {
        let r = k * SECTOR_SIZE..(k + 1) * SECTOR_SIZE;
        let got = &now[r.clone()];
        let found = header(got);
        let ok = srcs.iter().any(|src| match *src {
            Src::Pre => got == &pre[r.clone()],
            Src::Zero => got.iter().all(|&b| b == 0),
            Src::Base => got == &base[r.clone()],
            Src::Op(i) => {
                found == Some((seed, i, k as u64)) && {
                    sector_data(seed, i, k as u64, &mut expect);
                    got == expect
                }
            }
        });
        if ok {
            continue;
        }
        if durably_written[k] {
            lost += 1;
        } else {
            corrupt += 1;
        }
        if corrupt + lost <= 8 {
            let what = match found {
                Some((s, i, sec)) => format!("written by op {i} of seed {s} for sector {sec}"),
                None if got.iter().all(|&b| b == 0) => "zeroes".into(),
                None if got == &pre[r.clone()] => "the contents before the round".into(),
                None => format!("unrecognised bytes {:02x?}", &got[..16]),
            };
            let steps: Vec<String> = srcs
                .iter()
                .filter_map(|s| match s {
                    Src::Op(i) => Some(format!("{i}: {:?}", step(seed, *i).0)),
                    _ => None,
                })
                .collect();
            report += &format!(
                "  sector {k}: holds {what}; allowed {srcs:?}; {}; ops {steps:?}\n",
                if durably_written[k] {
                    "LOST a flushed write"
                } else {
                    "CORRUPT"
                }
            );
        }
    }
    (corrupt, lost, report)
}

/// The image's contents as xdisk reads them (read-only open, backing file included).
fn xdisk_view(path: &Path, kind: Kind) -> Vec<u8> {
    let img = Image::open(
        path,
        &OpenOptions {
            format: Some(kind.format()),
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect("xdisk opens the image read-only");
    let mut v = vec![0u8; SIZE as usize];
    img.read_at(&mut v, 0).expect("xdisk reads the image");
    v
}

fn qemu_img_status(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

fn run_crashes(kind: Kind) {
    let rounds = env_u64("XDISK_CRASH_ROUNDS").unwrap_or(4);
    let first_seed = env_u64("XDISK_CRASH_SEED").unwrap_or(1) * 1000
        + match kind {
            Kind::Raw => 1_000_000_000,
            Kind::Qcow2 => 2_000_000_000,
            Kind::Qcow2Backing => 3_000_000_000,
        };
    let dir = tmpdir();
    let img = dir.path().join(match kind {
        Kind::Raw => "disk.raw",
        _ => "disk.qcow2",
    });
    let img_s = img.to_str().unwrap();
    let mut base = vec![0u8; SIZE as usize];
    match kind {
        Kind::Raw => std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap(),
        Kind::Qcow2 => {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                img_s,
                &SIZE.to_string(),
            ]);
        }
        Kind::Qcow2Backing => {
            let base_path = dir.path().join("base.raw");
            StdRng::seed_from_u64(99).fill(&mut base[..]);
            std::fs::write(&base_path, &base).unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                base_path.to_str().unwrap(),
                "-F",
                "raw",
                img_s,
            ]);
        }
    }
    let read_back = || {
        let flat = dir.path().join("flat.raw");
        qemu_img(&["convert", "-O", "raw", img_s, flat.to_str().unwrap()]);
        let v = std::fs::read(&flat).unwrap();
        let _ = std::fs::remove_file(&flat);
        assert_eq!(v.len() as u64, SIZE);
        v
    };
    let mut pre = read_back();
    let mut t = Tally::default();
    let mut rng = StdRng::seed_from_u64(first_seed ^ 0x5EED);
    let started = Instant::now();
    let summary = |t: &Tally| {
        format!(
            "crash-ring {}: {} kills, {} corruptions, {} lost ({} during start-up; {} operations submitted at most, {} durable ones checked; {} kills leaked clusters, {} leaked in all; {:.0} s)",
            kind.name(),
            t.kills,
            t.corruptions,
            t.lost,
            t.early,
            t.submitted_ops,
            t.durable_ops,
            t.leaky,
            t.leaked,
            started.elapsed().as_secs_f64()
        )
    };
    for round in 0..rounds {
        let seed = first_seed + round;
        let cache = if round % 2 == 0 { "none" } else { "writeback" };
        let data_path = if round / 2 % 2 == 0 { "map" } else { "copy" };
        let aio = [AioKind::IoUring, AioKind::Native, AioKind::Threads][round as usize % 3];
        let caches = if kind != Kind::Raw && round / 4 % 2 == 1 {
            "small"
        } else {
            "default"
        };
        let stderr_path = dir.path().join("child.stderr");
        let sim_tmp = dir.path().join("sim");
        let _ = std::fs::remove_dir_all(&sim_tmp);
        std::fs::create_dir(&sim_tmp).unwrap();
        let mut ch = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_ring_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("XDISK_CRASH_RING_CHILD", img_s)
            .env("XDISK_CRASH_RING_KIND", kind.name())
            .env("XDISK_CRASH_RING_CACHE", cache)
            .env("XDISK_CRASH_RING_PATH", data_path)
            .env("XDISK_CRASH_RING_AIO", aio.as_str())
            .env("XDISK_CRASH_RING_CACHES", caches)
            .env("XDISK_CRASH_RING_SEED", seed.to_string())
            // The simulation's xenstore directory, left behind by the kill.
            .env("TMPDIR", &sim_tmp)
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let out = ch.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || read_child(out, tx));
        let what = format!(
            "{} round {round} (seed {seed}, cache={cache}, aio={}, data path {data_path}, {caches} qcow2 caches)",
            kind.name(),
            aio.as_str()
        );
        let child_failed = |ch: &mut std::process::Child| -> Option<String> {
            ch.try_wait().unwrap().map(|st| {
                format!(
                    "{what}: the child exited by itself ({st}):\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )
            })
        };
        if rng.gen_range(0..8) == 0 {
            // During start-up: opening (and maybe repairing) the image, connecting.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
            t.early += 1;
        } else {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    break;
                }
                if let Some(e) = child_failed(&mut ch) {
                    panic!("{e}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the child never got ready"
                );
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(1..400)));
        }
        if let Some(e) = child_failed(&mut ch) {
            panic!("{e}");
        }
        ch.kill().unwrap(); // SIGKILL
        ch.wait().unwrap();
        t.kills += 1;
        let rep = reader.join().unwrap();
        t.submitted_ops += rep.issued_below;
        t.durable_ops += (0..rep.issued_below).filter(|&i| rep.durable(i)).count() as u64;

        if kind != Kind::Raw {
            let check = qemu_img_status(&["check", img_s]);
            let code = check.status.code();
            let leaked = String::from_utf8_lossy(&check.stdout)
                .lines()
                .find(|l| l.contains("leaked clusters were found"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            t.leaky += u64::from(leaked > t.leaked);
            t.leaked = leaked;
            if code != Some(0) && code != Some(3) {
                t.corruptions += 1;
                println!("{}", summary(&t));
                panic!(
                    "{what}: qemu-img check found corruption (exit {code:?}):\n{}{}",
                    String::from_utf8_lossy(&check.stdout),
                    String::from_utf8_lossy(&check.stderr)
                );
            }
        }
        let now = read_back();
        // xdisk reads the image as QEMU does (what the next child starts from).
        let ours = xdisk_view(&img, kind);
        if ours != now {
            let k = (0..SECTORS as usize)
                .find(|&k| {
                    ours[k * SECTOR_SIZE..][..SECTOR_SIZE] != now[k * SECTOR_SIZE..][..SECTOR_SIZE]
                })
                .unwrap_or(0);
            t.corruptions += 1;
            println!("{}", summary(&t));
            panic!(
                "{what}: xdisk and qemu-img read the image differently, first at sector {k}: \
                 xdisk {:02x?}, qemu {:02x?}",
                &ours[k * SECTOR_SIZE..][..16],
                &now[k * SECTOR_SIZE..][..16]
            );
        }
        let (corrupt, lost, details) = verify(seed, &rep, &pre, &base, &now);
        if corrupt + lost > 0 {
            t.corruptions += u64::from(corrupt > 0);
            t.lost += u64::from(lost > 0);
            println!("{}", summary(&t));
            panic!(
                "{what}: {lost} sectors lost a flushed write, {corrupt} hold what they may not \
                 (durable: ops < {} and {:?}; submitted < {}; ready {}):\n{details}",
                rep.prefix, rep.extra, rep.issued_below, rep.ready
            );
        }
        pre = now;
    }
    println!("{}", summary(&t));
}

#[test]
fn crash_ring_raw() {
    run_crashes(Kind::Raw);
}

#[test]
fn crash_ring_qcow2() {
    run_crashes(Kind::Qcow2);
}

#[test]
fn crash_ring_qcow2_with_backing() {
    run_crashes(Kind::Qcow2Backing);
}

/// The oracle itself: writes in flight that did or did not land pass; a flushed write that is
/// missing is reported lost, and a sector changed that nothing wrote is reported corrupt.
#[test]
fn oracle_tells_lost_and_stray_writes_from_unflushed_ones() {
    let seed = 7;
    let rep = Report {
        prefix: 100,
        extra: BTreeSet::new(),
        issued_below: 140,
        ready: true,
    };
    let pre = vec![0u8; SIZE as usize];
    let base = pre.clone();
    let mut img = pre.clone();
    let mut last_writer = vec![None; SECTORS as usize];
    let mut touched_late = vec![false; SECTORS as usize];
    for i in 0..rep.issued_below {
        let (s, _) = step(seed, i);
        let Some((a, b)) = s.range() else { continue };
        if i >= rep.prefix {
            (a..b).for_each(|k| touched_late[k as usize] = true);
            if i % 2 == 1 {
                // Not flushed, and lost in the crash: allowed.
                continue;
            }
        }
        for k in a..b {
            let r = k as usize * SECTOR_SIZE..(k as usize + 1) * SECTOR_SIZE;
            match s {
                Step::Discard { .. } => img[r].fill(0),
                _ => {
                    sector_data(seed, i, k, &mut img[r]);
                    last_writer[k as usize] = Some(i);
                }
            }
        }
    }
    assert_eq!(verify(seed, &rep, &pre, &base, &img).0, 0);
    assert_eq!(verify(seed, &rep, &pre, &base, &img).1, 0);
    // A flushed write lost: the sector reads as before the round.
    let k = (0..SECTORS as usize)
        .find(|&k| !touched_late[k] && last_writer[k].is_some())
        .unwrap();
    let mut lost = img.clone();
    lost[k * SECTOR_SIZE..(k + 1) * SECTOR_SIZE].fill(0);
    let (corrupt, n, _) = verify(seed, &rep, &pre, &base, &lost);
    assert_eq!((corrupt, n), (0, 1));
    // A sector nothing wrote changes.
    let k = (0..SECTORS as usize)
        .find(|&k| !touched_late[k] && last_writer[k].is_none())
        .unwrap();
    let mut stray = img.clone();
    stray[k * SECTOR_SIZE] = 1;
    let (n, lost, _) = verify(seed, &rep, &pre, &base, &stray);
    assert_eq!((n, lost), (1, 0));
}
