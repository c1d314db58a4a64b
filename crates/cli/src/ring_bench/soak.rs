//! The soak options of `xdisk bench`: random frontend reconnects (`--reconnect=MIN-MAX`), an
//! online resize in the middle of the run (`--resize_at=SECS:NEWSIZE`), and the process's
//! memory and descriptors sampled over the run, so that a long run shows a leak.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::options::parse_duration;
use crate::size::parse_size;

/// `--reconnect=MIN-MAX` (seconds, fio duration suffixes allowed): the frontend disconnects
/// and reconnects after a random interval in `MIN..=MAX`; `--reconnect=N` is a fixed interval.
pub fn parse_reconnect(s: &str) -> Result<(Duration, Duration)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let min = parse_duration(a).map_err(|e| anyhow!("--reconnect={s}: {e}"))?;
    let max = parse_duration(b).map_err(|e| anyhow!("--reconnect={s}: {e}"))?;
    if min > max {
        bail!("--reconnect={s}: MIN is above MAX");
    }
    Ok((min, max))
}

/// When and to what size the image grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizePlan {
    /// Time into the run.
    pub at: Duration,
    /// The new size in bytes (larger than the image).
    pub size: u64,
}

/// `--resize_at=SECS:NEWSIZE`, NEWSIZE absolute or `+SIZE` (grow by), a multiple of 512 bytes
/// above `image_size`.
pub fn parse_resize(s: &str, image_size: u64) -> Result<ResizePlan> {
    let Some((at, size)) = s.split_once(':') else {
        bail!("--resize_at={s}: expected SECS:NEWSIZE (e.g. 300:+1G)");
    };
    let at = parse_duration(at).map_err(|e| anyhow!("--resize_at={s}: {e}"))?;
    let size = match size.trim().strip_prefix('+') {
        Some(d) => image_size
            .checked_add(parse_size(d)?)
            .ok_or_else(|| anyhow!("--resize_at={s}: size overflows"))?,
        None => parse_size(size)?,
    };
    if size <= image_size {
        bail!("--resize_at={s}: {size} bytes does not grow the image ({image_size} bytes)");
    }
    if !size.is_multiple_of(512) {
        bail!("--resize_at={s}: the new size must be a multiple of 512 bytes");
    }
    Ok(ResizePlan { at, size })
}

/// What the run saw of the resize.
#[derive(Debug, Clone, Default)]
pub struct ResizeSeen {
    /// The backend published the new size this long into the run.
    pub done_at: Option<Duration>,
    /// The resize failed.
    pub error: Option<String>,
    /// The frontend saw the new size this long into the run, and how many sectors.
    pub seen_at: Option<Duration>,
    pub sectors: u64,
    /// Blocks of the region before and after.
    pub blocks_before: u64,
    pub blocks_after: u64,
}

/// One sample of the process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub t: Duration,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// VmRSS of this process in KiB (0 if unreadable).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

pub fn sample(start: Instant) -> Sample {
    Sample {
        t: start.elapsed(),
        rss_kib: rss_kib(),
        fds: open_fds(),
    }
}

/// Samples every `every` until `stop` is dropped or signalled.
pub fn sampler(start: Instant, every: Duration, stop: Receiver<()>) -> Vec<Sample> {
    let mut out = vec![sample(start)];
    loop {
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => out.push(sample(start)),
            _ => return out,
        }
    }
}

/// When the warm-up is over: a tenth of the run, within 1..=30 s.
pub fn warmup(runtime: Option<Duration>) -> Duration {
    runtime.map_or(Duration::from_secs(1), |r| {
        (r / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    })
}

/// The memory figures of a run.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Every second, from the start to after the verification pass.
    pub samples: Vec<Sample>,
    pub warmup: Duration,
    /// Taken when the workload ended (before the verification pass, which allocates its
    /// list of blocks): the "end" compared with the warm-up.
    pub end: Option<Sample>,
}

