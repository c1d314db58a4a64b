//! `xdisk bench`: fio-like workloads through the whole PV block path on the shared-memory Xen
//! simulation: a Rust blkfront in a simulated guest ([`xdisk_blkfront::Frontend`]) keeps
//! `--iodepth` requests in flight on each of `--numjobs` queues (rings), the backend
//! ([`xdisk_backend::Device`]) serves them from the image file with its I/O engine.
//!
//! It speaks fio's language (`--rw=randread --bs=4k --iodepth=32 --runtime=10 ...`, sizes like
//! `4k`/`1M`) and prints fio's summary, or fio's JSON shape with `--output-format=json`, so the
//! two can be run side by side (bench/ring-bench.py).
//!
//! * Latency is submit to completion as the frontend sees it, in a log-linear histogram.
//! * The frontend uses persistent grants (its pool covers a full queue of the largest
//!   requests) and indirect segments for requests above 11 pages; the backend maps grants
//!   (`--datapath=map`, zero copy, persistent mappings cached) or copies them
//!   (`--datapath=copy`).
//! * `--verify=crc32c`: written blocks carry a header and a crc32c; reads check it (blocks
//!   written earlier in the run also against the generation last written), and a workload
//!   with writes ends with a verification pass over every block it wrote. A mismatch fails
//!   the run.
//! * `usr_cpu`/`sys_cpu` are the whole process's (frontend, backend, I/O threads), from
//!   getrusage, as a share of one CPU over the run.
//! * Soak testing: `--reconnect=MIN-MAX` disconnects and reconnects the frontend at random
//!   intervals with requests in flight (those the backend had not consumed are resubmitted
//!   after the reconnection, as Linux blkfront's `blkif_recover`; the verification state
//!   carries over), `--resize_at=SECS:NEWSIZE` grows the image while I/O goes on (the
//!   frontend notices the new `sectors` and the region grows into it; never written blocks
//!   there must read as zeroes), and the process's RSS and descriptors are sampled every
//!   second (reported as start, after warm-up, end, min and max).

mod hist;
mod soak;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use xdisk_backend::{DataPath, Device, DeviceConfig, DeviceStats};
use xdisk_blkfront::{Completion, Error as FrontError, FrontConfig, Frontend, Op};
use xdisk_blkif::wire::{
    Status, BLKIF_MAX_SEGMENTS_PER_REQUEST, DEFAULT_MAX_INDIRECT_SEGMENTS, PAGE_SIZE,
    SEGS_PER_INDIRECT_FRAME,
};
use xdisk_image::queue::QueueConfig;
use xdisk_image::{AioKind, CacheMode, Image};
use xdisk_xen::xenstore::{Access, Client, Perm};
use xdisk_xensim::{SimXen, DEFAULT_GRANT_ENTRIES};

use crate::size::parse_size;
use hist::{Histogram, FIO_PERCENTILES};
use soak::{Memory, ResizePlan, ResizeSeen};

/// The guest's domain id and the disk's device id (xvda).
const DOMID: u16 = 1;
const DEVID: u32 = 51712;

#[derive(Args)]
pub struct RingBenchArgs {
    /// The image file.
    #[arg(long)]
    filename: PathBuf,
    /// Image format: raw or qcow2 (probed if absent).
    #[arg(long)]
    format: Option<String>,
    /// read, write, randread, randwrite, randrw, rw (readwrite).
    #[arg(long, default_value = "read")]
    rw: String,
    /// Percentage of reads in mixed workloads.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Block size (bytes; k, M suffixes).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Requests in flight per job (queue).
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// The backend's QueueConfig::submit_batch: how many requests continuing one another it
    /// holds back to push together (1: each at once).
    #[arg(long = "iodepth_batch_submit", default_value_t = 32)]
    iodepth_batch_submit: usize,
    /// Stop after this long (seconds; s, ms, m, h suffixes).
    #[arg(long)]
    runtime: Option<String>,
    /// Stop each job after this many requests. Like fio, a job also stops once it has done
    /// --size worth of requests, unless --time_based.
    #[arg(long = "number_ios")]
    number_ios: Option<u64>,
    /// Jobs: each is a queue (ring) of the device with its own --iodepth.
    #[arg(long, default_value_t = 1)]
    numjobs: u32,
    /// 1: the backend opens the image with O_DIRECT (cache=none); 0: cache=writeback.
    #[arg(long, default_value_t = 0)]
    direct: u8,
    /// The backend's I/O engine: io_uring, native (libaio) or threads (psync).
    #[arg(long, default_value = "io_uring")]
    ioengine: String,
    /// Verify data: crc32c (or 0/none).
    #[arg(long)]
    verify: Option<String>,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal")]
    output_format: String,
    /// Job name in the report.
    #[arg(long, default_value = "xdisk")]
    name: String,
    /// How the backend reaches guest data: map (zero copy, persistent grants) or copy (grant
    /// copy through a bounce buffer).
    #[arg(long, default_value = "map")]
    datapath: String,
    /// Region of the image to use (default: all of it from --offset).
    #[arg(long)]
    size: Option<String>,
    /// Start of the region.
    #[arg(long, default_value = "0")]
    offset: String,
    /// Persistent grants (1) or a grant per page and request (0).
    #[arg(long, default_value_t = 1)]
    persistent: u8,
    /// CPUs the whole process (frontend, backend, I/O threads) may run on, as fio's
    /// `--cpus_allowed`: a list of CPUs and ranges, e.g. `1` or `0-1,3`.
    #[arg(long = "cpus_allowed")]
    cpus_allowed: Option<String>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 0x5eed)]
    randseed: u64,
    /// Accepted for fio compatibility (random offsets are always drawn independently).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "1")]
    norandommap: Option<String>,
    /// Accepted for fio compatibility.
    #[arg(long, hide = true)]
    randrepeat: Option<String>,
    /// Accepted for fio compatibility (one report for all jobs).
    #[arg(long = "group_reporting", hide = true, num_args = 0..=1, default_missing_value = "1")]
    group_reporting: Option<String>,
    /// Run for --runtime even past --size worth of requests (wrapping around).
    #[arg(long = "time_based", num_args = 0..=1, default_missing_value = "1")]
    time_based: Option<String>,
    /// Testing: flip one data byte of the N-th write after its crc was computed (the run must
    /// then fail verification).
    #[arg(long = "debug-corrupt-write", hide = true)]
    corrupt_write: Option<u64>,
    /// Soak testing: disconnect the frontend and reconnect it (same number of queues) after a
    /// random interval of MIN to MAX seconds, again and again, with requests in flight.
    /// Requests the backend had not taken are resubmitted after the reconnection; data
    /// written before a reconnection is verified after it. `N` alone: every N seconds.
    #[arg(long, value_name = "MIN-MAX", hide_short_help = true)]
    reconnect: Option<String>,
    /// Soak testing: SECS into the run, grow the image to NEWSIZE bytes (`+SIZE`: by SIZE)
    /// while I/O goes on, and tell the backend (online resize). The frontend picks up the new
    /// size and, unless --size fixes the region, the workload extends into it; blocks there
    /// that were never written must read as zeroes.
    #[arg(
        long = "resize_at",
        value_name = "SECS:NEWSIZE",
        hide_short_help = true
    )]
    resize_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
    ReadWrite,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern> {
        Ok(match s {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "randrw" => Pattern::RandRw,
            "rw" | "readwrite" => Pattern::ReadWrite,
            _ => bail!("invalid --rw={s} (read, write, randread, randwrite, randrw, rw)"),
        })
    }
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }
    /// Percentage of reads.
    fn read_pct(self, mix: u32) -> u32 {
        match self {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::RandRw | Pattern::ReadWrite => mix.min(100),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRw => "randrw",
            Pattern::ReadWrite => "rw",
        }
    }
}

