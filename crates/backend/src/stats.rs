//! Per-device counters, in the spirit of Linux blkback's sysfs `statistics/` directory
//! (`rd_req`, `wr_req`, `f_req`, `ds_req`, `rd_sect`, `wr_sect`, `oo_req`, ...).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A snapshot of a device's counters ([`crate::Device::stats`]), also what the daemon reports
/// (`xdisk stat --json`, the metrics).
///
/// The serde form is the daemon's JSON and must stay compatible: the field names, their
/// order, and which fields may be missing (`#[serde(default)]`: those added after the first
/// release, so that an older daemon's JSON still reads) are part of that format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Read requests (direct and indirect).
    pub rd_req: u64,
    /// Write requests (direct and indirect).
    pub wr_req: u64,
    /// `BLKIF_OP_FLUSH_DISKCACHE` requests.
    pub f_req: u64,
    /// `BLKIF_OP_WRITE_BARRIER` requests.
    pub barrier_req: u64,
    /// `BLKIF_OP_DISCARD` requests.
    pub ds_req: u64,
    /// `BLKIF_OP_INDIRECT` requests (also counted as reads or writes).
    pub indirect_req: u64,
    /// Sectors read.
    pub rd_sect: u64,
    /// Sectors written.
    pub wr_sect: u64,
    /// Sectors discarded.
    pub ds_sect: u64,
    /// Requests answered `BLKIF_RSP_ERROR`.
    pub errors: u64,
    /// Requests answered `BLKIF_RSP_EOPNOTSUPP`.
    pub eopnotsupp: u64,
    /// Requests consumed from the rings and not answered yet.
    pub in_flight: u64,
    /// Responses pushed.
    pub responses: u64,
    /// Grants currently mapped persistently (all queues).
    pub persistent_grants: u64,
    /// Grant mappings currently held by the backend (rings, persistent grants, data pages of
    /// requests in flight).
    pub mappings: u64,
    /// Queues (reactor threads) currently running.
    pub queues: u64,
    /// Successful connections (the first and every reconnection).
    pub connects: u64,
    /// Disconnections forced by a protocol error of the frontend.
    pub protocol_errors: u64,
    /// Queues that did not stop within the teardown bound and finished after the device had
    /// moved on (their I/O in flight kept them, and their mappings, alive).
    #[serde(default)]
    pub lingering_queues: u64,
    /// Queues that ended with I/O the engine could never hand back (their buffers and guest
    /// pages are kept for ever, the device was failed): a kernel or device problem.
    #[serde(default)]
    pub stuck_queues: u64,
    /// 1 when the image is broken: a flush of its file failed, so every later write and
    /// flush fails until it is reopened (see `ImageFile::mark_broken`).
    #[serde(default)]
    pub image_broken: u64,
    /// Microseconds during which at least one request was in flight (iostat's `%util` is its
    /// rate: the share of time the device was busy).
    #[serde(default)]
    pub busy_us: u64,
    /// Segments whose grant was already mapped in the persistent-grant cache.
    #[serde(default, rename = "persistent_grant_hits")]
    pub pgrant_hits: u64,
    /// Segments whose grant had to be mapped (persistent grants in use).
    #[serde(default, rename = "persistent_grant_misses")]
    pub pgrant_misses: u64,
    /// Latency of reads, from consumption off the ring to the response (as the backend
    /// sees it).
    #[serde(default)]
    pub rd_lat: Histogram,
    /// Latency of writes.
    #[serde(default)]
    pub wr_lat: Histogram,
    /// Latency of flushes and barriers.
    #[serde(default)]
    pub f_lat: Histogram,
    /// Most distinct wake-ups ever waiting for the control thread at once (frontend state,
    /// `online`, domain death, commands, queue exits are coalesced: at most 5).
    #[serde(default)]
    pub events_pending_max: u64,
    /// Watch events received (before coalescing).
    #[serde(default)]
    pub events: u64,
    /// Connections or state evaluations held back by the rate limits.
    #[serde(default)]
    pub throttled: u64,
    /// Reads and writes served by the image operation of the request before them: contiguous
    /// requests of one batch (a sequential stream the frontend split) go to the image as one
    /// operation of up to 1 MiB. `rd_req + wr_req - merged_req` operations were submitted.
    #[serde(default)]
    pub merged_req: u64,
    /// Pages of guest memory taken out of the backend's grant mappings before their request
    /// was answered (a request failed at its storage deadline while the storage, librbd, may
    /// still write into its memory: the pages are replaced by private memory and their
    /// grants released, see `MappedRegion::detach`). Nonzero: the storage missed deadlines.
    #[serde(default)]
    pub detached_pages: u64,
    /// Busy-polling windows (`DeviceConfig::poll_us`) that found work, so the queue did not
    /// sleep: `poll_hits / (poll_hits + poll_misses)` is how often polling paid.
    #[serde(default)]
    pub poll_hits: u64,
    /// Busy-polling windows that ended without work (the queue then slept).
    #[serde(default)]
    pub poll_misses: u64,
}

