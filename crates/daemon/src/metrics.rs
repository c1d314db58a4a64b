//! Prometheus metrics of the daemon (`xdisk serve --metrics ADDR:PORT`): [`render`] turns the
//! supervisor's report ([`DaemonStatus`], the one `xdisk stat` shows) into the text
//! exposition format (version 0.0.4), and [`MetricsServer`] serves it over a minimal
//! HTTP/1.1 (`GET /metrics` only) on a std [`TcpListener`].

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xdisk_backend::{Histogram, LATENCY_BOUNDS_US};

use crate::control::StatusFn;
use crate::error::{Error, Result};
use crate::status::{DaemonStatus, DeviceStatus};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request (line and headers) accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// Connections served at once; more are closed right away.
const MAX_CONNECTIONS: usize = 8;

/// How long one connection may take to send its request, and each write of the answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// What the process reports about itself, besides its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Resident memory in bytes (None: unknown).
    pub resident_memory_bytes: Option<u64>,
}

impl ProcessInfo {
    /// This process, from /proc/self/status (`VmRSS`).
    pub fn current() -> ProcessInfo {
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_vmrss(&s));
        ProcessInfo {
            resident_memory_bytes: rss,
        }
    }
}

/// `VmRSS:   1234 kB` → bytes.
fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The identity labels of a device.
fn device_labels(d: &DeviceStatus) -> String {
    format!(
        "device=\"{}\",domid=\"{}\",devid=\"{}\",backend_type=\"{}\",image=\"{}\"",
        escape_label(&d.name),
        d.frontend_domid,
        d.devid,
        escape_label(&d.backend_type),
        escape_label(d.image.as_deref().unwrap_or("")),
    )
}

/// Seconds from microseconds, as Prometheus writes floats.
fn secs(us: u64) -> String {
    // u64 → f64 loses precision only past 2^53 µs (285 years).
    #[allow(clippy::cast_precision_loss)]
    let s = us as f64 / 1e6;
    format!("{s}")
}

struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
}

fn header(out: &mut String, f: &Family<'_>) {
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
}