/// fio's `--runtime`: seconds by default.
fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 0.000_001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("invalid duration '{s}'"))?;
    if !v.is_finite() || v <= 0.0 {
        bail!("invalid duration '{s}'");
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Everything a run needs, checked.
struct Params {
    name: String,
    rw: Pattern,
    read_pct: u32,
    bs: usize,
    iodepth: usize,
    submit_batch: usize,
    jobs: usize,
    runtime: Option<Duration>,
    /// Requests per job.
    ios_per_job: Option<u64>,
    verify: bool,
    json: bool,
    aio: AioKind,
    cache: CacheMode,
    data_path: DataPath,
    persistent: bool,
    /// Region: first byte and number of blocks.
    base: u64,
    blocks: u64,
    seed: u64,
    corrupt_write: Option<u64>,
    /// `--reconnect`: the interval between reconnections.
    reconnect: Option<(Duration, Duration)>,
    /// `--resize_at`.
    resize: Option<ResizePlan>,
    /// The region is the image from --offset on (no --size): it grows with the image.
    region_grows: bool,
    /// The image's size at the start.
    image_size: u64,
}

fn params(a: &RingBenchArgs, image_size: u64) -> Result<Params> {
    let rw = Pattern::parse(&a.rw)?;
    let bs = parse_size(&a.bs)?;
    if bs == 0 || !bs.is_multiple_of(512) {
        bail!("--bs={} must be a non-zero multiple of 512", a.bs);
    }
    let max_bs = u64::from(DEFAULT_MAX_INDIRECT_SEGMENTS) * PAGE_SIZE as u64;
    if bs > max_bs {
        bail!(
            "--bs={} is larger than the largest request ({max_bs} bytes)",
            a.bs
        );
    }
    if a.iodepth == 0 || a.iodepth > 512 {
        bail!("--iodepth={} must be 1..=512 (the ring's slots)", a.iodepth);
    }
    if a.numjobs == 0 || a.numjobs > 16 {
        bail!("--numjobs={} must be 1..=16", a.numjobs);
    }
    if a.rwmixread > 100 {
        bail!("--rwmixread={} must be 0..=100", a.rwmixread);
    }
    let verify = match a.verify.as_deref() {
        None | Some("0") | Some("none") => false,
        Some("crc32c") | Some("crc32c-intel") => true,
        Some(v) => bail!("--verify={v}: only crc32c is supported"),
    };
    let json = match a.output_format.as_str() {
        "normal" => false,
        "json" => true,
        v => bail!("--output-format={v} (normal or json)"),
    };
    let aio = match a.ioengine.as_str() {
        "libaio" => AioKind::Native,
        "psync" | "pvsync" | "pvsync2" | "sync" => AioKind::Threads,
        v => v
            .parse()
            .map_err(|e| anyhow!("--ioengine={v}: {e} (or libaio, psync)"))?,
    };
    let cache = match a.direct {
        0 => CacheMode::WriteBack,
        1 => CacheMode::None,
        d => bail!("--direct={d} (0 or 1)"),
    };
    let data_path = match a.datapath.as_str() {
        "map" => DataPath::Map,
        "copy" => DataPath::Copy,
        v => bail!("--datapath={v} (map or copy)"),
    };
    let base = parse_size(&a.offset)?;
    if !base.is_multiple_of(512) {
        bail!("--offset must be a multiple of 512");
    }
    let size = match &a.size {
        Some(s) => parse_size(s)?,
        None => image_size.saturating_sub(base),
    };
    if base.checked_add(size).is_none_or(|e| e > image_size) {
        bail!("--offset + --size is past the end of the image ({image_size} bytes)");
    }
    let blocks = size / bs;
    if blocks == 0 {
        bail!("the region ({size} bytes) holds no block of {bs} bytes");
    }
    if verify && blocks > 1 << 26 {
        bail!("--verify tracks every block: use a larger --bs or a smaller --size");
    }
    let runtime = a.runtime.as_deref().map(parse_duration).transpose()?;
    let time_based = a.time_based.as_deref().is_some_and(|v| v != "0");
    if time_based && runtime.is_none() {
        bail!("--time_based needs --runtime");
    }
    // fio: a job ends after --size worth of I/O (or --number_ios, or --runtime, whichever
    // comes first); --time_based keeps it going until --runtime.
    let ios_per_job = match (a.number_ios, time_based) {
        (Some(0), _) => bail!("--number_ios must be positive"),
        (Some(n), true) => Some(n),
        (Some(n), false) => Some(n.min(blocks)),
        (None, true) => None,
        (None, false) => Some(blocks),
    };
    let reconnect = a
        .reconnect
        .as_deref()
        .map(soak::parse_reconnect)
        .transpose()?;
    let resize = a
        .resize_at
        .as_deref()
        .map(|r| soak::parse_resize(r, image_size))
        .transpose()?;
    Ok(Params {
        name: a.name.clone(),
        rw,
        read_pct: rw.read_pct(a.rwmixread),
        bs: bs as usize,
        iodepth: a.iodepth,
        submit_batch: a.iodepth_batch_submit.max(1),
        jobs: a.numjobs as usize,
        runtime,
        ios_per_job,
        verify,
        json,
        aio,
        cache,
        data_path,
        persistent: a.persistent != 0,
        base,
        blocks,
        seed: a.randseed,
        corrupt_write: a.corrupt_write,
        reconnect,
        resize,
        region_grows: a.size.is_none(),
        image_size,
    })
}

// ---- The simulated host ----

/// A simulated host with the device attached to a guest's frontend.
struct Rig {
    _xen: Arc<SimXen>,
    device: Option<Device>,
    front: Frontend,
}

/// What libxl writes to add a vbd (as the backend's tests do).
fn add_vbd(ts: &Client, fe: &str, be: &str, mode: &str) -> Result<()> {
    let fe_perms = [Perm::new(Access::None, DOMID), Perm::new(Access::Read, 0)];
    let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, DOMID)];
    ts.transaction(|tx| {
        tx.mkdir(fe)?;
        tx.set_perms(fe, &fe_perms)?;
        tx.write(&format!("{fe}/backend"), be)?;
        tx.write(&format!("{fe}/backend-id"), "0")?;
        tx.write(&format!("{fe}/virtual-device"), DEVID.to_string())?;
        tx.write(&format!("{fe}/state"), "1")?;
        tx.mkdir(be)?;
        tx.set_perms(be, &be_perms)?;
        tx.write(&format!("{be}/frontend"), fe)?;
        tx.write(&format!("{be}/frontend-id"), DOMID.to_string())?;
        tx.write(&format!("{be}/online"), "1")?;
        tx.write(&format!("{be}/mode"), mode)?;
        tx.write(&format!("{be}/state"), "1")
    })
    .context("toolstack: adding the vbd")
}

