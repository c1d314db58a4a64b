//! The workload: the jobs' requests kept in flight on the frontend's queues, their
//! completions (latency, verification), the reconnections and the online resize of the soak
//! options, and the final verification pass.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use xdisk_backend::Device;
use xdisk_blkfront::{Completion, Error as FrontError, Frontend, Op};
use xdisk_blkif::wire::Status;
use xdisk_image::Image;

use super::hist::Histogram;
use super::options::Params;
use super::rig::check_connection;
use super::soak::{ResizePlan, ResizeSeen};
use super::verify;

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
pub struct Side {
    pub ios: u64,
    pub bytes: u64,
    pub clat: Histogram,
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
pub struct ResizeDone {
    pub at: Option<Duration>,
    pub result: Option<std::result::Result<u64, String>>,
}

pub struct Bench<'a> {
    p: &'a Params,
    front: &'a mut Frontend,
    jobs: Vec<Job>,
    in_flight: HashMap<u64, InFlight>,
    pub read: Side,
    pub write: Side,
    blocks: Option<Blocks>,
    /// Blocks of the region (grows with an online resize).
    nblocks: u64,
    /// Blocks from this one on lie past the image's original end: never written in this run,
    /// they must read as zeroes.
    zero_from: Option<u64>,
    writes_issued: u64,
    pub verified: u64,
    pub mismatches: u64,
    pub failure: Option<String>,
    pub errors: u64,
    completions: Vec<Completion>,
    /// Start of the run.
    t0: Instant,
    /// `--reconnect`: its own random numbers and the next time.
    reconnect_rng: Rng,
    next_reconnect: Option<Instant>,
    pub reconnects: u64,
    pub resubmitted: u64,
    /// `--resize_at`: the resize thread's report, and what the frontend saw.
    pub resize_done: Arc<Mutex<ResizeDone>>,
    pub resize: ResizeSeen,
    /// Sectors the frontend last knew.
    sectors: u64,
}

impl<'a> Bench<'a> {
    pub fn new(p: &'a Params, front: &'a mut Frontend, t0: Instant) -> Bench<'a> {
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

    pub fn fail(&mut self, msg: String) {
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
    pub fn run(&mut self) -> Result<Duration> {
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
    pub fn verify_pass(&mut self) -> Result<u64> {
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

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The resize thread: at `plan.at` into the run (unless `stop` says the run is over), grows
/// the image and tells the backend.
pub fn resize_thread(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