/// One sample per device: `value(device)` → list of (extra labels, value).
fn family<F>(out: &mut String, f: Family<'_>, devs: &[(String, &DeviceStatus)], value: F)
where
    F: Fn(&DeviceStatus) -> Vec<(&'static str, u64)>,
{
    header(out, &f);
    for (labels, d) in devs {
        for (extra, v) in value(d) {
            let sep = if extra.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{}{{{labels}{sep}{extra}}} {v}", f.name);
        }
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, op: &str, h: &Histogram) {
    let mut cum = 0u64;
    for (i, n) in h.buckets.iter().enumerate() {
        cum = cum.saturating_add(*n);
        let le = LATENCY_BOUNDS_US
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |&b| secs(b));
        // The last bucket is +Inf: it must equal the count (relaxed snapshots may differ
        // by a request completing meanwhile).
        let v = if i + 1 == h.buckets.len() {
            h.count
        } else {
            cum.min(h.count)
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},op=\"{op}\",le=\"{le}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels},op=\"{op}\"}} {}", secs(h.sum_us));
    let _ = writeln!(out, "{name}_count{{{labels},op=\"{op}\"}} {}", h.count);
}

/// The metrics of `status` and `process`, in the text exposition format 0.0.4.
pub fn render(status: &DaemonStatus, process: &ProcessInfo) -> String {
    let mut out = String::new();
    let devs: Vec<(String, &DeviceStatus)> = status
        .devices
        .iter()
        .map(|d| (device_labels(d), d))
        .collect();

    family(
        &mut out,
        Family {
            name: "xdisk_requests_total",
            kind: "counter",
            help: "Requests consumed from the rings, by operation.",
        },
        &devs,
        |d| {
            let c = &d.counters;
            vec![
                ("op=\"read\"", c.rd_req),
                ("op=\"write\"", c.wr_req),
                ("op=\"flush\"", c.f_req),
                ("op=\"barrier\"", c.barrier_req),
                ("op=\"discard\"", c.ds_req),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_indirect_requests_total",
            kind: "counter",
            help: "Indirect requests (also counted as reads or writes).",
        },
        &devs,
        |d| vec![("", d.counters.indirect_req)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_sectors_total",
            kind: "counter",
            help: "Sectors (512 bytes) transferred or discarded, by operation.",
        },
        &devs,
        |d| {
            let c = &d.counters;
            vec![
                ("op=\"read\"", c.rd_sect),
                ("op=\"write\"", c.wr_sect),
                ("op=\"discard\"", c.ds_sect),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_bytes_total",
            kind: "counter",
            help: "Bytes read or written, by operation.",
        },
        &devs,
        |d| {
            let c = &d.counters;
            vec![
                ("op=\"read\"", c.rd_sect.saturating_mul(512)),
                ("op=\"write\"", c.wr_sect.saturating_mul(512)),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_request_errors_total",
            kind: "counter",
            help: "Requests answered with an error, by kind (error, not supported).",
        },
        &devs,
        |d| {
            let c = &d.counters;
            vec![
                ("kind=\"error\"", c.errors),
                ("kind=\"eopnotsupp\"", c.eopnotsupp),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_protocol_errors_total",
            kind: "counter",
            help: "Disconnections forced by a protocol error of the frontend.",
        },
        &devs,
        |d| vec![("", d.counters.protocol_errors)],
    );
    let busy = Family {
        name: "xdisk_busy_seconds_total",
        kind: "counter",
        help: "Time with at least one request in flight (its rate is iostat's %util).",
    };
    header(&mut out, &busy);
    for (labels, d) in &devs {
        let _ = writeln!(
            out,
            "{}{{{labels}}} {}",
            busy.name,
            secs(d.counters.busy_us)
        );
    }
    family(
        &mut out,
        Family {
            name: "xdisk_persistent_grant_lookups_total",
            kind: "counter",
            help:
                "Persistent-grant cache lookups of data segments, by result (hit: already mapped).",
        },
        &devs,
        |d| {
            vec![
                ("result=\"hit\"", d.counters.pgrant_hits),
                ("result=\"miss\"", d.counters.pgrant_misses),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_poll_windows_total",
            kind: "counter",
            help: "Busy-polling windows of the queues (serve --poll-us), by result (hit: work \
                   arrived within the window, the queue did not sleep).",
        },
        &devs,
        |d| {
            vec![
                ("result=\"hit\"", d.counters.poll_hits),
                ("result=\"miss\"", d.counters.poll_misses),
            ]
        },
    );
    family(
        &mut out,
        Family {
            name: "xdisk_image_broken",
            kind: "gauge",
            help: "1 when a flush of the image failed: writes and flushes fail until reattached.",
        },
        &devs,
        |d| vec![("", d.counters.image_broken)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_lingering_queues_total",
            kind: "counter",
            help: "Queues still busy with I/O when their device disconnected (finished later).",
        },
        &devs,
        |d| vec![("", d.counters.lingering_queues)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_detached_pages_total",
            kind: "counter",
            help: "Guest pages unmapped before their request's error answer (storage deadline missed).",
        },
        &devs,
        |d| vec![("", d.counters.detached_pages)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_stuck_queues_total",
            kind: "counter",
            help: "Queues whose I/O could never be reaped (the device was failed).",
        },
        &devs,
        |d| vec![("", d.counters.stuck_queues)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_connects_total",
            kind: "counter",
            help: "Successful connections of the frontend (the first and every reconnection).",
        },
        &devs,
        |d| vec![("", d.counters.connects)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_in_flight_requests",
            kind: "gauge",
            help: "Requests consumed from the rings and not answered yet.",
        },
        &devs,
        |d| vec![("", d.counters.in_flight)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_queues",
            kind: "gauge",
            help: "Queues (rings, reactor threads) running.",
        },
        &devs,
        |d| vec![("", d.counters.queues)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_persistent_grants",
            kind: "gauge",
            help: "Grants mapped persistently (all queues).",
        },
        &devs,
        |d| vec![("", d.counters.persistent_grants)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_grant_mappings",
            kind: "gauge",
            help: "Grant mappings held (rings, persistent grants, data of requests in flight).",
        },
        &devs,
        |d| vec![("", d.counters.mappings)],
    );
    family(
        &mut out,
        Family {
            name: "xdisk_device_running",
            kind: "gauge",
            help: "1 if the device's backend runs, 0 while starting, stopping or failed.",
        },
        &devs,
        |d| vec![("", u64::from(d.phase == crate::status::Phase::Running))],
    );
    let lat = "xdisk_request_duration_seconds";
    header(
        &mut out,
        &Family {
            name: lat,
            kind: "histogram",
            help: "Latency of requests from consumption off the ring to the response, by \
                   operation (flush includes barriers).",
        },
    );
    for (labels, d) in &devs {
        let c = &d.counters;
        histogram(&mut out, lat, labels, "read", &c.rd_lat);
        histogram(&mut out, lat, labels, "write", &c.wr_lat);
        histogram(&mut out, lat, labels, "flush", &c.f_lat);
    }

    header(
        &mut out,
        &Family {
            name: "xdisk_open_devices",
            kind: "gauge",
            help: "Devices known to the daemon (running, starting, stopping or failed).",
        },
    );
    let _ = writeln!(out, "xdisk_open_devices {}", status.devices.len());
    if let Some(rss) = process.resident_memory_bytes {
        header(
            &mut out,
            &Family {
                name: "process_resident_memory_bytes",
                kind: "gauge",
                help: "Resident memory size in bytes.",
            },
        );
        let _ = writeln!(out, "process_resident_memory_bytes {rss}");
    }
    out
}

/// A running metrics endpoint. Dropping it stops the accept thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Listens on `addr` and serves `GET /metrics` from `status`.
    pub fn start(addr: SocketAddr, status: StatusFn) -> Result<MetricsServer> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("cannot listen on {addr} for metrics"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("metrics listener address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("xdisk-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(s) => spawn_connection(s, &status, &active),
                        Err(e) => {
                            tracing::warn!("metrics accept: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the metrics thread", e))?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address listened on (the port chosen when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
    }
}

/// Decrements the count of connections when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn spawn_connection(s: TcpStream, status: &StatusFn, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!("metrics: too many connections, one refused");
        return;
    }
    let slot = Slot(active.clone());
    let status = status.clone();
    let r = std::thread::Builder::new()
        .name("xdisk-metrics-conn".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_connection(s, &status) {
                tracing::debug!("metrics connection: {e}");
            }
        });
    if let Err(e) = r {
        tracing::warn!("metrics: cannot start a connection thread: {e}");
    }
}

/// What a request asks: `Some(true)` for `GET /metrics`, `Some(false)` for anything else,
/// `None` if the request is not complete yet.
fn route(req: &[u8]) -> Option<bool> {
    let end = req.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Be lenient with bare line feeds.
        req.windows(2).position(|w| w == b"\n\n")
    })?;
    let head = String::from_utf8_lossy(&req[..end]);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    Some(method == Some("GET") && path == Some("/metrics"))
}

fn serve_connection(mut s: TcpStream, status: &StatusFn) -> std::io::Result<()> {
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    s.set_read_timeout(Some(CONNECTION_DEADLINE))?;
    s.set_write_timeout(Some(CONNECTION_DEADLINE))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let metrics = loop {
        if let Some(m) = route(&req) {
            break m;
        }
        if req.len() >= MAX_REQUEST {
            return respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "",
                "too large\n",
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        s.set_read_timeout(Some(left))?;
        let room = MAX_REQUEST - req.len();
        let want = room.min(buf.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    };
    if !metrics {
        return respond(&mut s, "404 Not Found", "", "not found: GET /metrics\n");
    }
    let body = render(&status(), &ProcessInfo::current());
    respond(&mut s, "200 OK", CONTENT_TYPE, &body)
}

fn respond(s: &mut TcpStream, code: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let ctype = if ctype.is_empty() {
        "text/plain; charset=utf-8"
    } else {
        ctype
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Phase;
    use xdisk_backend::DeviceStats;

    fn device(name: &str, image: Option<&str>, c: DeviceStats) -> DeviceStatus {
        DeviceStatus {
            name: name.to_owned(),
            backend_type: "qdisk".to_owned(),
            frontend_domid: 5,
            devid: 51712,
            vdev: Some("xvda".to_owned()),
            backend_path: format!("/local/domain/0/backend/{name}"),
            frontend_path: None,
            image: image.map(str::to_owned),
            format: Some("raw".to_owned()),
            chain: Vec::new(),
            read_only: false,
            cache: None,
            phase: Phase::Running,
            xenbus_state: None,
            size: None,
            error: None,
            counters: c,
        }
    }

    fn daemon(devices: Vec<DeviceStatus>) -> DaemonStatus {
        DaemonStatus {
            pid: 1,
            version: "0".to_owned(),
            platform: "sim".to_owned(),
            backend_domid: 0,
            backend_types: vec!["qdisk".to_owned()],
            domains: None,
            attach_frontend_domid: 0,
            xenstore_path: None,
            devices,
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        let s = render(
            &daemon(vec![device(
                "qdisk/5/51712",
                Some("/img/\"odd\"\\name\n.raw"),
                DeviceStats::default(),
            )]),
            &ProcessInfo::default(),
        );
        assert!(s.contains(r#"image="/img/\"odd\"\\name\n.raw""#), "{s}");
        // No raw line feed inside a sample.
        for l in s.lines() {
            assert!(l.starts_with('#') || l.contains(' '), "{l}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let mut c = DeviceStats {
            rd_req: 7,
            rd_sect: 16,
            in_flight: 2,
            ..DeviceStats::default()
        };
        c.rd_lat.buckets[0] = 1; // <= 10 µs
        c.rd_lat.buckets[3] = 2; // <= 100 µs
        c.rd_lat.buckets[c.rd_lat.buckets.len() - 1] = 1; // > 10 s
        c.rd_lat.count = 4;
        c.rd_lat.sum_us = 1_500_000;
        let s = render(
            &daemon(vec![device("qdisk/5/51712", Some("/d.raw"), c)]),
            &ProcessInfo {
                resident_memory_bytes: Some(4096),
            },
        );
        let l =
            r#"device="qdisk/5/51712",domid="5",devid="51712",backend_type="qdisk",image="/d.raw""#;
        let has = |line: String| assert!(s.lines().any(|x| x == line), "{line}\n{s}");
        has(format!(
            "xdisk_request_duration_seconds_bucket{{{l},op=\"read\",le=\"0.00001\"}} 1"
        ));
        has(format!(
            "xdisk_request_duration_seconds_bucket{{{l},op=\"read\",le=\"0.00005\"}} 1"
        ));
        has(format!(
            "xdisk_request_duration_seconds_bucket{{{l},op=\"read\",le=\"0.0001\"}} 3"
        ));
        has(format!(
            "xdisk_request_duration_seconds_bucket{{{l},op=\"read\",le=\"10\"}} 3"
        ));
        has(format!(
            "xdisk_request_duration_seconds_bucket{{{l},op=\"read\",le=\"+Inf\"}} 4"
        ));
        has(format!(
            "xdisk_request_duration_seconds_sum{{{l},op=\"read\"}} 1.5"
        ));
        has(format!(
            "xdisk_request_duration_seconds_count{{{l},op=\"read\"}} 4"
        ));
        has(format!(
            "xdisk_request_duration_seconds_count{{{l},op=\"write\"}} 0"
        ));
        has(format!("xdisk_requests_total{{{l},op=\"read\"}} 7"));
        has(format!("xdisk_bytes_total{{{l},op=\"read\"}} 8192"));
        has(format!("xdisk_in_flight_requests{{{l}}} 2"));
        has("xdisk_open_devices 1".to_owned());
        has("process_resident_memory_bytes 4096".to_owned());
        // Buckets never decrease.
        let mut last = 0u64;
        for line in s.lines().filter(|x| {
            x.starts_with("xdisk_request_duration_seconds_bucket") && x.contains("read")
        }) {
            let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{line}");
            last = v;
        }
    }

    #[test]
    fn routes_only_get_metrics() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(true)
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Some(true));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(false));
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Some(false));
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n"), None);
    }

    #[test]
    fn vmrss_is_parsed() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t   1234 kB\nVmData: 1 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(parse_vmrss("Name: x\n"), None);
    }

    #[test]
    fn serves_metrics_and_404() {
        let st: StatusFn = Arc::new(|| daemon(Vec::new()));
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), st).unwrap();
        let get = |req: &str| {
            let mut c = TcpStream::connect(srv.local_addr()).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut s = String::new();
            // The server may close with part of an oversized request unread (a reset).
            let _ = c.read_to_string(&mut s);
            s
        };
        let r = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(CONTENT_TYPE), "{r}");
        assert!(r.contains("xdisk_open_devices 0"), "{r}");
        let r = get("GET /other HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(9000));
        let r = get(&big);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        drop(srv);
    }
}