fn setup(p: &Params, image: Arc<Image>) -> Result<Rig> {
    let xen = SimXen::new().context("starting the Xen simulation")?;
    let xs = Arc::new(xen.xenstore(0)?);
    let toolstack = xen.xenstore(0)?;
    // Pages a request uses: data pages (a block may straddle none: offsets are whole
    // sectors from the page start) and indirect pages.
    let data_pages = p.bs.div_ceil(PAGE_SIZE);
    let ind_pages = if data_pages > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        data_pages.div_ceil(SEGS_PER_INDIRECT_FRAME)
    } else {
        0
    };
    // Persistent grants per queue: a full queue of requests (Linux blkfront grants enough
    // for its whole ring up front), and the backend keeps them all mapped.
    let per_queue = p.iodepth * (data_pages + ind_pages) + 64;
    let grants = (p.jobs * (per_queue + 16) + 1024).next_multiple_of(512);
    let pages = (2 * grants).max(8192);
    let dom = xen.create_domain_with(
        DOMID,
        pages,
        grants.max(DEFAULT_GRANT_ENTRIES as usize) as u32,
    )?;
    let fe_dir = format!("/local/domain/{DOMID}/device/vbd/{DEVID}");
    let be_dir = format!("/local/domain/0/backend/vbd/{DOMID}/{DEVID}");
    add_vbd(
        &toolstack,
        &fe_dir,
        &be_dir,
        if image.read_only() { "r" } else { "w" },
    )?;
    let mut cfg = DeviceConfig::new(be_dir);
    cfg.max_queues = p.jobs as u32;
    cfg.data_path = p.data_path;
    cfg.persistent = p.persistent;
    cfg.max_persistent_grants = per_queue.max(xdisk_backend::DEFAULT_MAX_PERSISTENT_GRANTS);
    cfg.queue = QueueConfig {
        aio: p.aio,
        queue_depth: (p.iodepth as u32 * 2).next_power_of_two().max(64),
        slow_threads: 2,
        submit_batch: p.submit_batch,
    };
    let device = Device::start(cfg, xs, xen.grant_mapper(0), xen.event_channels(0), image)
        .context("starting the backend")?;
    let front = Frontend::connect(
        dom.xenstore()?,
        dom.clone(),
        &fe_dir,
        FrontConfig {
            max_queues: p.jobs as u32,
            persistent: p.persistent,
            max_persistent_grants: per_queue,
            ..FrontConfig::default()
        },
    )
    .context("connecting the frontend")?;
    check_connection(p, &front)?;
    Ok(Rig {
        _xen: xen,
        device: Some(device),
        front,
    })
}

/// What a (re)connection must have negotiated for the workload.
fn check_connection(p: &Params, front: &Frontend) -> Result<()> {
    let info = front.info();
    if info.queues != p.jobs {
        bail!(
            "the backend gave {} queues for {} jobs",
            info.queues,
            p.jobs
        );
    }
    if (info.ring_size as usize) < p.iodepth {
        bail!(
            "--iodepth={} is more than the ring's {} slots",
            p.iodepth,
            info.ring_size
        );
    }
    if (front.max_request_sectors() as usize) * 512 < p.bs {
        bail!(
            "--bs={} is larger than a request may carry ({} bytes)",
            p.bs,
            front.max_request_sectors() * 512
        );
    }
    Ok(())
}

impl Rig {
    fn stats(&self) -> DeviceStats {
        self.device.as_ref().map(Device::stats).unwrap_or_default()
    }

    /// Disconnects and stops the backend; returns the grants the frontend found still held
    /// by the backend when it revoked them, over the whole run.
    fn close(mut self) -> Result<usize> {
        self.front
            .disconnect()
            .context("disconnecting the frontend")?;
        if let Some(d) = self.device.take() {
            d.shutdown().context("stopping the backend")?;
        }
        Ok(self.front.leaked_grants())
    }
}

// ---- The workload ----

/// wyrand: a small, fast PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

struct Job {
    rng: Rng,
    /// Next block of a sequential workload.
    cursor: u64,
    issued: u64,
    in_flight: usize,
}

/// A request in flight.
struct InFlight {
    start: Instant,
    queue: usize,
    read: bool,
    block: u64,
    /// The verification pass (not counted).
    verify_pass: bool,
}

/// Results of one direction.
#[derive(Default)]
struct Side {
    ios: u64,
    bytes: u64,
    clat: Histogram,
}

