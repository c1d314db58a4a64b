//! A frontend storming its `state` node (XSA-349 class): the backend coalesces the watch
//! events (its queue stays a few entries long whatever the guest does), rate-limits the
//! connect/disconnect cycles, keeps its threads bounded, and a second device's I/O carries on.
//! (Its own test binary: it samples the process's threads.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use xdisk_blkfront::FrontConfig;
use xdisk_blkif::XenbusState;

const MIB: u64 = 1 << 20;
const VICTIM: u16 = 1;
const BYSTANDER: u16 = 2;
const WRITES: usize = 100_000;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn state_storm_is_coalesced_and_rate_limited() {
    let host = host();
    let d1 = raw_disk(4 * MIB);
    let d2 = raw_disk(4 * MIB);
    let mut bystander = pair(
        &host,
        BYSTANDER,
        768,
        open_image(&d2.path, false),
        |_| {},
        FrontConfig::default(),
    );
    let victim = pair(
        &host,
        VICTIM,
        768,
        open_image(&d1.path, false),
        |_| {},
        FrontConfig::default(),
    );
    assert_eq!(victim.device.state(), XenbusState::Connected);
    let threads_before = thread_count();
    let rss_before = rss_kib();

    // The bystander does I/O all along, timing each request.
    let stop = Arc::new(AtomicBool::new(false));
    let max_threads = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let io = {
        let stop = stop.clone();
        let latencies = latencies.clone();
        let max_threads = max_threads.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let data = pattern(i, 64 * 1024);
                let t = Instant::now();
                bystander.front.write(i % 64 * 128, &data).unwrap();
                let back = bystander.front.read(i % 64 * 128, 128).unwrap();
                let dt = t.elapsed();
                assert!(back == data, "bystander data");
                assert!(dt < Duration::from_secs(10), "bystander stalled {dt:?}");
                latencies.lock().unwrap().push(dt);
                max_threads.fetch_max(thread_count(), Ordering::SeqCst);
                i += 1;
            }
            bystander
        })
    };

    // The hostile guest rewrites its state node, cycling Closed -> Initialising ->
    // Initialised (a full disconnect/connect each time, its ring nodes left in place), and
    // creates children under it.
    let xs = victim.dom.xenstore().unwrap();
    let node = format!("{}/state", fe_dir(VICTIM, 768));
    let start = Instant::now();
    let mut max_pending = 0;
    for i in 0..WRITES {
        let v = ["6", "1", "3"][i % 3];
        xs.write(&node, v).unwrap();
        if i % 1000 == 999 {
            xs.write(&format!("{node}/child{}", i / 1000), "x").unwrap();
            max_pending = max_pending.max(victim.device.stats().events_pending_max);
            max_threads.fetch_max(thread_count(), Ordering::SeqCst);
        }
    }
    let storm = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let mut bystander = io.join().unwrap();

    let s = victim.device.stats();
    let lat = {
        let mut l = latencies.lock().unwrap().clone();
        l.sort();
        l
    };
    let pct = |p: usize| lat.get(lat.len() * p / 100).copied().unwrap_or_default();
    eprintln!(
        "storm of {WRITES} writes took {storm:?}; victim: {} events, {} connects, {} throttled, \
         event queue at most {}; threads {} before, {} at most; RSS {} KiB before, {} KiB after; \
         bystander: {} requests, latency p50 {:?} p99 {:?} max {:?}",
        s.events,
        s.connects,
        s.throttled,
        s.events_pending_max.max(max_pending),
        threads_before,
        max_threads.load(Ordering::SeqCst),
        rss_before,
        rss_kib(),
        lat.len(),
        pct(50),
        pct(99),
        lat.last().copied().unwrap_or_default(),
    );
    // The queue of events never held more than one entry per kind.
    assert!(s.events_pending_max <= 5, "{s:?}");
    // Connections are rate-limited: a burst, then about one a second.
    let allowed = 16 + 2 * storm.as_secs() + 2;
    assert!(
        s.connects <= allowed,
        "{} connects in {storm:?} (at most {allowed})",
        s.connects
    );
    assert!(s.throttled > 0, "{s:?}");
    // Threads stay bounded (the victim's queues, lingering ones included, and the test's).
    assert!(
        max_threads.load(Ordering::SeqCst) <= threads_before + 12,
        "threads: {} before, {} at most",
        threads_before,
        max_threads.load(Ordering::SeqCst)
    );
    assert!(!lat.is_empty(), "the bystander made progress");
    // The bystander is unaffected, and the victim still answers its handle.
    assert_eq!(bystander.device.state(), XenbusState::Connected);
    let t = Instant::now();
    victim.device.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "victim shutdown");
    bystander.front.disconnect().unwrap();
    bystander.device.shutdown().unwrap();
}
