//! Prometheus metrics under load, on the simulation: two guests write and read their disks
//! (a raw and a qcow2 image) through the rings while the metrics endpoint is scraped again and
//! again with a real HTTP client (curl). Every scrape passes `promtool check metrics`, every
//! counter only grows from one scrape to the next, every histogram's `+Inf` bucket equals its
//! count, and the last scrape counts at least the requests the guests made.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use xdisk_daemon::metrics::MetricsServer;
use xdisk_daemon::SupervisorConfig;

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn scrape(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", url])
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn promtool_ok(body: &str) {
    use std::io::Write;
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every sample: `name{labels}` → value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_stay_valid_and_monotonic_under_load() {
    assert!(
        tool("curl") && tool("promtool"),
        "curl and promtool are needed (scripts/setup installs them)"
    );
    let host = host();
    let sup = Arc::new(supervisor(&host, SupervisorConfig::default()));
    let s2 = sup.clone();
    let server = MetricsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move || s2.status()),
    )
    .expect("metrics endpoint");
    let url = format!("http://{}/metrics", server.local_addr());
    let raw = raw_disk(16 * MIB);
    let qcow = qcow2_disk(16 * MIB);
    let (d1, d2) = (host.guest(1), host.guest(2));
    host.add_qdisk(1, 51712, &format!("aio:{}", raw.path.display()), &[]);
    host.add_qdisk(2, 51712, &format!("qcow2:{}", qcow.path.display()), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = [d1, d2]
        .into_iter()
        .enumerate()
        .map(|(i, dom)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut front = connect(&dom, 51712);
                let mut rounds = 0u64;
                while !stop.load(Ordering::SeqCst) || rounds < 5 {
                    round_trip(&mut front, rounds * 10 + i as u64);
                    rounds += 1;
                }
                front.disconnect().unwrap();
                rounds
            })
        })
        .collect();
    let requests = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with("xdisk_requests_total{"))
            .map(|(_, v)| v)
            .sum()
    };
    let mut prev: BTreeMap<String, f64> = BTreeMap::new();
    let mut first = None;
    for _ in 0..15 {
        let body = scrape(&url);
        promtool_ok(&body);
        let now = samples(&body);
        for (k, v) in &now {
            let counter = k.contains("_total{") || k.contains("_bucket{") || k.contains("_count{");
            if let (true, Some(p)) = (counter, prev.get(k)) {
                assert!(v >= p, "{k} went down: {p} -> {v}");
            }
            if k.contains("_bucket{") && k.contains("le=\"+Inf\"") {
                let count = k.replace("_bucket{", "_count{").replace(",le=\"+Inf\"", "");
                assert_eq!(Some(v), now.get(&count), "{k} vs its count");
            }
        }
        first.get_or_insert(requests(&now));
        prev = now;
    }
    // The scrapes saw the guests' I/O going on (the load ran while they were taken).
    assert!(
        requests(&prev) > first.unwrap_or(0.0),
        "no I/O between the scrapes"
    );
    stop.store(true, Ordering::SeqCst);
    let rounds: Vec<u64> = load.into_iter().map(|t| t.join().unwrap()).collect();
    // Each round trip: 4 writes, a flush, 4 reads (some split into several requests).
    let body = scrape(&url);
    promtool_ok(&body);
    let reads: f64 = samples(&body)
        .iter()
        .filter(|(k, _)| k.starts_with("xdisk_requests_total{") && k.contains("op=\"read\""))
        .map(|(_, v)| v)
        .sum();
    let want = rounds.iter().sum::<u64>() * 4;
    assert!(
        reads >= want as f64,
        "reads counted {reads}, made at least {want}"
    );
    drop(server);
    Arc::try_unwrap(sup).expect("one owner").shutdown();
}