/// Block states of a verify run.
struct Blocks {
    /// Generation of the last completed write of each block in this run (0: none).
    generation: Vec<u32>,
    /// A request for the block is in flight.
    busy: Vec<bool>,
}

/// Most blocks a verify run tracks.
const MAX_VERIFY_BLOCKS: u64 = 1 << 26;

/// What the resize thread reports.
#[derive(Default)]
struct ResizeDone {
    at: Option<Duration>,
    result: Option<std::result::Result<u64, String>>,
}

struct Bench<'a> {
    p: &'a Params,
    front: &'a mut Frontend,
    jobs: Vec<Job>,
    in_flight: HashMap<u64, InFlight>,
    read: Side,
    write: Side,
    blocks: Option<Blocks>,
    /// Blocks of the region (grows with an online resize).
    nblocks: u64,
    /// Blocks from this one on lie past the image's original end: never written in this run,
    /// they must read as zeroes.
    zero_from: Option<u64>,
    writes_issued: u64,
    verified: u64,
    mismatches: u64,
    failure: Option<String>,
    errors: u64,
    completions: Vec<Completion>,
    /// Start of the run.
    t0: Instant,
    /// `--reconnect`: its own random numbers and the next time.
    reconnect_rng: Rng,
    next_reconnect: Option<Instant>,
    reconnects: u64,
    resubmitted: u64,
    /// `--resize_at`: the resize thread's report, and what the frontend saw.
    resize_done: Arc<Mutex<ResizeDone>>,
    resize: ResizeSeen,
    /// Sectors the frontend last knew.
    sectors: u64,
}

impl<'a> Bench<'a> {
    fn new(p: &'a Params, front: &'a mut Frontend, t0: Instant) -> Bench<'a> {
        let jobs = (0..p.jobs)
            .map(|j| {
                let mut rng = Rng(p.seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                rng.next();
                Job {
                    rng,
                    cursor: 0,
                    issued: 0,
                    in_flight: 0,
                }
            })
            .collect();
        let blocks = p.verify.then(|| Blocks {
            generation: vec![0; p.blocks as usize],
            busy: vec![false; p.blocks as usize],
        });
        let sectors = front.info().sectors;
        let mut reconnect_rng = Rng(p.seed ^ 0x7ec0_22ec_7000_0001);
        reconnect_rng.next();
        Bench {
            p,
            front,
            jobs,
            in_flight: HashMap::with_capacity(p.jobs * p.iodepth * 2),
            read: Side::default(),
            write: Side::default(),
            blocks,
            nblocks: p.blocks,
            zero_from: None,
            writes_issued: 0,
            verified: 0,
            mismatches: 0,
            failure: None,
            errors: 0,
            completions: Vec::with_capacity(p.jobs * p.iodepth),
            t0,
            reconnect_rng,
            next_reconnect: None,
            reconnects: 0,
            resubmitted: 0,
            resize_done: Arc::new(Mutex::new(ResizeDone::default())),
            resize: ResizeSeen {
                blocks_before: p.blocks,
                blocks_after: p.blocks,
                ..ResizeSeen::default()
            },
            sectors,
        }
    }

    /// The next (read?, block) of job `j`; `None` if every candidate is busy (verify).
    fn pick(&mut self, j: usize) -> Option<(bool, u64)> {
        let p = self.p;
        let nblocks = self.nblocks;
        let job = &mut self.jobs[j];
        let read = match p.read_pct {
            100 => true,
            0 => false,
            pct => job.rng.below(100) < u64::from(pct),
        };
        for _ in 0..64 {
            let block = if p.rw.random() {
                job.rng.below(nblocks)
            } else {
                let b = job.cursor % nblocks;
                job.cursor = (b + 1) % nblocks;
                b
            };
            match &self.blocks {
                Some(b) if b.busy[block as usize] => continue,
                _ => return Some((read, block)),
            }
        }
        None
    }

    fn submit(&mut self, j: usize, read: bool, block: u64, verify_pass: bool) -> Result<()> {
        self.submit_at(j, read, block, verify_pass, None)
    }

    /// Submits a request on queue `j`; `start`: when it was first submitted (a request
    /// resubmitted after a reconnection keeps its latency), else now (once its data is made).
    fn submit_at(
        &mut self,
        j: usize,
        read: bool,
        block: u64,
        verify_pass: bool,
        start: Option<Instant>,
    ) -> Result<()> {
        let p = self.p;
        let offset = p.base + block * p.bs as u64;
        let sector = offset / 512;
        let op = if read {
            Op::Read {
                sector,
                sectors: (p.bs / 512) as u32,
            }
        } else {
            let mut data = self.front.buffer(p.bs);
            self.writes_issued += 1;
            if let Some(b) = &self.blocks {
                // A write resubmitted after a reconnection has the same generation (its
                // block's generation only moves on completion): the same data again.
                let generation = b.generation[block as usize] + 1;
                verify::fill(&mut data, offset, generation, p.seed);
                if p.corrupt_write == Some(self.writes_issued) {
                    let last = data.len() - 1;
                    data[last] ^= 0x01;
                }
            }
            Op::Write { sector, data }
        };
        if let Some(b) = &mut self.blocks {
            b.busy[block as usize] = true;
        }
        let start = start.unwrap_or_else(Instant::now);
        let tag = match self.front.submit(j, op) {
            Ok(t) => t,
            Err(FrontError::RingFull(q)) => {
                bail!("ring {q} is full with {} in flight", self.jobs[j].in_flight)
            }
            Err(e) => return Err(e).context("submitting a request"),
        };
        self.in_flight.insert(
            tag,
            InFlight {
                start,
                queue: j,
                read,
                block,
                verify_pass,
            },
        );
        self.jobs[j].in_flight += 1;
        Ok(())
    }

    /// Waits for completions and handles them.
    fn reap(&mut self) -> Result<()> {
        let mut done = std::mem::take(&mut self.completions);
        let got = self
            .front
            .poll_into(Duration::from_secs(60), &mut done)
            .context("polling for completions")?;
        if got == 0 {
            bail!(
                "no completion in 60 s with {} requests in flight",
                self.in_flight.len()
            );
        }
        self.handle(done)
    }

