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
    // `detach` returns only once the daemon has closed the image too (not just once the
    // backend is Closed): a SIGKILL of the daemon right after it would otherwise catch the
    // device writing its image's metadata back (a leaked cluster in a qcow2 image).
    let (_, out, _) = run(&["stat", "--control", sock_s]);
    assert!(
        out.contains("0 device(s)"),
        "listed after detach returned: {out}"
    );

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

/// Kills a child process when dropped (a failed assertion must not leave servers behind).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_path(p: &Path, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < until, "no {what} ({})", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `xdisk attach` of NBD exports served by `xdisk nbd`: the URI (any spelling, a relative
/// socket made absolute) goes into params for the daemon, which serves the export to the
/// simulation's guest through xdisk's NBD client; the format is probed over NBD or given
/// (qcow2 over a raw export of a qcow2 file); an export nobody serves fails at once.
#[test]
fn attach_nbd_exports_on_the_simulation() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-cli-nbd-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let raw = d.join("disk.raw");
    std::fs::write(&raw, vec![0x5au8; 4 << 20]).unwrap();
    let qcow = d.join("disk.qcow2");
    let (ok, _, err) = run(&["img", "create", "-f", "qcow2", qcow.to_str().unwrap(), "8M"]);
    assert!(ok, "{err}");
    let nbd_sock = d.join("nbd.sock");
    let _nbd = Reaped(
        xdisk()
            .current_dir(d)
            .args(["nbd", "-t", "-e", "8", "-k", "nbd.sock"])
            .args(["--export", "r=raw:disk.raw", "--export", "q=raw:disk.qcow2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&nbd_sock, "NBD socket");
    let sock = d.join("control.sock");
    let sock_s = sock.to_str().unwrap();
    let serve = Reaped(
        xdisk()
            .args(["serve", "--platform=sim", "--control", sock_s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock, "control socket");
    let attach = |args: &[&str]| {
        let out = xdisk()
            .current_dir(d)
            .arg("attach")
            .args(args)
            .args(["--control", sock_s, "--timeout", "20"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let stat = || {
        let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };

    let abs = nbd_sock.to_str().unwrap();
    // The simulation's guest takes one disk at a time: attach, look, detach, in turn.
    let cases: [(&[&str], &str, &str, u64); 2] = [
        // A relative socket path, the format probed over NBD (raw).
        (&["nbd+unix:///r?socket=nbd.sock"], "r", "raw", 4 << 20),
        // QEMU's legacy spelling, the format given: qcow2 on a raw export of a qcow2 file.
        (
            &["--format", "qcow2", "nbd:unix:nbd.sock:exportname=q"],
            "q",
            "qcow2",
            8 << 20,
        ),
    ];
    for (args, export, format, size) in cases {
        let (ok, out, err) = attach(args);
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains("xvda") && out.contains("Connected"), "{out}");
        let v = stat();
        let a = &v[0];
        assert_eq!(a["devid"], 51712, "{a}");
        assert_eq!(
            a["image"],
            format!("nbd+unix:///{export}?socket={abs}"),
            "{a}"
        );
        assert_eq!(a["format"], format, "{a}");
        assert_eq!(a["size"], size, "{a}");
        assert!(
            a["counters"]["rd_req"].as_u64().unwrap() >= 1,
            "the guest read through NBD: {a}"
        );
        let (ok, out, err) = run(&["detach", "xvda", "--control", sock_s]);
        assert!(ok, "{err}");
        assert!(out.contains("detached"), "{out}");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, out, _) = run(&["stat", "--control", sock_s]);
            if out.contains("0 device(s)") {
                break;
            }
            assert!(Instant::now() < until, "devices left: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Nobody serves this socket: the probe fails at once and nothing is left.
    let t0 = Instant::now();
    let (ok, _, err) = attach(&["nbd+unix:///r?socket=none.sock"]);
    assert!(!ok);
    assert!(err.contains("none.sock"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (_, out, _) = run(&["stat", "--control", sock_s]);
    assert!(out.contains("0 device(s)"), "nothing was written: {out}");
    drop(serve);
}

/// `xdisk snapshot`, `xdisk commit` and `xdisk bitmap` against `xdisk serve --platform=sim`,
/// as a user runs them: a relative overlay path (made absolute for the daemon), `--socket`, `--json`, the
/// chain in `xdisk stat`, the clear refusals; the images pass `qemu-img check` afterwards.
#[test]
fn snapshot_and_bitmap_commands_on_the_simulation() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("control.sock");
    let sock_s = sock.to_str().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    let (ok, _, err) = run(&["img", "create", "-f", "qcow2", img_s, "16M"]);
    assert!(ok, "{err}");
    let serve = Reaped(
        xdisk()
            .args(["serve", "--platform=sim", "--control", sock_s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock, "control socket");
    let in_dir = |args: &[&str]| {
        let out = xdisk().args(args).current_dir(dir.path()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["attach", img_s, "--format", "qcow2", "--control", sock_s]);
    assert!(ok, "{err}");

    let (ok, _, err) = run(&[
        "bitmap", "add", "xvda", "b0", "-g", "64k", "--socket", sock_s,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["bitmap", "list", "xvda", "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "b0", "{out}");
    assert_eq!(v[0]["granularity"], 65536, "{out}");
    assert_eq!(v[0]["enabled"], true, "{out}");
    let (ok, _, err) = run(&["bitmap", "merge", "xvda", "b0", "--socket", sock_s]);
    assert!(!ok && err.contains("--source"), "{err}");

    // An existing file is not an overlay unless --no-create says so.
    std::fs::write(dir.path().join("taken.qcow2"), b"x").unwrap();
    let (ok, _, err) = in_dir(&["snapshot", "xvda", "taken.qcow2", "--socket", sock_s]);
    assert!(!ok && err.contains("--no-create"), "{err}");
    // --rbd-snap: for RBD disks only (this one is a host file), never with an overlay; one
    // of the two is needed.
    let (ok, _, err) = run(&["snapshot", "xvda", "--rbd-snap", "s1", "--socket", sock_s]);
    assert!(!ok && err.contains("is not one"), "{err}");
    let (ok, _, err) = in_dir(&[
        "snapshot",
        "xvda",
        "o.qcow2",
        "--rbd-snap",
        "s1",
        "--socket",
        sock_s,
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = run(&["snapshot", "xvda", "--socket", sock_s]);
    assert!(!ok && err.contains("OVERLAY"), "{err}");

    let (ok, out, err) = in_dir(&[
        "snapshot",
        "xvda",
        "snap.qcow2",
        "--json",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    let overlay = dir.path().join("snap.qcow2");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["image"], overlay.to_str().unwrap(), "{out}");
    assert_eq!(v["backing"], img_s, "{out}");
    assert_eq!(v["backing_format"], "qcow2", "{out}");
    let (ok, out, err) = run(&["stat", "xvda", "--control", sock_s]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "chain (top first): {} (qcow2), {img_s} (qcow2, ro)",
            overlay.display()
        )),
        "{out}"
    );
    // The bitmaps stay in the old top; the overlay starts without.
    let (ok, out, err) = run(&["bitmap", "list", "xvda", "--socket", sock_s]);
    assert!(ok && out.is_empty(), "{out}{err}");
    // Merged back: the device serves the first image again.
    let (ok, out, err) = run(&["commit", "xvda", "--wait", "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "completed", "{out}");
    assert_eq!(v["kind"], "commit", "{out}");
    assert_eq!(v["commit"]["image"], img_s, "{out}");
    let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["image"], img_s, "{out}");
    let (ok, _, err) = run(&["commit", "xvda", "--socket", sock_s]);
    assert!(!ok && err.contains("no backing file"), "{err}");
    // In the background: the job's ID at once, then `xdisk jobs` and `xdisk job`.
    let (ok, _, err) = in_dir(&["snapshot", "xvda", "snap2.qcow2", "--socket", sock_s]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["commit", "xvda", "--speed", "10X", "--socket", sock_s]);
    assert!(!ok && err.contains("--speed"), "{err}");
    let (ok, out, err) = run(&[
        "commit", "xvda", "--speed", "10M", "--json", "--socket", sock_s,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], 2, "{out}");
    assert_eq!(v["speed"], 10 << 20, "{out}");
    assert_eq!(v["device"], "qdisk/1/51712", "{out}");
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = run(&["jobs", "--json", "--socket", sock_s]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2, "{out}");
        assert_eq!(v[0]["state"], "completed", "{out}");
        if v[1]["state"] == "completed" {
            assert_eq!(v[1]["commit"]["image"], img_s, "{out}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out, err) = run(&["jobs", "--socket", sock_s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("   2  commit  qdisk/1/51712") && out.contains("completed"),
        "{out}"
    );
    let (ok, _, err) = run(&["job", "cancel", "2", "--socket", sock_s]);
    assert!(!ok && err.contains("job 2 is completed"), "{err}");
    let (ok, _, err) = run(&["job", "pause", "99", "--json", "--socket", sock_s]);
    assert!(!ok && err.contains("no job 99"), "{err}");
    let (ok, _, err) = run(&["job", "stop", "2", "--socket", sock_s]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    // xdisk commit --top: snap3 over img, snap4 over snap3; snap3 goes into img.
    let (ok, _, err) = in_dir(&["snapshot", "xvda", "snap3.qcow2", "--socket", sock_s]);
    assert!(ok, "{err}");
    let (ok, _, err) = in_dir(&["snapshot", "xvda", "snap4.qcow2", "--socket", sock_s]);
    assert!(ok, "{err}");
    let (ok, _, err) = in_dir(&["commit", "xvda", "--top", "disk.qcow2", "--socket", sock_s]);
    assert!(!ok && err.contains("nothing to commit into"), "{err}");
    let (ok, out, err) = in_dir(&[
        "commit",
        "xvda",
        "--top",
        "snap3.qcow2",
        "--wait",
        "--json",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "completed", "{out}");
    assert_eq!(v["commit"]["image"], img_s, "{out}");
    let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["chain"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(v[0]["chain"][1]["image"], img_s, "{out}");
    // xdisk stream: --base named relative to the working directory.
    let (ok, _, err) = in_dir(&[
        "stream",
        "xvda",
        "--base",
        "nosuch.qcow2",
        "--socket",
        sock_s,
    ]);
    assert!(!ok && err.contains("not a layer under the top"), "{err}");
    let (ok, out, err) = in_dir(&[
        "stream",
        "xvda",
        "--base",
        "disk.qcow2",
        "--wait",
        "--json",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "stream", "{out}");
    assert_eq!(v["state"], "completed", "{out}");
    assert_eq!(v["stream"]["backing"], img_s, "{out}");
    let (ok, out, err) = run(&[
        "stream", "xvda", "--speed", "1M", "--wait", "--socket", sock_s,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("its backing file is now none"), "{out}");
    assert!(err.contains("completed"), "{err}");
    let snap4 = dir.path().join("snap4.qcow2");
    let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["chain"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(v[0]["image"], snap4.to_str().unwrap(), "{out}");
    let (ok, _, err) = run(&["stream", "xvda", "--socket", sock_s]);
    assert!(!ok && err.contains("no backing file"), "{err}");
    // xdisk mirror: ready without --pivot, then `xdisk job complete`; with --pivot to raw.
    let (ok, _, err) = in_dir(&[
        "mirror", "xvda", "m.raw", "--sync", "top", "--format", "raw", "--socket", sock_s,
    ]);
    assert!(!ok && err.contains("qcow2 target"), "{err}");
    let (ok, out, err) = in_dir(&[
        "mirror", "xvda", "m.qcow2", "--wait", "--json", "--socket", sock_s,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "mirror", "{out}");
    assert_eq!(v["state"], "ready", "{out}");
    let id = v["id"].as_u64().unwrap().to_string();
    // xdisk job set-speed, on the ready mirror.
    let (ok, out, err) = run(&["job", "set-speed", &id, "20M", "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["speed"], 20 << 20, "{out}");
    let (ok, out, err) = run(&["job", "set-speed", &id, "0", "--socket", sock_s]);
    assert!(
        ok && out.contains("set-speed requested") && out.contains("no speed limit"),
        "{out}{err}"
    );
    let (ok, _, err) = run(&["job", "set-speed", &id, "--socket", sock_s]);
    assert!(!ok && err.contains("BYTES is missing"), "{err}");
    let (ok, _, err) = run(&["job", "set-speed", &id, "1X", "--socket", sock_s]);
    assert!(!ok && err.contains("set-speed 1X"), "{err}");
    let (ok, _, err) = run(&["job", "pause", &id, "1M", "--socket", sock_s]);
    assert!(!ok && err.contains("unexpected argument"), "{err}");
    let (ok, _, err) = run(&["job", "set-speed", "2", "1M", "--socket", sock_s]);
    assert!(!ok && err.contains("job 2 is completed"), "{err}");
    let (ok, out, err) = run(&["job", "complete", &id, "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pivot"], true, "{out}");
    let m = dir.path().join("m.qcow2");
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = run(&["stat", "xvda", "--json", "--control", sock_s]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v[0]["image"] == m.to_str().unwrap() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = in_dir(&[
        "mirror", "xvda", "m2.raw", "-f", "raw", "--pivot", "--wait", "--socket", sock_s,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("mirrored to") && out.contains("(raw)"),
        "{out}"
    );

    let (ok, _, err) = run(&["detach", "xvda", "--control", sock_s]);
    assert!(ok, "{err}");
    // Stopped as systemd stops it (SIGTERM: every image closed), not killed: a SIGKILL
    // right after the detach may catch the device closing its image, and leak a cluster.
    let mut serve = serve;
    let pid = serve.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    while serve.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "xdisk serve does not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(serve);
    let snap2 = dir.path().join("snap2.qcow2");
    let snap3 = dir.path().join("snap3.qcow2");
    let m = dir.path().join("m.qcow2");
    for p in [
        img_s,
        overlay.to_str().unwrap(),
        snap2.to_str().unwrap(),
        snap3.to_str().unwrap(),
        dir.path().join("snap4.qcow2").to_str().unwrap(),
        m.to_str().unwrap(),
    ] {
        let out = Command::new("qemu-img")
            .args(["check", p])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", img_s])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
        "{v}"
    );
}

/// `xdisk backup` against `xdisk serve --platform=sim` as a user runs it: a relative socket
/// path in the URI (made absolute for the daemon), `--json`, the export read by nbdinfo
/// with its `qemu:dirty-bitmap:` context, `xdisk jobs` listing it, `--finish
/// --clear-bitmap`, and the refusals (a second backup, a finish without a backup, options
/// that do not go together).
#[test]
fn backup_command_on_the_simulation() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("control.sock");
    let sock_s = sock.to_str().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    let (ok, _, err) = run(&["img", "create", "-f", "qcow2", img_s, "16M"]);
    assert!(ok, "{err}");
    let serve = Reaped(
        xdisk()
            .args(["serve", "--platform=sim", "--control", sock_s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock, "control socket");
    let in_dir = |args: &[&str]| {
        let out = xdisk().args(args).current_dir(dir.path()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["attach", img_s, "--format", "qcow2", "--control", sock_s]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["bitmap", "add", "xvda", "b0", "--socket", sock_s]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["backup", "xvda", "--socket", sock_s]);
    assert!(!ok && err.contains("--export"), "{err}");
    let (ok, _, err) = run(&[
        "backup", "xvda", "--finish", "--bitmap", "b0", "--socket", sock_s,
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = run(&["backup", "xvda", "--finish", "--socket", sock_s]);
    assert!(!ok && err.contains("no backup runs"), "{err}");
    let (ok, _, err) = run(&[
        "backup",
        "xvda",
        "--bitmap",
        "nosuch",
        "--export",
        "nbd+unix:///b?socket=b.sock",
        "--socket",
        sock_s,
    ]);
    assert!(!ok && err.contains("no bitmap"), "{err}");

    let (ok, out, err) = in_dir(&[
        "backup",
        "xvda",
        "--bitmap",
        "b0",
        "--new-bitmap",
        "b1",
        "--export",
        "nbd+unix:///full?socket=b.sock",
        "--json",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "backup", "{out}");
    assert_eq!(v["state"], "running", "{out}");
    let b = dir.path().join("b.sock");
    assert_eq!(
        v["backup"]["export"],
        format!("nbd+unix:///full?socket={}", b.display()),
        "{out}"
    );
    assert_eq!(v["backup"]["bitmap"], "b0", "{out}");
    let uri = format!("nbd+unix:///full?socket={}", b.display());
    let out = Command::new("nbdinfo")
        .args(["--list", "--content"])
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("qemu:dirty-bitmap:b0"), "{text}");
    assert!(text.contains("is_read_only: true"), "{text}");
    let out = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:b0"])
        .arg(&uri)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, out, err) = run(&["jobs", "--socket", sock_s]);
    assert!(ok && out.contains("backup"), "{out}{err}");
    let (ok, _, err) = run(&[
        "backup",
        "xvda",
        "--export",
        "nbd+unix:///x?socket=/tmp/x.sock",
        "--socket",
        sock_s,
    ]);
    assert!(!ok && err.contains("runs on it"), "{err}");
    let (ok, out, err) = run(&[
        "backup",
        "xvda",
        "--finish",
        "--clear-bitmap",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("now holds the writes since the backup"),
        "{out}"
    );
    assert!(!b.exists());
    let (ok, out, err) = run(&["bitmap", "list", "xvda", "--socket", sock_s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("b0") && out.contains("b1") && !out.contains("xdisk-backup-"),
        "{out}"
    );
    // A second (plain-text) backup, finished by `xdisk job complete`.
    let (ok, out, err) = in_dir(&[
        "backup",
        "xvda",
        "--export",
        "nbd+unix:///?socket=b.sock",
        "--socket",
        sock_s,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("exports the disk as of now"), "{out}");
    let (ok, out, err) = run(&["jobs", "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v.as_array().unwrap().last().unwrap()["id"].to_string();
    let (ok, _, err) = run(&["job", "complete", &id, "--socket", sock_s]);
    assert!(ok, "{err}");
    let t0 = Instant::now();
    while b.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the export stays");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A backup has no `pivot` (finishing it is no switch), even once finished by `job
    // complete`.
    let (ok, out, err) = run(&["jobs", "--json", "--socket", sock_s]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let last = v.as_array().unwrap().last().unwrap();
    assert_eq!(last["kind"], "backup", "{out}");
    assert!(last.get("pivot").is_none(), "{out}");
    let (ok, _, err) = run(&["detach", "xvda", "--control", sock_s]);
    assert!(ok, "{err}");
    drop(serve);
    let out = Command::new("qemu-img")
        .args(["check", img_s])
        .output()
        .unwrap();
    assert!(out.status.success());
}