impl Memory {
    fn at_warmup(&self) -> Option<&Sample> {
        self.samples
            .iter()
            .find(|s| s.t >= self.warmup)
            .or(self.samples.last())
    }

    /// (start, after warm-up, end, min, max) RSS in KiB.
    pub fn rss(&self) -> Option<(u64, u64, u64, u64, u64)> {
        let first = self.samples.first()?;
        let last = self.end.as_ref().or(self.samples.last())?;
        let w = self.at_warmup()?;
        let all = || self.samples.iter().chain(&self.end).map(|s| s.rss_kib);
        let min = all().min()?;
        let max = all().max()?;
        Some((first.rss_kib, w.rss_kib, last.rss_kib, min, max))
    }

    pub fn json(&self) -> Value {
        let Some((start, warm, end, min, max)) = self.rss() else {
            return Value::Null;
        };
        let fds = |f: fn(&Sample) -> u64| self.samples.iter().map(f).collect::<Vec<_>>();
        let fd = fds(|s| s.fds);
        let fd_end = self
            .end
            .as_ref()
            .map_or(fd.last().copied(), |s| Some(s.fds));
        json!({
            "rss_kib": {
                "start": start,
                "after_warmup": warm,
                "end": end,
                "min": min,
                "max": max,
                "warmup_ms": self.warmup.as_millis() as u64,
                "samples": fds(|s| s.rss_kib),
                "sample_ms": self.samples.iter().map(|s| s.t.as_millis() as u64).collect::<Vec<_>>(),
            },
            "fds": {
                "start": fd.first(),
                "end": fd_end,
                "max": fd.iter().max(),
            },
        })
    }

    pub fn text(&self) -> Option<String> {
        let (start, warm, end, min, max) = self.rss()?;
        let mib = |k: u64| format!("{:.1}MiB", k as f64 / 1024.0);
        let fd_start = self.samples.first().map_or(0, |s| s.fds);
        let fd_end = self
            .end
            .as_ref()
            .or(self.samples.last())
            .map_or(0, |s| s.fds);
        let fd_max = self.samples.iter().map(|s| s.fds).max().unwrap_or(0);
        Some(format!(
            "  memory       : rss start={}, after warmup ({:.0}s)={}, end of the workload={}, min={}, max={} ({} samples); fds start={fd_start}, end={fd_end}, max={fd_max}\n",
            mib(start),
            self.warmup.as_secs_f64(),
            mib(warm),
            mib(end),
            mib(min),
            mib(max),
            self.samples.len(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_intervals_parse() {
        let s = Duration::from_secs;
        assert_eq!(parse_reconnect("1-3").unwrap(), (s(1), s(3)));
        assert_eq!(parse_reconnect("2").unwrap(), (s(2), s(2)));
        assert_eq!(
            parse_reconnect("500ms-2s").unwrap(),
            (Duration::from_millis(500), s(2))
        );
        assert!(parse_reconnect("3-1").is_err());
        assert!(parse_reconnect("x").is_err());
        assert!(parse_reconnect("0-1").is_err());
    }

    #[test]
    fn resize_plans_parse() {
        let m = 1 << 20;
        assert_eq!(
            parse_resize("5:+16M", 16 * m).unwrap(),
            ResizePlan {
                at: Duration::from_secs(5),
                size: 32 * m
            }
        );
        assert_eq!(parse_resize("1.5:64M", 16 * m).unwrap().size, 64 * m);
        assert!(parse_resize("5:8M", 16 * m).is_err(), "shrinks");
        assert!(parse_resize("5:16M", 16 * m).is_err(), "same size");
        assert!(parse_resize("5", 16 * m).is_err());
        assert!(
            parse_resize("5:+1000", 16 * m).is_err(),
            "not whole sectors"
        );
    }

    #[test]
    fn rss_is_read() {
        let s = sample(Instant::now());
        assert!(s.rss_kib > 0 && s.fds > 0, "{s:?}");
    }
}