    /// Handles completions (and gives `done`'s allocation back for the next poll).
    fn handle(&mut self, mut done: Vec<Completion>) -> Result<()> {
        let now = Instant::now();
        for c in done.drain(..) {
            let Some(f) = self.in_flight.remove(&c.tag) else {
                bail!("completion of unknown request {}", c.tag);
            };
            self.jobs[f.queue].in_flight -= 1;
            if c.status != Status::Okay {
                self.errors += 1;
                self.fail(format!(
                    "{} of block {} failed: {:?}",
                    if f.read { "read" } else { "write" },
                    f.block,
                    c.status
                ));
            }
            let offset = self.p.base + f.block * self.p.bs as u64;
            if !f.verify_pass {
                let side = if f.read {
                    &mut self.read
                } else {
                    &mut self.write
                };
                side.ios += 1;
                side.bytes += self.p.bs as u64;
                side.clat
                    .record(now.saturating_duration_since(f.start).as_nanos() as u64);
            }
            if let Some(b) = &mut self.blocks {
                let i = f.block as usize;
                b.busy[i] = false;
                if !f.read && c.status == Status::Okay {
                    b.generation[i] += 1;
                }
            }
            if let Some(data) = c.data {
                if self.blocks.is_some() && c.status == Status::Okay {
                    self.check(&data, f.block, offset, f.verify_pass);
                }
                self.front.recycle(data);
            }
        }
        self.completions = done;
        Ok(())
    }

    /// Verifies a block read.
    fn check(&mut self, data: &[u8], block: u64, offset: u64, verify_pass: bool) {
        let Some(b) = &self.blocks else { return };
        let generation = b.generation[block as usize];
        let written = generation != 0;
        // Past the image's original end, a block not written in this run is new space: it
        // reads as zeroes.
        if !written && self.zero_from.is_some_and(|z| block >= z) {
            if data.iter().all(|&x| x == 0) {
                self.verified += 1;
            } else {
                self.mismatch(format!(
                    "verify: block {block} at offset {offset} ({} bytes), in the space the \
                     resize added and never written, does not read as zeroes",
                    data.len()
                ));
            }
            return;
        }
        // Blocks not written in this run: a pure read workload checks them all (like fio,
        // they must hold verify blocks of an earlier run with the same block size); a mixed
        // one checks only what it wrote itself.
        if !(written || verify_pass || self.p.read_pct == 100) {
            return;
        }
        let expect = verify::Expect {
            offset,
            generation: written.then_some(generation),
        };
        match verify::check(data, expect) {
            Ok(()) => self.verified += 1,
            Err(e) => self.mismatch(format!(
                "verify: block {block} at offset {offset} ({} bytes): {e}",
                data.len()
            )),
        }
    }

    fn mismatch(&mut self, msg: String) {
        self.mismatches += 1;
        self.fail(msg);
    }

    fn fail(&mut self, msg: String) {
        eprintln!("xdisk bench: {msg}");
        if self.failure.is_none() {
            self.failure = Some(msg);
        }
    }

    /// Whether job `j` may start another request.
    fn job_open(&self, j: usize, deadline: Option<Instant>, now: Instant) -> bool {
        self.failure.is_none()
            && self.p.ios_per_job.is_none_or(|n| self.jobs[j].issued < n)
            && deadline.is_none_or(|d| now < d)
    }

    /// The time of the next reconnection, from `now`.
    fn schedule_reconnect(&mut self, now: Instant) {
        self.next_reconnect = self.p.reconnect.map(|(min, max)| {
            let span = (max - min).as_micros() as u64;
            let r = if span == 0 {
                0
            } else {
                self.reconnect_rng.below(span + 1)
            };
            now + min + Duration::from_micros(r)
        });
    }

    /// Disconnects the frontend with whatever is in flight and connects it again, as a guest
    /// whose blkfront reconnects: late completions (everything the backend took, it answers
    /// before it closes) are handled, the requests it never took are resubmitted on their
    /// queues after the reconnection (Linux blkfront's `blkif_recover`).
    fn reconnect(&mut self) -> Result<()> {
        self.front
            .disconnect()
            .context("reconnect: disconnecting")?;
        // The rings are gone: this only collects what the disconnection reaped.
        let mut done = std::mem::take(&mut self.completions);
        self.front
            .poll_into(Duration::ZERO, &mut done)
            .context("reconnect: late completions")?;
        self.handle(done)?;
        self.front
            .reconnect()
            .context("reconnect: connecting again")?;
        check_connection(self.p, self.front).context("reconnect")?;
        self.reconnects += 1;
        let mut lost: Vec<(u64, InFlight)> = self.in_flight.drain().collect();
        lost.sort_unstable_by_key(|(tag, _)| *tag);
        self.front.plug();
        for (_, f) in lost {
            self.jobs[f.queue].in_flight -= 1;
            self.resubmitted += 1;
            self.submit_at(f.queue, f.read, f.block, f.verify_pass, Some(f.start))?;
        }
        self.front.unplug().context("publishing requests")?;
        Ok(())
    }

    /// Follows the backend (an online resize) and, when the disk grew, the region with it.
    fn check_size(&mut self) -> Result<()> {
        if let Some(sectors) = self.front.check_backend().context("reading the backend")? {
            tracing::debug!(sectors, "the backend's size changed");
        }
        let sectors = self.front.info().sectors;
        if sectors == self.sectors {
            return Ok(());
        }
        self.sectors = sectors;
        let p = self.p;
        self.resize.seen_at = Some(self.t0.elapsed());
        self.resize.sectors = sectors;
        let done = lock(&self.resize_done).at;
        self.resize.done_at = done;
        if !p.region_grows {
            return Ok(());
        }
        let mut n = (sectors * 512).saturating_sub(p.base) / p.bs as u64;
        if self.blocks.is_some() {
            n = n.min(MAX_VERIFY_BLOCKS);
        }
        if n <= self.nblocks {
            return Ok(());
        }
        let old_end = p.image_size.saturating_sub(p.base);
        self.zero_from = Some(old_end.div_ceil(p.bs as u64));
        if let Some(b) = &mut self.blocks {
            b.generation.resize(n as usize, 0);
            b.busy.resize(n as usize, false);
        }
        self.nblocks = n;
        self.resize.blocks_after = n;
        Ok(())
    }

