//! `xdisk img bench`: qemu-img bench's flags, meaning and output, run through the same
//! per-queue path the backend uses (map, then io_uring/native/threads, slow path aside).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;

use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::{AioKind, CacheMode};
use xdisk_io::AlignedBuf;

use crate::size::parse_size;

#[derive(Args)]
pub struct BenchArgs {
    /// Number of I/O requests to perform.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    /// Image format (probed if absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Send a flush every N requests (writes only).
    #[arg(long = "flush-interval", default_value_t = 0)]
    flush_interval: u64,
    /// AIO engine: io_uring, native or threads.
    #[arg(short = 'i', default_value = "io_uring")]
    aio: String,
    /// Native AIO (like qemu-img bench -n).
    #[arg(short = 'n')]
    native: bool,
    /// Do not wait for in-flight requests before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value = "0", value_parser = parse_pattern)]
    pattern: u8,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Buffer (request) size.
    #[arg(short = 's', default_value = "4096")]
    bufsize: String,
    /// Step between request offsets (default: the buffer size, i.e. sequential).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode (none, directsync, writethrough, writeback, unsafe).
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Accepted for compatibility (xdisk never locks images).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: PathBuf,
}

pub fn run(a: BenchArgs) -> Result<i32> {
    let _ = a.force_share;
    let bufsize = parse_size(&a.bufsize)? as usize;
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => bufsize as u64,
    };
    let mut offset = parse_size(&a.offset)?;
    if bufsize == 0 || bufsize > 1 << 30 {
        bail!("invalid buffer size {bufsize}");
    }
    if a.depth == 0 || a.depth > 1 << 16 {
        bail!("invalid queue depth {}", a.depth);
    }
    if a.flush_interval != 0 && !a.write {
        bail!("--flush-interval is only available in write tests");
    }
    if a.flush_interval != 0 && a.flush_interval < a.depth as u64 {
        bail!("Flush interval can't be smaller than depth");
    }
    let aio: AioKind = if a.native {
        AioKind::Native
    } else {
        a.aio.parse().map_err(|e| anyhow!("{e}"))?
    };
    let cache: CacheMode = a.cache.parse().map_err(|e| anyhow!("{e}"))?;
    let image = crate::img::open(&a.filename, a.format.as_deref(), !a.write, cache)?;
    let image_size = image.size();
    let mut q: ImageQueue<AlignedBuf> = ImageQueue::new(
        image.clone(),
        &QueueConfig {
            aio,
            queue_depth: (a.depth as u32 * 2).next_power_of_two().max(8),
            ..QueueConfig::default()
        },
    )?;
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            bufsize,
            a.depth,
            offset,
            step
        );
        if a.flush_interval != 0 {
            println!("Sending flush every {} requests", a.flush_interval);
        }
    }
    let align = image.storage().alignment().buffer_align();
    let mut free: Vec<AlignedBuf> = (0..a.depth)
        .map(|_| {
            // Huge pages from 1 MiB up (few segments per request: see `AlignedBuf::large`).
            let mut b = AlignedBuf::large(bufsize, align);
            if a.write {
                b.fill(a.pattern);
            }
            b
        })
        .collect();
    const FLUSH_TAG: u64 = u64::MAX;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut in_flight = 0usize;
    let mut flushing = false;
    let mut done: Vec<IoDone<AlignedBuf>> = Vec::with_capacity(a.depth);
    let start = Instant::now();
    while completed < a.count {
        while !flushing && in_flight < a.depth && submitted < a.count {
            let buf = free.pop().expect("a free buffer per slot");
            if offset
                .checked_add(bufsize as u64)
                .is_none_or(|e| e > image_size)
            {
                bail!("request at offset {offset} of {bufsize} bytes is past the end of the image ({image_size} bytes)");
            }
            q.submit(IoRequest {
                kind: if a.write { IoKind::Write } else { IoKind::Read },
                offset,
                buf: Some(buf),
                user_data: submitted,
            });
            submitted += 1;
            in_flight += 1;
            // qemu-img bench's wrap rule (qemu commit ff2ab634).
            offset += step;
            offset = if image_size <= bufsize as u64 {
                0
            } else {
                offset % (image_size - bufsize as u64)
            };
        }
        done.clear();
        q.reap(&mut done, 1, Some(Duration::from_secs(60)))?;
        for d in done.drain(..) {
            if d.user_data == FLUSH_TAG {
                d.result.map_err(|e| anyhow!("Failed flush request: {e}"))?;
                flushing = false;
                continue;
            }
            d.result.map_err(|e| anyhow!("Failed request: {e}"))?;
            free.push(d.buf.expect("buffer returned"));
            in_flight -= 1;
            completed += 1;
            let remaining = a.count - completed;
            if a.flush_interval != 0
                && remaining.is_multiple_of(a.flush_interval)
                && !flushing
                && (in_flight == 0 || a.no_drain)
            {
                q.submit(IoRequest {
                    kind: IoKind::Flush,
                    offset: 0,
                    buf: None,
                    user_data: FLUSH_TAG,
                });
                flushing = !a.no_drain;
            }
        }
    }
    // Wait for an outstanding flush.
    while q.in_flight() > 0 {
        done.clear();
        q.reap(&mut done, 1, Some(Duration::from_secs(60)))?;
        for d in done.drain(..) {
            d.result.map_err(|e| anyhow!("Failed request: {e}"))?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let st = q.stats();
    tracing::info!(aio = %q.aio(), fast = st.fast, slow = st.slow, "bench done");
    println!("Run completed in {secs:.3} seconds.");
    Ok(0)
}

/// A byte, decimal or 0x-hex (qemu-img parses it with strtol base 0).
fn parse_pattern(s: &str) -> std::result::Result<u8, String> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(h, 16)
    } else {
        s.parse::<u8>()
    };
    v.map_err(|_| format!("invalid pattern '{s}' (a byte, 0..255 or 0x00..0xff)"))
}
