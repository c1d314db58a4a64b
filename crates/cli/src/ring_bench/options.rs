//! The options of `xdisk bench` (fio's spelling) and the run they describe, checked: the
//! access pattern, sizes, depths, engine, region and soak options ([`Params`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;

use xdisk_backend::DataPath;
use xdisk_blkif::wire::{DEFAULT_MAX_INDIRECT_SEGMENTS, PAGE_SIZE};
use xdisk_image::{AioKind, CacheMode};

use super::soak::{self, ResizePlan};
use crate::size::parse_size;

#[derive(Args)]
pub struct RingBenchArgs {
    /// The image file.
    #[arg(long)]
    pub filename: PathBuf,
    /// qemu-img's `--object secret,id=ID,file=PATH|data=STRING[,format=raw|base64]`: the
    /// passphrase of an encrypted RBD image named with `:encrypt.key-secret=ID`.
    #[arg(long = "object", value_name = "secret,id=ID,file=PATH")]
    pub objects: Vec<String>,
    /// Image format: raw or qcow2 (probed if absent).
    #[arg(long)]
    pub format: Option<String>,
    /// read, write, randread, randwrite, randrw, rw (readwrite).
    #[arg(long, default_value = "read")]
    pub rw: String,
    /// Percentage of reads in mixed workloads.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
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
    pub direct: u8,
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
    /// The backend's busy-polling window before it sleeps, microseconds (`xdisk serve
    /// --poll-us`; 0: none).
    #[arg(long = "poll_us", alias = "poll-us", value_name = "US", default_value_t = 0,
          value_parser = crate::daemon::poll_us_parser())]
    poll_us: u32,
    /// CPUs the whole process (frontend, backend, I/O threads) may run on, as fio's
    /// `--cpus_allowed`: a list of CPUs and ranges, e.g. `1` or `0-1,3`.
    #[arg(long = "cpus_allowed")]
    pub cpus_allowed: Option<String>,
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
    pub resize_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
    ReadWrite,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern> {
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
    pub fn random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }
    /// Percentage of reads.
    pub fn read_pct(self, mix: u32) -> u32 {
        match self {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::RandRw | Pattern::ReadWrite => mix.min(100),
        }
    }
    pub fn name(self) -> &'static str {
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
pub fn parse_duration(s: &str) -> Result<Duration> {
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
pub struct Params {
    pub name: String,
    pub rw: Pattern,
    pub read_pct: u32,
    pub bs: usize,
    pub iodepth: usize,
    pub submit_batch: usize,
    pub jobs: usize,
    pub runtime: Option<Duration>,
    /// Requests per job.
    pub ios_per_job: Option<u64>,
    pub verify: bool,
    pub json: bool,
    pub aio: AioKind,
    pub cache: CacheMode,
    pub data_path: DataPath,
    pub persistent: bool,
    /// The backend's busy-polling window (us).
    pub poll_us: u32,
    /// Region: first byte and number of blocks.
    pub base: u64,
    pub blocks: u64,
    pub seed: u64,
    pub corrupt_write: Option<u64>,
    /// `--reconnect`: the interval between reconnections.
    pub reconnect: Option<(Duration, Duration)>,
    /// `--resize_at`.
    pub resize: Option<ResizePlan>,
    /// The region is the image from --offset on (no --size): it grows with the image.
    pub region_grows: bool,
    /// The image's size at the start.
    pub image_size: u64,
}

pub fn params(a: &RingBenchArgs, image_size: u64) -> Result<Params> {
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
        poll_us: a.poll_us,
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
}