    /// The workload; returns its duration.
    fn run(&mut self) -> Result<Duration> {
        let start = self.t0;
        let deadline = self.p.runtime.map(|r| start + r);
        self.schedule_reconnect(start);
        loop {
            self.check_size()?;
            let now = Instant::now();
            // One notification per batch.
            self.front.plug();
            for j in 0..self.jobs.len() {
                while self.jobs[j].in_flight < self.p.iodepth && self.job_open(j, deadline, now) {
                    let Some((read, block)) = self.pick(j) else {
                        break;
                    };
                    self.submit(j, read, block, false)?;
                    self.jobs[j].issued += 1;
                }
            }
            self.front.unplug().context("publishing requests")?;
            // Right after publishing a batch: the backend is likely not to have taken all of
            // it, so that the resubmission is exercised too.
            if self.next_reconnect.is_some_and(|t| now >= t)
                && self.failure.is_none()
                && deadline.is_none_or(|d| now < d)
            {
                self.reconnect()?;
                self.schedule_reconnect(Instant::now());
                continue;
            }
            if self.in_flight.is_empty() {
                break;
            }
            self.reap()?;
        }
        Ok(start.elapsed())
    }

    /// Reads back every block written in the run and checks it.
    fn verify_pass(&mut self) -> Result<u64> {
        let Some(b) = &self.blocks else {
            return Ok(0);
        };
        let written: Vec<u64> = b
            .generation
            .iter()
            .enumerate()
            .filter(|(_, g)| **g != 0)
            .map(|(i, _)| i as u64)
            .collect();
        let mut next = written.iter();
        let mut exhausted = false;
        loop {
            self.front.plug();
            for j in 0..self.jobs.len() {
                while !exhausted && self.jobs[j].in_flight < self.p.iodepth {
                    match next.next() {
                        Some(&block) => self.submit(j, true, block, true)?,
                        None => exhausted = true,
                    }
                }
            }
            self.front.unplug().context("publishing requests")?;
            if self.in_flight.is_empty() {
                break;
            }
            self.reap()?;
        }
        Ok(written.len() as u64)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The resize thread: at `plan.at` into the run (unless `stop` says the run is over), grows
/// the image and tells the backend.
fn resize_thread(
    plan: ResizePlan,
    t0: Instant,
    image: &Image,
    device: &Device,
    stop: &mpsc::Receiver<()>,
    out: &Mutex<ResizeDone>,
) {
    let wait = (t0 + plan.at).saturating_duration_since(Instant::now());
    if !matches!(
        stop.recv_timeout(wait),
        Err(mpsc::RecvTimeoutError::Timeout)
    ) {
        return;
    }
    let r = image
        .resize(plan.size)
        .map_err(|e| format!("growing the image to {} bytes: {e}", plan.size))
        .and_then(|()| {
            device
                .resize()
                .map_err(|e| format!("telling the backend: {e}"))
        });
    let mut o = lock(out);
    o.at = Some(t0.elapsed());
    o.result = Some(r);
}

// ---- CPU ----

/// Parses fio's CPU list (`0-3,5`).
fn parse_cpus(s: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .trim()
            .parse()
            .map_err(|_| anyhow!("invalid CPU list '{s}'"))?;
        let b: usize = b
            .trim()
            .parse()
            .map_err(|_| anyhow!("invalid CPU list '{s}'"))?;
        if a > b || b >= libc::CPU_SETSIZE as usize {
            bail!("invalid CPU range '{part}'");
        }
        cpus.extend(a..=b);
    }
    if cpus.is_empty() {
        bail!("empty CPU list '{s}'");
    }
    Ok(cpus)
}

/// Restricts this thread, and so every thread it starts afterwards, to `cpus`.
fn set_affinity(cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (each CPU is
    // below CPU_SETSIZE, checked by parse_cpus); sched_setaffinity reads the set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    user: Duration,
    sys: Duration,
    ctx: u64,
    majf: u64,
    minf: u64,
}

fn usage() -> Usage {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Usage::default();
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Usage {
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        ctx: (ru.ru_nvcsw + ru.ru_nivcsw) as u64,
        majf: ru.ru_majflt as u64,
        minf: ru.ru_minflt as u64,
    }
}

// ---- Reports ----

struct Report<'a> {
    p: &'a Params,
    format: &'a str,
    runtime: Duration,
    read: &'a Side,
    write: &'a Side,
    usr_pct: f64,
    sys_pct: f64,
    cpu: Usage,
    stats: DeviceStats,
    front_persistent: usize,
    verified: u64,
    verify_pass_blocks: u64,
    errors: u64,
    soak: Soak,
}

/// What the soak options saw.
#[derive(Default)]
struct Soak {
    mismatches: u64,
    reconnects: u64,
    resubmitted: u64,
    leaked_grants: usize,
    resize: Option<ResizeSeen>,
    memory: Memory,
}

impl Soak {
    fn resize_json(&self, p: &Params) -> Value {
        let (Some(plan), Some(r)) = (p.resize, &self.resize) else {
            return Value::Null;
        };
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "at_ms": plan.at.as_millis() as u64,
            "size": plan.size,
            "done_ms": ms(r.done_at),
            "error": r.error,
            "seen": r.seen_at.is_some(),
            "seen_ms": ms(r.seen_at),
            "sectors": r.sectors,
            "blocks_before": r.blocks_before,
            "blocks_after": r.blocks_after,
        })
    }

    fn text(&self, p: &Params) -> String {
        let mut o = String::new();
        if let Some((min, max)) = p.reconnect {
            o += &format!(
                "  reconnects   : {} (every {:.1}-{:.1}s), {} requests resubmitted, {} grants leaked\n",
                self.reconnects,
                min.as_secs_f64(),
                max.as_secs_f64(),
                self.resubmitted,
                self.leaked_grants
            );
        }
        if let (Some(plan), Some(r)) = (p.resize, &self.resize) {
            let secs = |d: Option<Duration>| {
                d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()))
            };
            o += &format!(
                "  resize       : to {} bytes at {:.1}s: backend at {}, frontend saw {} sectors at {}{}, region {} -> {} blocks\n",
                plan.size,
                plan.at.as_secs_f64(),
                secs(r.done_at),
                r.sectors,
                secs(r.seen_at),
                if r.seen_at.is_some() { "" } else { " (not seen)" },
                r.blocks_before,
                r.blocks_after
            );
            if let Some(e) = &r.error {
                o += &format!("  resize error : {e}\n");
            }
        }
        if let Some(m) = self.memory.text() {
            o += &m;
        }
        o
    }
}

