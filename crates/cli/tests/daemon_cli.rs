//! `xdisk serve --platform=sim` with `xdisk attach`, `stat`, `detach` against it, as a user
//! would run them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn xdisk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xdisk"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = xdisk().args(args).output().expect("xdisk runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_attach_stat_detach_on_the_simulation() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("control.sock");
    let sock_s = sock.to_str().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let img_s = img.to_str().unwrap();

    // Without a daemon: a clear message.
    let (ok, _, err) = run(&["attach", img_s, "--control", sock_s]);
    assert!(!ok);
    assert!(err.contains("daemon is not running"), "{err}");

    // Logs as JSON lines (the structured fields of each device's events are checked below).
    let log = dir.path().join("serve.log");
    let mut serve = xdisk()
        .env("XDISK_LOG", "info")
        .args([
            "--log-format=json",
            "serve",
            "--platform=sim",
            "--control",
            sock_s,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !Path::new(&sock).exists() {
        assert!(Instant::now() < until, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, out, err) = run(&["attach", img_s, "--control", sock_s, "--timeout", "20"]);
    assert!(ok, "{err}");
    assert!(out.contains("xvda") && out.contains("Connected"), "{out}");

    let (ok, out, err) = run(&["stat", "--control", sock_s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("qdisk/1/51712 (xvda): running, Connected"),
        "{out}"
    );
    let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["format"], "raw");
    assert_eq!(v[0]["phase"], "running");
    assert!(v[0]["counters"]["rd_req"].as_u64().unwrap() >= 1);
    let (ok, _, err) = run(&["stat", "xvdq", "--control", sock_s]);
    assert!(!ok && err.contains("no device"), "{err}");

    // Grown by another program: the daemon follows (online resize, as blkback does).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = run(&["stat", "xvda", "--json", "--control", sock_s]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if v[0]["size"].as_u64() == Some(24 << 20) {
            break;
        }
        assert!(Instant::now() < until, "the size did not follow: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let (ok, out, err) = run(&["detach", "xvda", "--control", sock_s]);
    assert!(ok, "{err}");
    assert!(out.contains("detached xvda"), "{out}");
    // The daemon winds the device down after the nodes went (asynchronously: `detach`
    // returns once the backend is Closed and the nodes are removed).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = run(&["stat", "--control", sock_s]);
        if out.contains("0 device(s)") {
            break;
        }
        assert!(Instant::now() < until, "the device is still listed: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let st = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = serve.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the control socket is removed");
    // Every event of a device names it: domid, devid, backend type, image.
    let text = std::fs::read_to_string(&log).unwrap();
    let stopped = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "stopped")
        .unwrap_or_else(|| panic!("no 'stopped' event in the JSON log:\n{text}"));
    assert_eq!(stopped["span"]["domid"], 1, "{stopped}");
    assert_eq!(stopped["span"]["devid"], 51712, "{stopped}");
    assert_eq!(stopped["span"]["image"], img_s, "{stopped}");
    assert_eq!(stopped["span"]["device"], "qdisk/1/51712", "{stopped}");
}

/// dist/systemd/xdisk.service is `Type=notify`: the daemon tells systemd READY=1 once its
/// control socket serves, and STOPPING=1 on SIGTERM, then exits 0.
#[test]
fn serve_speaks_sd_notify_for_the_systemd_unit() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::Builder::new()
        .prefix("xdisk-notify-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sock = dir.path().join("control.sock");
    let mut serve = xdisk()
        .args([
            "serve",
            "--platform=sim",
            "--control",
            sock.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(sock.exists(), "READY=1 before the control socket was there");
    // systemd stops the unit with SIGTERM (KillSignal=SIGTERM).
    let st = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let n = listener.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = serve.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
