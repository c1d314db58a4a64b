//! `xdisk serve --platform=sim --metrics`: scraped with a real HTTP client (curl), validated
//! with `promtool check metrics`, and `xdisk stat --watch`.

mod support;
use support::{have, xdisk};

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{content_type}",
            url,
        ])
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, meta) = text.rsplit_once('\n').unwrap();
    (body.to_owned() + "\n", meta.to_owned())
}

/// The value of the one sample whose line starts with `prefix` and contains `needle`.
fn sample(body: &str, prefix: &str, needle: &str) -> f64 {
    let line = body
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(needle))
        .unwrap_or_else(|| panic!("no {prefix} with {needle}:\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn serve_metrics_scraped_and_valid_and_stat_watch() {
    if !have("curl") || !have("promtool") {
        // scripts/setup installs both (curl, prometheus).
        panic!("curl and promtool are needed (scripts/setup installs them)");
    }
    let dir = tempfile::Builder::new()
        .prefix("xdisk-metrics-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("control.sock");
    let sock_s = sock.to_str().unwrap();
    let img = dir.path().join("disk \"1\".raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let img_s = img.to_str().unwrap();
    let port = free_port();
    let serve = Serve(
        xdisk()
            .args([
                "serve",
                "--platform=sim",
                "--control",
                sock_s,
                "--metrics",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !Path::new(&sock).exists() {
        assert!(Instant::now() < until, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://127.0.0.1:{port}/metrics");
    let (body, meta) = curl(&url);
    assert_eq!(meta, "200 text/plain; version=0.0.4; charset=utf-8");
    assert!(body.contains("xdisk_open_devices 0"), "{body}");

    // The simulated guest's blkfront reads the disk as it connects.
    let out = xdisk()
        .args(["attach", img_s, "--control", sock_s, "--timeout", "20"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (body, _) = curl(&url);
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let res = check.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let dev = format!(
        "device=\"qdisk/1/51712\",domid=\"1\",devid=\"51712\",backend_type=\"qdisk\",image=\"{}\"",
        img_s.replace('"', "\\\"")
    );
    assert!(body.contains(&dev), "{dev}\n{body}");
    assert!(sample(&body, "xdisk_requests_total{", "op=\"read\"") >= 1.0);
    assert!(sample(&body, "xdisk_bytes_total{", "op=\"read\"") >= 512.0);
    assert!(sample(&body, "xdisk_queues{", &dev) >= 1.0);
    let count = sample(
        &body,
        "xdisk_request_duration_seconds_count{",
        "op=\"read\"",
    );
    assert!(count >= 1.0, "{body}");
    let inf = sample(
        &body,
        "xdisk_request_duration_seconds_bucket{",
        "op=\"read\",le=\"+Inf\"",
    );
    assert_eq!(inf, count);
    assert_eq!(sample(&body, "xdisk_open_devices", ""), 1.0);
    assert!(sample(&body, "process_resident_memory_bytes", "") > 0.0);

    // Anything but GET /metrics: 404.
    let (_, meta) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(meta.starts_with("404"), "{meta}");

    // Two reports with their header, then it stops.
    let out = xdisk()
        .args(["stat", "--watch", "1", "--count", "2", "--control", sock_s])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("Device ")).count(),
        2,
        "{text}"
    );
    assert!(text.contains("r_await") && text.contains("wMB/s"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("qdisk/1/51712 (xvda)"))
            .count(),
        2,
        "{text}"
    );
    drop(serve);
}