fn side_json(s: &Side, runtime: Duration) -> Value {
    let secs = runtime.as_secs_f64().max(1e-9);
    let h = &s.clat;
    let mut pct = serde_json::Map::new();
    for p in FIO_PERCENTILES {
        pct.insert(format!("{p:.6}"), json!(h.percentile(p)));
    }
    let clat = json!({
        "min": h.min(),
        "max": h.max(),
        "mean": h.mean(),
        "stddev": h.stddev(),
        "N": h.count(),
        "percentile": pct,
    });
    let bw_bytes = (s.bytes as f64 / secs) as u64;
    json!({
        "io_bytes": s.bytes,
        "io_kbytes": s.bytes / 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes / 1024,
        "iops": s.ios as f64 / secs,
        "runtime": runtime.as_millis() as u64,
        "total_ios": s.ios,
        "short_ios": 0,
        "drop_ios": 0,
        "clat_ns": clat.clone(),
        "lat_ns": clat,
    })
}

impl Report<'_> {
    fn json(&self) -> Value {
        let p = self.p;
        let st = &self.stats;
        json!({
            "xdisk version": env!("CARGO_PKG_VERSION"),
            "jobs": [{
                "jobname": p.name,
                "groupid": 0,
                "error": self.errors,
                "job options": {
                    "rw": p.rw.name(),
                    "bs": p.bs.to_string(),
                    "iodepth": p.iodepth.to_string(),
                    "numjobs": p.jobs.to_string(),
                    "direct": if p.cache == CacheMode::None { "1" } else { "0" },
                    "ioengine": p.aio.to_string(),
                },
                "read": side_json(self.read, self.runtime),
                "write": side_json(self.write, self.runtime),
                "job_runtime": self.runtime.as_millis() as u64,
                "usr_cpu": self.usr_pct,
                "sys_cpu": self.sys_pct,
                "ctx": self.cpu.ctx,
                "majf": self.cpu.majf,
                "minf": self.cpu.minf,
                "xdisk": {
                    "format": self.format,
                    "datapath": match p.data_path { DataPath::Map => "map", DataPath::Copy => "copy" },
                    "queues": p.jobs,
                    "persistent_grants_frontend": self.front_persistent,
                    "persistent_grants_backend": st.persistent_grants,
                    "backend_requests": st.rd_req + st.wr_req,
                    "backend_indirect_requests": st.indirect_req,
                    "backend_errors": st.errors,
                    "verify": p.verify,
                    "verified_blocks": self.verified,
                    "verify_pass_blocks": self.verify_pass_blocks,
                    "verify_mismatches": self.soak.mismatches,
                    "backend_connects": st.connects,
                    "reconnects": self.soak.reconnects,
                    "reconnect_resubmitted": self.soak.resubmitted,
                    "leaked_grants": self.soak.leaked_grants,
                    "resize": self.soak.resize_json(p),
                    "memory": self.soak.memory.json(),
                },
            }],
        })
    }

    fn normal(&self) -> String {
        let p = self.p;
        let mut o = String::new();
        let engine = p.aio.to_string();
        o += &format!(
            "{}: (g=0): rw={}, bs=(R) {b}B-{b}B, (W) {b}B-{b}B, (T) {b}B-{b}B, ioengine={engine}, iodepth={}\n",
            p.name,
            p.rw.name(),
            p.iodepth,
            b = p.bs
        );
        o += &format!(
            "xdisk bench {}: {} image, {} queue(s), datapath={}, persistent grants {}, backend direct={}\n",
            env!("CARGO_PKG_VERSION"),
            self.format,
            p.jobs,
            match p.data_path {
                DataPath::Map => "map",
                DataPath::Copy => "copy",
            },
            if self.front_persistent > 0 { "on" } else { "off" },
            u8::from(p.cache == CacheMode::None),
        );
        o += &format!(
            "\n{}: (groupid=0, jobs={}): err={:2}: pid={}\n",
            p.name,
            p.jobs,
            self.errors,
            std::process::id()
        );
        for (label, s) in [("read", self.read), ("write", self.write)] {
            if s.ios == 0 {
                continue;
            }
            o += &side_text(label, s, self.runtime);
        }
        o += &format!(
            "  cpu          : usr={:.2}%, sys={:.2}%, ctx={}, majf={}, minf={}\n",
            self.usr_pct, self.sys_pct, self.cpu.ctx, self.cpu.majf, self.cpu.minf
        );
        let st = &self.stats;
        o += &format!(
            "  backend      : requests={}, indirect={}, errors={}, persistent grants={} (frontend {})\n",
            st.rd_req + st.wr_req,
            st.indirect_req,
            st.errors,
            st.persistent_grants,
            self.front_persistent
        );
        if p.verify {
            o += &format!(
                "  verify       : crc32c, {} blocks verified ({} in the verification pass), {} mismatches\n",
                self.verified, self.verify_pass_blocks, self.soak.mismatches
            );
        }
        o += &self.soak.text(p);
        o += "\nRun status group 0 (all jobs):\n";
        for (label, s) in [("READ", self.read), ("WRITE", self.write)] {
            if s.ios == 0 {
                continue;
            }
            let secs = self.runtime.as_secs_f64().max(1e-9);
            let bw = s.bytes as f64 / secs;
            o += &format!(
                "{label:>7}: bw={} ({}), io={} ({}), run={ms}-{ms}msec\n",
                bw_iec(bw),
                bw_si(bw),
                bytes_iec(s.bytes as f64),
                bytes_si(s.bytes as f64),
                ms = self.runtime.as_millis()
            );
        }
        o
    }
}

/// fio's num2str: 3 significant digits and k/M/G.
fn num3(v: f64, base: f64, units: &[&str]) -> String {
    let mut v = v;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    let s = if i == 0 || v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{s}{}", units[i])
}