/// Upper bounds (inclusive, microseconds) of the latency buckets: 1-2-5 per decade, from
/// 10 µs to 10 s; a last bucket (`+Inf`) takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000,
    500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000,
];

/// Number of buckets: one per bound and `+Inf`.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// A snapshot of a latency histogram: per-bucket counts (not cumulative; bucket `i` holds
/// the latencies in `(LATENCY_BOUNDS_US[i-1], LATENCY_BOUNDS_US[i]]`, the last one the rest),
/// their sum in microseconds and their count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Latencies per bucket (bucket `i`: up to `LATENCY_BOUNDS_US[i]` µs; the last: above
    /// them all).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// The sum of all latencies recorded, in microseconds.
    pub sum_us: u64,
    /// How many latencies were recorded (requests completed).
    pub count: u64,
}

/// The bucket of a latency in microseconds.
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&b| b < us)
}

/// A latency histogram updated lock-free (relaxed atomics: the snapshot of a histogram being
/// updated may be off by the requests completing meanwhile).
#[derive(Debug, Default)]
pub(crate) struct AtomicHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    pub fn record(&self, us: u64) {
        if let Some(b) = self.buckets.get(latency_bucket(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram {
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
            ..Histogram::default()
        };
        for (d, s) in h.buckets.iter_mut().zip(self.buckets.iter()) {
            *d = s.load(Ordering::Relaxed);
        }
        h
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub rd_req: AtomicU64,
    pub wr_req: AtomicU64,
    pub f_req: AtomicU64,
    pub barrier_req: AtomicU64,
    pub ds_req: AtomicU64,
    pub indirect_req: AtomicU64,
    pub rd_sect: AtomicU64,
    pub wr_sect: AtomicU64,
    pub ds_sect: AtomicU64,
    pub errors: AtomicU64,
    pub eopnotsupp: AtomicU64,
    pub in_flight: AtomicU64,
    pub responses: AtomicU64,
    pub persistent_grants: AtomicU64,
    pub mappings: AtomicU64,
    pub queues: AtomicU64,
    pub connects: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub events_pending_max: AtomicU64,
    pub events: AtomicU64,
    pub throttled: AtomicU64,
    pub lingering_queues: AtomicU64,
    pub stuck_queues: AtomicU64,
    pub busy_ns: AtomicU64,
    /// When `busy_ns` was last brought up to date (ns since [`mono_ns`]'s epoch).
    pub busy_mark_ns: AtomicU64,
    pub pgrant_hits: AtomicU64,
    pub pgrant_misses: AtomicU64,
    pub merged_req: AtomicU64,
    /// Pages of grant mappings detached so far (requests past their deadline, see
    /// `MappedRegion::detach`): the persistent-grant caches look for detached mappings only
    /// when this moved.
    pub detached_pages: AtomicU64,
    pub poll_hits: AtomicU64,
    pub poll_misses: AtomicU64,
    /// The cap on `mappings` (0: none); not a counter.
    pub max_mappings: AtomicU64,
    pub rd_lat: AtomicHistogram,
    pub wr_lat: AtomicHistogram,
    pub f_lat: AtomicHistogram,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

/// Nanoseconds on a monotonic clock (since the first call in this process).
fn mono_ns() -> u64 {
    mono_ns_at(std::time::Instant::now())
}

/// `at` in [`mono_ns`]'s terms, without reading the clock (but the first time).
fn mono_ns_at(at: std::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let e = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(at.saturating_duration_since(*e).as_nanos()).unwrap_or(u64::MAX)
}

impl Counters {
    /// A request was consumed from a ring at `now` (in flight until
    /// [`Counters::request_done_at`]). The time is the caller's: a queue reads the clock
    /// once per batch of requests or completions, not per request (where the clock is a
    /// system call, as in a Xen PV dom0 without a vDSO clock, a read costs ~30 us under the
    /// lab's TCG).
    pub fn request_started_at(&self, now: std::time::Instant) {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.busy_tick(before, mono_ns_at(now));
    }

    /// A request was answered at `now`.
    pub fn request_done_at(&self, now: std::time::Instant) {
        let before = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.busy_tick(before, mono_ns_at(now));
    }

    /// Adds the time since the last tick to `busy_ns` if requests were in flight then, as
    /// Linux's `io_ticks` (updated at every start and completion; approximate when queues
    /// tick at once, never more than the time elapsed).
    /// The mark only moves forward: a queue ticking with a batch time older than another
    /// queue's last tick adds nothing.
    fn busy_tick(&self, in_flight_before: u64, now: u64) {
        let last = self.busy_mark_ns.fetch_max(now, Ordering::Relaxed);
        if in_flight_before > 0 && now > last {
            self.busy_ns.fetch_add(now - last, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> DeviceStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // The busy period under way counts up to now.
        let mut busy = g(&self.busy_ns);
        if g(&self.in_flight) > 0 {
            busy = busy.saturating_add(mono_ns().saturating_sub(g(&self.busy_mark_ns)));
        }
        DeviceStats {
            rd_req: g(&self.rd_req),
            wr_req: g(&self.wr_req),
            f_req: g(&self.f_req),
            barrier_req: g(&self.barrier_req),
            ds_req: g(&self.ds_req),
            indirect_req: g(&self.indirect_req),
            rd_sect: g(&self.rd_sect),
            wr_sect: g(&self.wr_sect),
            ds_sect: g(&self.ds_sect),
            errors: g(&self.errors),
            eopnotsupp: g(&self.eopnotsupp),
            in_flight: g(&self.in_flight),
            responses: g(&self.responses),
            persistent_grants: g(&self.persistent_grants),
            mappings: g(&self.mappings),
            queues: g(&self.queues),
            connects: g(&self.connects),
            protocol_errors: g(&self.protocol_errors),
            events_pending_max: g(&self.events_pending_max),
            events: g(&self.events),
            throttled: g(&self.throttled),
            lingering_queues: g(&self.lingering_queues),
            stuck_queues: g(&self.stuck_queues),
            image_broken: 0,
            busy_us: busy / 1000,
            pgrant_hits: g(&self.pgrant_hits),
            pgrant_misses: g(&self.pgrant_misses),
            rd_lat: self.rd_lat.snapshot(),
            wr_lat: self.wr_lat.snapshot(),
            f_lat: self.f_lat.snapshot(),
            merged_req: g(&self.merged_req),
            detached_pages: g(&self.detached_pages),
            poll_hits: g(&self.poll_hits),
            poll_misses: g(&self.poll_misses),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(10), 0);
        assert_eq!(latency_bucket(11), 1);
        assert_eq!(latency_bucket(10_000_000), LATENCY_BUCKETS - 2);
        assert_eq!(latency_bucket(10_000_001), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn histogram_records() {
        let h = AtomicHistogram::default();
        h.record(5);
        h.record(150);
        h.record(u64::MAX / 2);
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[4], 1); // 150 µs: (100, 200]
        assert_eq!(s.buckets[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.buckets.iter().sum::<u64>(), 3);
    }

    #[test]
    fn busy_time_ticked_with_an_older_batch_time_never_goes_back_or_double_counts() {
        let c = Counters::default();
        let t0 = std::time::Instant::now();
        let later = |ms| t0 + std::time::Duration::from_millis(ms);
        c.request_started_at(later(10)); // queue A
        c.request_started_at(later(20)); // queue B: busy 10..20
        c.request_done_at(later(15)); // A answers with its older batch time: adds nothing
        c.request_done_at(later(30)); // B: 20..30
        let busy = c.busy_ns.load(Ordering::Relaxed);
        assert_eq!(busy, 20_000_000, "busy 10 ms to 30 ms, counted once");
    }

    #[test]
    fn busy_time_counts_only_while_requests_are_in_flight() {
        let c = Counters::default();
        let t = std::time::Instant::now();
        c.request_started_at(std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(30));
        let during = c.snapshot().busy_us;
        c.request_done_at(std::time::Instant::now());
        let busy = c.snapshot().busy_us;
        let total = t.elapsed().as_micros() as u64;
        assert!(during >= 30_000, "busy so far: {during} µs");
        assert!(busy >= 30_000 && busy <= total, "busy {busy} µs of {total}");
        // Idle: nothing more is counted.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(c.snapshot().busy_us, busy);
    }
}