fn bw_iec(v: f64) -> String {
    num3(v, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"]) + "/s"
}

fn bw_si(v: f64) -> String {
    num3(v, 1000.0, &["B", "kB", "MB", "GB", "TB"]) + "/s"
}

fn bytes_iec(v: f64) -> String {
    num3(v, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"])
}

fn bytes_si(v: f64) -> String {
    num3(v, 1000.0, &["B", "kB", "MB", "GB", "TB"])
}

fn side_text(label: &str, s: &Side, runtime: Duration) -> String {
    let secs = runtime.as_secs_f64().max(1e-9);
    let iops = s.ios as f64 / secs;
    let bw = s.bytes as f64 / secs;
    let h = &s.clat;
    // Units by the mean: nsec below 10 us, usec below 10 ms, else msec.
    let mean = h.mean();
    let (unit, div) = if mean < 10_000.0 {
        ("nsec", 1.0)
    } else if mean < 10_000_000.0 {
        ("usec", 1e3)
    } else {
        ("msec", 1e6)
    };
    let mut o = format!(
        "  {label}: IOPS={}, BW={} ({})({}/{}msec)\n",
        num3(iops, 1000.0, &["", "k", "M", "G"]),
        bw_iec(bw),
        bw_si(bw),
        bytes_iec(s.bytes as f64),
        runtime.as_millis()
    );
    o += &format!(
        "    clat ({unit}): min={:.0}, max={:.0}, avg={:.2}, stdev={:.2}\n",
        h.min() as f64 / div,
        h.max() as f64 / div,
        h.mean() / div,
        h.stddev() / div
    );
    o += &format!("    clat percentiles ({unit}):\n");
    for (i, p) in FIO_PERCENTILES.iter().enumerate() {
        if i % 4 == 0 {
            o += "     |";
        }
        let v = (h.percentile(*p) as f64 / div).round();
        o += &format!(" {:>5.2}th=[{:>5}]", p, v);
        if i % 4 == 3 || i + 1 == FIO_PERCENTILES.len() {
            o += if i + 1 == FIO_PERCENTILES.len() {
                "\n"
            } else {
                ",\n"
            };
        } else {
            o += ",";
        }
    }
    o
}

// ---- The command ----

pub fn run(a: RingBenchArgs) -> Result<i32> {
    if let Some(c) = &a.cpus_allowed {
        set_affinity(&parse_cpus(c)?)?;
    }
    let cache_probe = match a.direct {
        1 => CacheMode::None,
        _ => CacheMode::WriteBack,
    };
    // An online resize writes the image even under a pure read workload.
    let read_only = Pattern::parse(&a.rw)?.read_pct(a.rwmixread) == 100 && a.resize_at.is_none();
    let image = crate::img::open(&a.filename, a.format.as_deref(), read_only, cache_probe)?;
    let p = params(&a, image.size())?;
    let format = image.format().to_string();
    let mut rig = setup(&p, image.clone())?;
    let mut soak = Soak::default();
    let (result, runtime, before, after, verify_pass_blocks) = {
        let Rig { device, front, .. } = &mut rig;
        let device = device.as_ref().context("the backend is gone")?;
        let before = usage();
        let t0 = Instant::now();
        let mut bench = Bench::new(&p, front, t0);
        let resize_done = bench.resize_done.clone();
        let (r, pass, samples, end) = std::thread::scope(|sc| {
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let sampler = sc.spawn(move || soak::sampler(t0, Duration::from_secs(1), stop_rx));
            let (rstop_tx, rstop_rx) = mpsc::channel::<()>();
            if let Some(plan) = p.resize {
                let (image, done) = (&*image, &*resize_done);
                sc.spawn(move || resize_thread(plan, t0, image, device, &rstop_rx, done));
            }
            let r = bench.run();
            let end = soak::sample(t0);
            drop(rstop_tx);
            let pass = match r {
                Ok(_) if bench.failure.is_none() => bench.verify_pass(),
                Ok(_) => Ok(0),
                Err(ref e) => Err(anyhow!("{e:#}")),
            };
            drop(stop_tx);
            let mut samples = sampler.join().unwrap_or_default();
            samples.push(soak::sample(t0));
            (r, pass, samples, end)
        });
        let after = usage();
        let runtime = r.as_ref().copied().unwrap_or_default();
        let blocks = pass.as_ref().copied().unwrap_or(0);
        // The resize thread has ended: its report is final.
        if p.resize.is_some() {
            let done = std::mem::take(&mut *lock(&resize_done));
            let mut seen = bench.resize.clone();
            seen.done_at = done.at;
            if let Some(Err(e)) = done.result {
                bench.fail(format!("resize: {e}"));
                seen.error = Some(e);
            }
            soak.resize = Some(seen);
        }
        soak.mismatches = bench.mismatches;
        soak.reconnects = bench.reconnects;
        soak.resubmitted = bench.resubmitted;
        soak.memory = Memory {
            samples,
            warmup: soak::warmup(p.runtime),
            end: Some(end),
        };
        (
            pass.map(|_| {
                (
                    std::mem::take(&mut bench.read),
                    std::mem::take(&mut bench.write),
                    bench.verified,
                    bench.failure.take(),
                    bench.errors,
                )
            }),
            runtime,
            before,
            after,
            blocks,
        )
    };
    let stats = rig.stats();
    let front_persistent = rig.front.persistent_grants();
    let closed = rig.close();
    let (read, write, verified, failure, errors) = result?;
    soak.leaked_grants = closed?;
    image.close().context("closing the image")?;
    let secs = runtime.as_secs_f64().max(1e-9);
    let cpu = Usage {
        user: after.user.saturating_sub(before.user),
        sys: after.sys.saturating_sub(before.sys),
        ctx: after.ctx.saturating_sub(before.ctx),
        majf: after.majf.saturating_sub(before.majf),
        minf: after.minf.saturating_sub(before.minf),
    };
    let report = Report {
        p: &p,
        format: &format,
        runtime,
        read: &read,
        write: &write,
        usr_pct: cpu.user.as_secs_f64() / secs * 100.0,
        sys_pct: cpu.sys.as_secs_f64() / secs * 100.0,
        cpu,
        stats,
        front_persistent,
        verified,
        verify_pass_blocks,
        errors,
        soak,
    };
    // The report also when the run failed (mismatches, reconnections, memory): the error
    // follows on stderr and in the exit status.
    if p.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.normal());
    }
    if let Some(e) = failure {
        bail!("{e}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_fio() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cpu_lists_parse_like_fio() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("99999").is_err());
    }

    #[test]
    fn rng_below_is_in_range_and_spread() {
        let mut r = Rng(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn numbers_print_like_fio() {
        assert_eq!(num3(97_234.0, 1000.0, &["", "k", "M"]), "97.2k");
        assert_eq!(num3(512.0, 1000.0, &["", "k", "M"]), "512");
        assert_eq!(bw_iec(380.0 * 1048576.0), "380MiB/s");
        assert_eq!(bw_si(1.5e9), "1.50GB/s");
    }
}
