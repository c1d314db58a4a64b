//! Live operations on running devices (issue #14), on the simulation, through the daemon's
//! control socket as `xdisk snapshot` / `xdisk bitmap` send them, with a guest's Rust
//! blkfront writing through the ring the whole time (several requests in flight on two
//! queues, flushes among them) and a model of what it wrote checked against what qemu-img
//! reads.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xdisk_blkfront::{FrontConfig, Frontend, Op};
use xdisk_blkif::wire::Status;
use xdisk_daemon::control::{self, BitmapAction, ControlRequest, ControlServer};
use xdisk_daemon::jobs::{JobAction, JobInfo, JobKind, JobState};
use xdisk_daemon::{Supervisor, SupervisorConfig};

const BLOCK: usize = 4096;
const DISK: u64 = 8 * MIB;
const BLOCKS: u64 = DISK / BLOCK as u64;

/// One write the writer made: block, version (its data is `pattern(version)`), when it was
/// put on the ring and when its answer came.
#[derive(Debug, Clone, Copy)]
struct WriteRec {
    block: u64,
    version: u64,
    submitted: Instant,
    acked: Instant,
}

fn data_of(version: u64) -> Vec<u8> {
    if version == 0 {
        vec![0; BLOCK]
    } else {
        pattern(version, BLOCK)
    }
}

/// A daemon on the simulation with its control socket, serving one guest's disks.
struct Daemon {
    host: Host,
    sup: Arc<Supervisor>,
    sock: PathBuf,
    _server: ControlServer,
    _dir: tempfile::TempDir,
}

fn daemon() -> Daemon {
    let host = host();
    let sup = Arc::new(supervisor(&host, SupervisorConfig::default()));
    let dir = tmpdir();
    let sock = dir.path().join("control.sock");
    let s2 = sup.clone();
    let live: Arc<dyn control::LiveOps> = sup.clone();
    let server =
        ControlServer::start_with(&sock, Arc::new(move || s2.status()), Some(live)).unwrap();
    Daemon {
        host,
        sup,
        sock,
        _server: server,
        _dir: dir,
    }
}

impl Daemon {
    fn snapshot(&self, dev: &str, overlay: &Path, no_create: bool) -> xdisk_daemon::Result<()> {
        control::request(
            &self.sock,
            &ControlRequest::Snapshot {
                device: dev.into(),
                overlay: overlay.to_str().unwrap().into(),
                no_create,
            },
        )
        .map(|_| ())
    }

    fn bitmap(
        &self,
        dev: &str,
        action: BitmapAction,
        name: &str,
        source: Option<&str>,
    ) -> xdisk_daemon::Result<Vec<control::BitmapEntry>> {
        control::request(
            &self.sock,
            &ControlRequest::Bitmap {
                device: dev.into(),
                action,
                name: Some(name.into()),
                granularity: Some(65536),
                disabled: false,
                source: source.map(str::to_owned),
            },
        )
        .map(|r| r.bitmaps.unwrap_or_default())
    }

    /// Stops the control socket, then the supervisor (every device closes its image).
    fn stop(self) -> Host {
        let Daemon {
            host,
            mut sup,
            _server,
            ..
        } = self;
        drop(_server);
        let deadline = Instant::now() + T;
        loop {
            match Arc::try_unwrap(sup) {
                Ok(s) => {
                    s.shutdown();
                    return host;
                }
                Err(s) => {
                    assert!(Instant::now() < deadline, "the supervisor is still shared");
                    sup = s;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Starts a commit job.
    fn commit_job(&self, dev: &str, speed: u64) -> xdisk_daemon::Result<JobInfo> {
        control::request(
            &self.sock,
            &ControlRequest::Commit {
                device: dev.into(),
                speed,
                top: None,
                base: None,
            },
        )
        .map(|r| r.job.unwrap())
    }

    /// Waits for a job's end.
    fn wait(&self, id: u64) -> JobInfo {
        control::wait_job(&self.sock, id, Duration::from_millis(20), |_| {}).unwrap()
    }

    /// A commit job, waited for: its result, or why it failed.
    fn commit(&self, dev: &str) -> Result<control::CommitReply, String> {
        let j = self.commit_job(dev, 0).map_err(|e| e.to_string())?;
        let end = self.wait(j.id);
        match end.state {
            JobState::Completed => Ok(end.commit.unwrap()),
            _ => Err(format!("{end:?}")),
        }
    }

    /// Starts a stream job.
    fn stream_job(
        &self,
        dev: &str,
        base: Option<&Path>,
        speed: u64,
    ) -> xdisk_daemon::Result<JobInfo> {
        control::request(
            &self.sock,
            &ControlRequest::Stream {
                device: dev.into(),
                base: base.map(|b| b.to_str().unwrap().to_owned()),
                speed,
            },
        )
        .map(|r| r.job.unwrap())
    }

    /// Starts a mirror job.
    fn mirror_job(
        &self,
        dev: &str,
        target: &Path,
        format: &str,
        sync: &str,
        pivot: bool,
        speed: u64,
    ) -> xdisk_daemon::Result<JobInfo> {
        control::request(
            &self.sock,
            &ControlRequest::Mirror {
                device: dev.into(),
                target: target.to_str().unwrap().into(),
                format: Some(format.into()),
                sync: Some(sync.into()),
                pivot,
                speed,
            },
        )
        .map(|r| r.job.unwrap())
    }

    fn chain_of(&self, dev: &str) -> Vec<String> {
        let st = control::status(&self.sock).unwrap();
        let d = st.devices.iter().find(|d| d.matches(dev)).unwrap();
        d.chain.iter().map(|l| l.image.clone()).collect()
    }

    fn job(&self, id: u64, action: JobAction) -> xdisk_daemon::Result<JobInfo> {
        control::request(&self.sock, &ControlRequest::Job { id, action }).map(|r| r.job.unwrap())
    }

    fn image_of(&self, dev: &str) -> String {
        let st = control::status(&self.sock).unwrap();
        let d = st.devices.iter().find(|d| d.matches(dev)).unwrap();
        d.image.clone().unwrap()
    }
}

/// A writer that keeps up to 8 writes of 4 KiB in flight on every queue of `front` (never
/// two on one block at once) with a flush every 16 writes and an empty barrier every 64,
/// until `stop`; returns the frontend and every write, in completion order.
fn writer(
    front: Frontend,
    stop: Arc<AtomicBool>,
    first_version: u64,
) -> std::thread::JoinHandle<(Frontend, Vec<WriteRec>)> {
    paced_writer(front, stop, first_version, Arc::new(AtomicU64::new(0)))
}

/// [`writer`], submitting one write at a time with a pause of `pace` microseconds between
/// two while `pace` is not 0 (a guest that writes less).
fn paced_writer(
    mut front: Frontend,
    stop: Arc<AtomicBool>,
    first_version: u64,
    pace: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(Frontend, Vec<WriteRec>)> {
    std::thread::spawn(move || {
        let nq = front.info().queues.max(1);
        let mut rng = first_version.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut version = first_version;
        let mut inflight: HashMap<u64, (u64, u64, Instant)> = HashMap::new(); // tag -> (block, version, submitted)
        let mut busy_blocks = std::collections::HashSet::new();
        let mut flushes = 0usize;
        let mut recs = Vec::new();
        let mut n = 0u64;
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            let pace_us = pace.load(Ordering::SeqCst);
            let mut room = if pace_us > 0 { 1 } else { usize::MAX };
            if pace_us > 0 {
                std::thread::sleep(Duration::from_micros(pace_us));
            }
            while !stopping && inflight.len() < 8 * nq && room > 0 {
                room -= 1;
                let block = next() % BLOCKS;
                if !busy_blocks.insert(block) {
                    continue;
                }
                version += 1;
                let q = (n as usize) % nq;
                n += 1;
                let sub = Instant::now();
                match front.submit(
                    q,
                    Op::Write {
                        sector: block * (BLOCK as u64 / 512),
                        data: data_of(version),
                    },
                ) {
                    Ok(tag) => {
                        inflight.insert(tag, (block, version, sub));
                    }
                    Err(xdisk_blkfront::Error::RingFull(_)) => {
                        busy_blocks.remove(&block);
                        break;
                    }
                    Err(e) => panic!("submit: {e}"),
                }
                if n.is_multiple_of(16) {
                    let op = if n.is_multiple_of(64) {
                        Op::Barrier {
                            sector: 0,
                            data: Vec::new(),
                        }
                    } else {
                        Op::Flush
                    };
                    match front.submit(q, op) {
                        Ok(_) => flushes += 1,
                        Err(xdisk_blkfront::Error::RingFull(_)) => {}
                        Err(e) => panic!("flush: {e}"),
                    }
                }
            }
            if stopping && inflight.is_empty() && flushes == 0 {
                break;
            }
            for c in front.poll(Duration::from_millis(100)).expect("poll") {
                assert_eq!(c.status, Status::Okay, "a request failed: {c:?}");
                let now = Instant::now();
                match inflight.remove(&c.tag) {
                    Some((block, version, submitted)) => {
                        busy_blocks.remove(&block);
                        recs.push(WriteRec {
                            block,
                            version,
                            submitted,
                            acked: now,
                        });
                    }
                    None => flushes = flushes.saturating_sub(1),
                }
            }
        }
        (front, recs)
    })
}

/// The disk as the writes (in completion order) left it: the version of every block.
fn model(recs: &[WriteRec], until: impl Fn(&WriteRec) -> bool) -> Vec<u64> {
    let mut m = vec![0u64; BLOCKS as usize];
    for r in recs.iter().filter(|r| until(r)) {
        m[r.block as usize] = r.version;
    }
    m
}

fn bytes_of(m: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DISK as usize);
    for &ver in m {
        v.extend(data_of(ver));
    }
    v
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn check_clean(path: &Path) {
    qemu_img(&["check", "-U", path.to_str().unwrap()]);
}

fn front_cfg() -> FrontConfig {
    FrontConfig {
        max_queues: 2,
        ..FrontConfig::default()
    }
}

/// The old top holds, for every block, what the write acknowledged last before the
/// snapshot request was sent, or a write made after that one and put on the ring before the
/// request's answer came (in flight across the snapshot) — never older data, never a write
/// made after the snapshot returned.
fn check_old_top(old: &[u8], recs: &[WriteRec], sent: Instant, answered: Instant) {
    let before = model(recs, |r| r.acked < sent);
    let mut allowed: Vec<Vec<u64>> = before.iter().map(|&v| vec![v]).collect();
    for r in recs {
        if r.acked >= sent && r.submitted < answered {
            allowed[r.block as usize].push(r.version);
        }
    }
    let mut in_flight_seen = 0;
    for b in 0..BLOCKS as usize {
        let got = &old[b * BLOCK..(b + 1) * BLOCK];
        let ok = allowed[b]
            .iter()
            .position(|&v| got == data_of(v).as_slice());
        match ok {
            Some(0) => {}
            Some(_) => in_flight_seen += 1,
            None => panic!(
                "block {b} of the old top holds none of the versions {:?} (acked before the snapshot: {})",
                allowed[b], before[b]
            ),
        }
    }
    eprintln!("old top: every block as of the snapshot ({in_flight_seen} blocks from writes in flight across it)");
}

#[test]
fn live_snapshot_under_writes_keeps_old_top_consistent_and_chain_complete() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("snap1.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    assert_eq!(front.info().queues, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(front, stop.clone(), 1);
    std::thread::sleep(Duration::from_millis(400));
    let sent = Instant::now();
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    let answered = Instant::now();
    eprintln!("snapshot took {:?}", answered - sent);
    // The old top is consistent and complete while the guest goes on writing.
    check_clean(&disk.path);
    let old_now = contents(&disk.path);
    std::thread::sleep(Duration::from_millis(400));
    // A second snapshot on top of the first one.
    let overlay2 = disk.dir.path().join("snap2.qcow2");
    d.snapshot("qdisk/1/51712", &overlay2, false)
        .expect("second snapshot");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let after = recs.iter().filter(|r| r.submitted > answered).count();
    assert!(
        recs.len() > 100 && after > 20,
        "the writer wrote {} blocks ({after} after the snapshot)",
        recs.len()
    );
    check_old_top(&old_now, &recs, sent, answered);
    // The old top did not change after the snapshot.
    assert!(
        contents(&disk.path) == old_now,
        "the old top changed after the snapshot"
    );
    // The status shows the chain; params names the newest overlay.
    let st = control::status(&d.sock).unwrap();
    let dev = &st.devices[0];
    assert_eq!(dev.image.as_deref(), Some(overlay2.to_str().unwrap()));
    let chain: Vec<(&str, bool)> = dev
        .chain
        .iter()
        .map(|l| (l.image.as_str(), l.read_only))
        .collect();
    assert_eq!(
        chain,
        [
            (overlay2.to_str().unwrap(), false),
            (overlay.to_str().unwrap(), true),
            (disk.path.to_str().unwrap(), true)
        ]
    );
    assert!(
        dev.render().contains("chain (top first)"),
        "{}",
        dev.render()
    );
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", overlay2.display()).as_str())
    );
    // What the frontend reads is the model of every write.
    let fin = model(&recs, |_| true);
    let want = bytes_of(&fin);
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    // Every image of the chain is clean, and the chain read by qemu-img is the model.
    for p in [&disk.path, &overlay, &overlay2] {
        check_clean(p);
    }
    assert!(
        contents(&overlay2) == want,
        "the chain differs from the model"
    );
    let info = qemu_img(&["info", "--backing-chain", overlay2.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("backing file: {}", overlay.display())),
        "{info}"
    );
}

#[test]
fn failed_snapshots_leave_the_device_on_its_old_top() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let ro = qcow2_disk(DISK);
    let dom = d.host.guest(1);
    // Another guest: the simulation's blkfront takes the guest's memory as its own, so one
    // guest runs one frontend at a time.
    let dom2 = d.host.guest(2);
    let top = format!("qcow2:{}", disk.path.display());
    d.host.add_qdisk(1, 51712, &top, &[]);
    d.host.add_qdisk(
        2,
        51712,
        &format!("qcow2:{}", ro.path.display()),
        &[("mode", "r")],
    );
    let mut front = connect_with(&dom, 51712, front_cfg());
    let ro_front = connect(&dom2, 51712);
    // Two guests' xvda: the name alone is ambiguous.
    let e = d
        .snapshot("xvda", &ro.dir.path().join("o.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("names several devices"), "{e}");
    let params = "/local/domain/0/backend/qdisk/1/51712/params";

    // A read-only device.
    let o = ro.dir.path().join("o.qcow2");
    let e = d
        .snapshot("qdisk/2/51712", &o, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
    assert!(!o.exists());
    // An overlay in a directory that does not exist.
    let e = d
        .snapshot(
            "1/51712",
            Path::new("/nonexistent-xdisk-dir/o.qcow2"),
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot create"), "{e}");
    // A relative path, a path with '..'.
    let e = d
        .snapshot("1/51712", Path::new("o.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absolute"), "{e}");
    let dotdot = disk.dir.path().join("../o.qcow2");
    assert!(d.snapshot("1/51712", &dotdot, false).is_err());
    // An existing file without --no-create: left as it is.
    let existing = disk.dir.path().join("existing.qcow2");
    std::fs::write(&existing, b"precious").unwrap();
    let e = d
        .snapshot("1/51712", &existing, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--no-create"), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
    // --no-create with an overlay over another image, and with something not qcow2.
    let other = qcow2_disk(DISK);
    let wrong = disk.dir.path().join("wrong.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        other.path.to_str().unwrap(),
        "-F",
        "qcow2",
        wrong.to_str().unwrap(),
    ]);
    let e = d.snapshot("1/51712", &wrong, true).unwrap_err().to_string();
    assert!(e.contains("names the backing file"), "{e}");
    assert!(
        wrong.exists(),
        "an overlay given with --no-create is never removed"
    );
    assert!(d.snapshot("1/51712", &existing, true).is_err());
    // No such device.
    assert!(d.snapshot("xvdz", &o, false).is_err());

    // Nothing changed: the device serves its old top, params is as it was.
    assert_eq!(d.image_of("1/51712"), disk.path.display().to_string());
    assert_eq!(d.host.read(params).as_deref(), Some(top.as_str()));
    let writes = round_trip(&mut front, 77);
    check_image(&disk.path, &writes);

    // --no-create with a correct overlay works.
    let good = disk.dir.path().join("good.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        disk.path.to_str().unwrap(),
        "-F",
        "qcow2",
        good.to_str().unwrap(),
    ]);
    d.snapshot("/local/domain/0/backend/qdisk/1/51712", &good, true)
        .expect("snapshot with --no-create");
    assert_eq!(d.image_of("1/51712"), good.display().to_string());
    let later = round_trip(&mut front, 78);
    front.disconnect().unwrap();
    drop(ro_front);
    d.stop();
    check_clean(&disk.path);
    check_clean(&good);
    // The old top kept the writes of before, the overlay has the later ones (the same
    // sectors).
    check_image(&disk.path, &writes);
    check_image(&good, &later);
}

#[test]
fn live_snapshot_of_a_raw_disk_names_a_raw_backing_file() {
    let d = daemon();
    let disk = raw_disk(DISK);
    let overlay = disk.dir.path().join("over.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("aio:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let before = round_trip(&mut front, 11);
    d.snapshot("1/51712", &overlay, false).expect("snapshot");
    // Other sectors than round_trip's.
    let after = [(2000u64, pattern(12, 8192))];
    for (s, data) in &after {
        front.write(*s, data).unwrap();
    }
    front.flush().unwrap();
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", overlay.display()).as_str())
    );
    front.disconnect().unwrap();
    d.stop();
    check_clean(&overlay);
    let info = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_eq!(info["virtual-size"], DISK, "{info}");
    check_image(&disk.path, &before);
    assert!(
        std::fs::read(&disk.path).unwrap()[2000 * 512..2016 * 512] == [0u8; 8192],
        "the raw old top took a write made after the snapshot"
    );
    check_image(&overlay, &before);
    check_image(&overlay, &after);
}

#[test]
fn active_commit_under_writes_merges_the_overlay_and_pivots_to_the_base() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("tmp.qcow2");
    let dom = d.host.guest(1);
    let base_params = format!("qcow2:{}", disk.path.display());
    d.host.add_qdisk(1, 51712, &base_params, &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let commit = |d: &Daemon| d.commit("xvda");
    // Nothing to commit without a backing file.
    let e = commit(&d).unwrap_err();
    assert!(e.contains("no backing file"), "{e}");
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(front, stop.clone(), 2_000_000);
    std::thread::sleep(Duration::from_millis(300));
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    std::thread::sleep(Duration::from_millis(400));
    let r = commit(&d).expect("commit");
    eprintln!("commit: {r:?}");
    assert_eq!(r.image, disk.path.display().to_string());
    assert!(r.copied_bytes > 0 && r.passes >= 3, "{r:?}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let st = control::status(&d.sock).unwrap();
    let dev = &st.devices[0];
    assert_eq!(dev.image.as_deref(), Some(disk.path.to_str().unwrap()));
    assert_eq!(dev.chain.len(), 1, "{:?}", dev.chain);
    assert!(!dev.chain[0].read_only);
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(base_params.as_str())
    );
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    check_clean(&overlay);
    // The base alone holds everything, and no bitmap is left behind.
    assert!(
        contents(&disk.path) == want,
        "the base differs from the model"
    );
    for p in [&disk.path, &overlay] {
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(
            info["format-specific"]["data"]["bitmaps"].is_null(),
            "{info}"
        );
    }
}

#[test]
fn snapshot_before_the_frontend_connects_serves_the_overlay() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("early.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    wait_until("the device runs", T, || {
        d.sup
            .device("qdisk/1/51712")
            .is_some_and(|s| s.phase == xdisk_daemon::status::Phase::Running)
    });
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    let mut front = connect_with(&dom, 51712, front_cfg());
    let writes = round_trip(&mut front, 21);
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    check_clean(&overlay);
    check_image(&overlay, &writes);
    assert!(
        contents(&disk.path).iter().all(|&b| b == 0),
        "the old top took writes"
    );
}

/// The dirty ranges of bitmap `name` of `image`, as qemu-nbd exports them
/// (`nbdinfo --map=qemu:dirty-bitmap:NAME`): (offset, length) of every dirty extent.
fn dirty_ranges(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tmpdir();
    let sock = dir.path().join("nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg(image)
        .spawn()
        .expect("qemu-nbd runs");
    wait_until("qemu-nbd listens", T, || sock.exists());
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("nbdinfo runs");
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines: "offset length type description".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

fn covered(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    ranges.iter().any(|&(o, l)| o <= off && off + len <= o + l)
}

#[test]
fn bitmap_added_live_records_every_write_acked_after_it() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let raw = raw_disk(MIB);
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    // Another guest (one frontend per simulated guest).
    let dom2 = d.host.guest(2);
    d.host
        .add_qdisk(2, 51728, &format!("aio:{}", raw.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let _raw_front = connect(&dom2, 51728);
    // Bitmaps need qcow2.
    let e = d
        .bitmap("xvdb", BitmapAction::Add, "b0", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("qcow2"), "{e}");

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(front, stop.clone(), 1_000_000);
    std::thread::sleep(Duration::from_millis(300));
    let list = d
        .bitmap("xvda", BitmapAction::Add, "b0", None)
        .expect("bitmap add");
    let added = Instant::now();
    assert_eq!(list.len(), 1);
    assert!(list[0].enabled && list[0].in_use && list[0].granularity == 65536);
    // Spelled like qemu-img: adding it twice fails with its message.
    let e = d
        .bitmap("xvda", BitmapAction::Add, "b0", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Operation add on bitmap b0 failed"), "{e}");
    std::thread::sleep(Duration::from_millis(400));
    // A second bitmap, cleared and merged from b0 while the guest writes.
    d.bitmap("xvda", BitmapAction::Add, "b1", None).unwrap();
    d.bitmap("xvda", BitmapAction::Disable, "b1", None).unwrap();
    d.bitmap("xvda", BitmapAction::Clear, "b1", None).unwrap();
    d.bitmap("xvda", BitmapAction::Merge, "b1", Some("b0"))
        .unwrap();
    d.bitmap("xvda", BitmapAction::Add, "gone", None).unwrap();
    let list = d
        .bitmap("xvda", BitmapAction::Remove, "gone", None)
        .unwrap();
    let names: Vec<(&str, bool)> = list.iter().map(|b| (b.name.as_str(), b.enabled)).collect();
    assert_eq!(names, [("b0", true), ("b1", false)]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let after: Vec<&WriteRec> = recs.iter().filter(|r| r.acked > added).collect();
    assert!(after.len() > 50, "{} writes after the add", after.len());
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    let info = qemu_img(&["info", "--output=json", disk.path.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps.as_array().map(Vec::len), Some(2), "{info}");
    let dirty = dirty_ranges(&disk.path, "b0");
    for r in &after {
        assert!(
            covered(&dirty, r.block * BLOCK as u64, BLOCK as u64),
            "write to block {} acked after the add is not in the bitmap {dirty:?}",
            r.block
        );
    }
    // b1 is a copy of b0 as of the merge: its ranges lie inside b0's.
    let dirty1 = dirty_ranges(&disk.path, "b1");
    assert!(!dirty1.is_empty());
    for &(o, l) in &dirty1 {
        assert!(
            (o..o + l)
                .step_by(65536)
                .all(|x| covered(&dirty, x, 65536.min(o + l - x))),
            "b1 {dirty1:?} not inside b0 {dirty:?}"
        );
    }
}

/// A child process of this test binary running only the test `test` (a `*_kill_child`
/// test, which does nothing unless `env` is set: here to `dir`), to be killed with SIGKILL;
/// every line of its stdout that holds `tag` is handed over from the tag on (the harness
/// prints `test NAME ... ` before the child's own output on the same line).
struct KillChild {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl KillChild {
    fn spawn(test: &str, env: &str, dir: &Path, tag: &'static str) -> KillChild {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(env, dir)
            .env(TMP_ROOT_ENV, dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(i) = l.find(tag) {
                    let _ = tx.send(l[i..].to_owned());
                }
            }
        });
        KillChild { child, lines }
    }

    /// The next tagged line, waited for up to 60 s.
    fn line(&self) -> Option<String> {
        self.lines.recv_timeout(Duration::from_secs(60)).ok()
    }

    /// Runs the child until its first tagged line (it is ready), lets it go on for
    /// `delay_ms`, kills it; returns the next tagged line it printed before, if any.
    fn kill_after(
        test: &str,
        env: &str,
        dir: &Path,
        tag: &'static str,
        delay_ms: u64,
    ) -> Option<String> {
        let child = KillChild::spawn(test, env, dir, tag);
        let ready = child.line();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let done = child.kill();
        assert!(ready.is_some(), "the child never got ready");
        done
    }

    /// Kills the child (SIGKILL) and reaps it; returns the next tagged line it printed
    /// before, if any.
    fn kill(mut self) -> Option<String> {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        self.lines.try_recv().ok()
    }
}

/// Writes `(sector, data)` as JSON (data in hex), for a child to print them.
fn enc_writes(w: &[(u64, Vec<u8>)]) -> serde_json::Value {
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    w.iter()
        .map(|(s, d)| serde_json::json!([s, hex(d)]))
        .collect()
}

/// What [`enc_writes`] wrote.
fn dec_writes(v: &serde_json::Value) -> Vec<(u64, Vec<u8>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let hex = w[1].as_str().unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (w[0].as_u64().unwrap(), bytes)
        })
        .collect()
}

/// A child's daemon serving `dir/NAME`, a new empty qcow2 image of [`DISK`] bytes, to the
/// connected frontend of guest 1 (xvda).
fn kill_child_daemon(dir: &Path, name: &str) -> (Daemon, Frontend) {
    let d = daemon();
    let image = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        &DISK.to_string(),
    ]);
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", image.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    (d, front)
}

/// A child's guest with two layers: 64 blocks of 64 KiB written to `dir/base.qcow2`, a
/// snapshot to `dir/top.qcow2`, 16 blocks written to the top (flushed); see
/// [`two_layer_model`].
fn two_layer_child(dir: &Path) -> (Daemon, Frontend) {
    let (d, mut front) = kill_child_daemon(dir, "base.qcow2");
    for i in 0..64u64 {
        front.write(i * 256, &pattern(100 + i, 65536)).unwrap();
    }
    front.flush().unwrap();
    d.snapshot("xvda", &dir.join("top.qcow2"), false)
        .expect("snapshot");
    for i in 0..16u64 {
        front
            .write(i * 1024 + 64, &pattern(300 + i, 65536))
            .unwrap();
    }
    front.flush().unwrap();
    (d, front)
}

/// The disk [`two_layer_child`] wrote.
fn two_layer_model() -> Vec<u8> {
    let mut want = vec![0u8; DISK as usize];
    for i in 0..64u64 {
        let o = (i * 256 * 512) as usize;
        want[o..o + 65536].copy_from_slice(&pattern(100 + i, 65536));
    }
    for i in 0..16u64 {
        let o = ((i * 1024 + 64) * 512) as usize;
        want[o..o + 65536].copy_from_slice(&pattern(300 + i, 65536));
    }
    want
}

const KILL_CHILD: &str = "XDISK_LIVE_KILL_CHILD";

/// The child of [`sigkill_right_after_a_snapshot_restarts_on_the_overlay`] (does nothing
/// unless run by it): a daemon with one disk, writes, a live snapshot, writes to the
/// overlay, a flush; then it prints what the xenstore says of the disk (what a real
/// xenstored, which outlives the daemon, would keep) and the writes, and waits for its kill.
#[test]
fn sigkill_child() {
    let Ok(dir) = std::env::var(KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, mut front) = kill_child_daemon(&dir, "base.qcow2");
    let before = round_trip(&mut front, 5);
    d.snapshot("xvda", &dir.join("overlay.qcow2"), false)
        .expect("snapshot");
    // Other sectors than round_trip's, so that both sets stay readable.
    let after = [(1000u64, pattern(6, 65536)), (5000, pattern(7, 4096))];
    for (s, data) in &after {
        front.write(*s, data).unwrap();
    }
    front.flush().unwrap();
    let params = d
        .host
        .read("/local/domain/0/backend/qdisk/1/51712/params")
        .unwrap();
    let state = serde_json::json!({
        "params": params,
        "before": enc_writes(&before),
        "after": enc_writes(&after),
    });
    println!("LIVE-KILL {state}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A daemon killed (SIGKILL) right after a live snapshot: the backend's `params` names the
/// overlay, so the restarted daemon serves the overlay over the old top; both images pass
/// `qemu-img check` and hold every write flushed before the kill.
#[test]
fn sigkill_right_after_a_snapshot_restarts_on_the_overlay() {
    let dir = tmpdir();
    let child = KillChild::spawn("sigkill_child", KILL_CHILD, dir.path(), "LIVE-KILL ");
    let line = child.line();
    child.kill();
    let line = line.expect("the child got ready");
    let state: serde_json::Value =
        serde_json::from_str(line.strip_prefix("LIVE-KILL ").unwrap()).unwrap();
    let (before, after) = (dec_writes(&state["before"]), dec_writes(&state["after"]));
    let params = state["params"].as_str().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    assert_eq!(params, format!("qcow2:{}", overlay.display()));
    check_clean(&base);
    check_clean(&overlay);
    check_image(&base, &before);
    check_image(&overlay, &before);
    check_image(&overlay, &after);

    // The restart: the toolstack's nodes as the killed daemon left them.
    let d = daemon();
    let dom = d.host.guest(1);
    d.host.add_qdisk(1, 51712, params, &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    for (s, data) in before.iter().chain(&after) {
        assert!(
            &front.read(*s, (data.len() / 512) as u64).unwrap() == data,
            "sector {s} differs after the restart"
        );
    }
    let st = control::status(&d.sock).unwrap();
    let chain: Vec<&str> = st.devices[0]
        .chain
        .iter()
        .map(|l| l.image.as_str())
        .collect();
    assert_eq!(chain, [overlay.to_str().unwrap(), base.to_str().unwrap()]);
    let more = round_trip(&mut front, 8);
    front.disconnect().unwrap();
    d.stop();
    check_clean(&base);
    check_clean(&overlay);
    check_image(&base, &before);
    check_image(&overlay, &more);
}

/// Live requests with unusable values get a clear error and change nothing; the daemon goes
/// on serving.
#[test]
fn control_socket_refuses_malformed_live_requests() {
    use std::io::{BufRead, BufReader, Write};
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let dom = d.host.guest(1);
    let top = format!("qcow2:{}", disk.path.display());
    d.host.add_qdisk(1, 51712, &top, &[]);
    let mut front = connect(&dom, 51712);
    let long = "a".repeat(5000);
    let dir = disk.dir.path().display().to_string();
    let requests = [
        r#"{"cmd":"snapshot","device":"xvda"}"#.to_string(),
        r#"{"cmd":"snapshot","device":"xvda","overlay":"/tmp/a\u0001b"}"#.into(),
        format!(r#"{{"cmd":"snapshot","device":"xvda","overlay":"/{long}"}}"#),
        r#"{"cmd":"snapshot","device":"xvda","overlay":"nbd://host/x"}"#.into(),
        r#"{"cmd":"snapshot","device":"xvda","overlay":"rbd:pool/x"}"#.into(),
        r#"{"cmd":"snapshot","device":"xvda","overlay":"/"}"#.into(),
        format!(r#"{{"cmd":"snapshot","device":"xvda","overlay":"{}"}}"#, disk.path.display()),
        format!(r#"{{"cmd":"snapshot","device":"","overlay":"{dir}/x.qcow2"}}"#),
        r#"{"cmd":"bitmap","device":"xvda","action":"frobnicate","name":"b"}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"add"}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"add","name":""}"#.into(),
        format!(r#"{{"cmd":"bitmap","device":"xvda","action":"add","name":"{long}"}}"#),
        r#"{"cmd":"bitmap","device":"xvda","action":"add","name":"b","granularity":3}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"add","name":"b","granularity":18446744073709551615}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"merge","name":"b"}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"remove","name":"nosuch"}"#.into(),
        r#"{"cmd":"bitmap","device":"xvda","action":"add","name":"xdisk-commit-1-1"}"#.into(),
        r#"{"cmd":"commit","device":"xvda"}"#.into(),
        r#"{"cmd":"commit","device":"xvda","speed":-1}"#.into(),
        r#"{"cmd":"commit","device":"xvda","speed":"fast"}"#.into(),
        r#"{"cmd":"job","id":1,"action":"cancel"}"#.into(),
        r#"{"cmd":"job","id":-1,"action":"cancel"}"#.into(),
        r#"{"cmd":"job","id":1}"#.into(),
        r#"{"cmd":"job","id":1,"action":"explode"}"#.into(),
        r#"{"cmd":"job","id":18446744073709551615,"action":"pause"}"#.into(),
        r#"{"cmd":"job","id":1,"action":"complete"}"#.into(),
        r#"{"cmd":"mirror","device":"xvda","target":"rel.qcow2"}"#.into(),
        format!(r#"{{"cmd":"mirror","device":"xvda","target":"{dir}/m.x","format":"vmdk"}}"#),
        format!(r#"{{"cmd":"mirror","device":"xvda","target":"{dir}/m.x","sync":"none"}}"#),
        format!(r#"{{"cmd":"mirror","device":"xvda","target":"{dir}/../m.x"}}"#),
        format!(r#"{{"cmd":"mirror","device":"xvda","target":"{}"}}"#, disk.path.display()),
        r#"{"cmd":"mirror","device":"xvda","target":"nbd://h/x"}"#.into(),
        r#"{"cmd":"stream","device":"xvda"}"#.into(),
        r#"{"cmd":"stream","device":"xvda","base":"/nonexistent"}"#.into(),
    ];
    for req in &requests {
        let mut s = std::os::unix::net::UnixStream::connect(&d.sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{req} -> {line}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{line}");
    }
    assert_eq!(d.image_of("xvda"), disk.path.display().to_string());
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(top.as_str())
    );
    let list = control::request(
        &d.sock,
        &ControlRequest::Bitmap {
            device: "xvda".into(),
            action: BitmapAction::List,
            name: None,
            granularity: None,
            disabled: false,
            source: None,
        },
    )
    .unwrap();
    assert_eq!(list.bitmaps, Some(vec![]));
    let writes = round_trip(&mut front, 3);
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    check_image(&disk.path, &writes);
}

/// The names of an image's persistent bitmaps, as `qemu-img info` reads them.
fn bitmap_names(image: &Path) -> Vec<String> {
    let info = qemu_img(&["info", "-U", "--output=json", image.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A commit runs as a background job while the guest writes: paused (it copies nothing
/// more, and the device takes no other live operation meanwhile), resumed, cancelled (the
/// device stays on its top, the temporary bitmap is gone, the chain reads as before), then
/// a second one limited by `--speed` takes at least about as long as its first pass needs
/// at that speed and pivots; the frontend reads its model, qemu-img checks both images
/// clean and reads the model from the base.
#[test]
fn commit_job_pause_resume_cancel_and_speed_under_writes() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("tmp.qcow2");
    let dom = d.host.guest(1);
    let base_params = format!("qcow2:{}", disk.path.display());
    d.host.add_qdisk(1, 51712, &base_params, &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 3_000_000, pace.clone());
    std::thread::sleep(Duration::from_millis(200));
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    std::thread::sleep(Duration::from_millis(600));

    // Slow enough to be caught running: 512 KiB/s.
    let j = d.commit_job("xvda", 512 << 10).expect("commit job");
    assert_eq!(j.kind, JobKind::Commit);
    assert_eq!(j.device, "qdisk/1/51712");
    assert_eq!(j.speed, 512 << 10);
    assert!(j.total_bytes > 0, "{j:?}");
    // One job per device.
    let e = d.commit_job("xvda", 0).unwrap_err().to_string();
    assert!(e.contains("runs on it"), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    let p = d.job(j.id, JobAction::Pause).expect("pause");
    assert_eq!(p.state, JobState::Paused);
    std::thread::sleep(Duration::from_millis(300));
    let before = d.job(j.id, JobAction::Pause).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let after = d.job(j.id, JobAction::Pause).unwrap();
    assert_eq!(after.state, JobState::Paused);
    assert_eq!(before.done_bytes, after.done_bytes, "a paused job copied");
    let e = d
        .snapshot("xvda", &disk.dir.path().join("no.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("runs on it"), "{e}");
    let jobs = control::request(&d.sock, &ControlRequest::Jobs)
        .unwrap()
        .jobs
        .unwrap();
    assert!(jobs
        .iter()
        .any(|x| x.id == j.id && x.state == JobState::Paused));
    assert_eq!(
        d.job(j.id, JobAction::Resume).unwrap().state,
        JobState::Running
    );
    std::thread::sleep(Duration::from_millis(200));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Cancelled, "{end:?}");
    assert!(end.done_bytes > after.done_bytes, "{end:?}");
    let e = d.job(j.id, JobAction::Resume).unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    // Still on the overlay, over the base, without the temporary bitmap.
    assert_eq!(d.image_of("xvda"), overlay.display().to_string());
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", overlay.display()).as_str())
    );
    let list = control::request(
        &d.sock,
        &ControlRequest::Bitmap {
            device: "xvda".into(),
            action: BitmapAction::List,
            name: None,
            granularity: None,
            disabled: false,
            source: None,
        },
    )
    .unwrap();
    assert_eq!(list.bitmaps, Some(vec![]));

    // Limited to 4 MiB/s: the first pass alone needs total/speed. The guest writes less
    // (every 4 KiB write dirties a 64 KiB granule): a copy slower than the guest's writes
    // would not converge.
    pace.store(30_000, Ordering::SeqCst);
    let speed = 4u64 << 20;
    let t0 = Instant::now();
    let j2 = d.commit_job("xvda", speed).expect("second commit job");
    let end = d.wait(j2.id);
    let took = t0.elapsed();
    eprintln!("cancelled: {j:?}\nsecond: {end:?} in {took:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let want_min = Duration::from_secs_f64(j2.total_bytes as f64 / speed as f64 / 2.0);
    assert!(
        took >= want_min,
        "{took:?} < {want_min:?} for {} bytes",
        j2.total_bytes
    );
    let r = end.commit.clone().unwrap();
    assert_eq!(r.image, disk.path.display().to_string());
    assert!(end.done_bytes >= j2.total_bytes, "{end:?}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    assert_eq!(d.image_of("xvda"), disk.path.display().to_string());
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(base_params.as_str())
    );
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    let jobs = control::request(&d.sock, &ControlRequest::Jobs)
        .unwrap()
        .jobs
        .unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    d.stop();
    check_clean(&disk.path);
    check_clean(&overlay);
    assert!(
        contents(&disk.path) == want,
        "the base differs from the model"
    );
    assert!(bitmap_names(&disk.path).is_empty());
    assert!(bitmap_names(&overlay).is_empty());
}

/// A daemon shut down while a commit job runs cancels it: the device's top keeps the chain
/// valid, no temporary bitmap is left, every image is clean.
#[test]
fn shutdown_mid_commit_job_cancels_it_cleanly() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("tmp.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let before = round_trip(&mut front, 41);
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    for i in 0..32u64 {
        front.write(i * 512, &pattern(500 + i, 65536)).unwrap();
    }
    front.flush().unwrap();
    let j = d.commit_job("xvda", 256 << 10).expect("commit job");
    std::thread::sleep(Duration::from_millis(300));
    let mut want = vec![0u8; DISK as usize];
    for (s, data) in &before {
        let o = *s as usize * 512;
        want[o..o + data.len()].copy_from_slice(data);
    }
    for i in 0..32u64 {
        let o = (i * 512 * 512) as usize;
        want[o..o + 65536].copy_from_slice(&pattern(500 + i, 65536));
    }
    let host = d.stop();
    drop(front);
    drop(host);
    eprintln!("job at shutdown: {j:?}");
    check_clean(&disk.path);
    check_clean(&overlay);
    assert!(contents(&overlay) == want, "the chain lost data");
    assert!(
        bitmap_names(&overlay).is_empty(),
        "{:?}",
        bitmap_names(&overlay)
    );
}

/// A device removed by the toolstack while its commit job is paused: the job is cancelled
/// (it would otherwise hold the old image), the chain stays valid and clean.
#[test]
fn removing_the_device_cancels_its_paused_job() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let overlay = disk.dir.path().join("tmp.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    d.snapshot("xvda", &overlay, false).expect("snapshot");
    for i in 0..16u64 {
        front.write(i * 512, &pattern(700 + i, 65536)).unwrap();
    }
    front.flush().unwrap();
    let j = d.commit_job("xvda", 256 << 10).expect("commit job");
    d.job(j.id, JobAction::Pause).expect("pause");
    std::thread::sleep(Duration::from_millis(100));
    d.host.remove_disk("qdisk", 1, 51712);
    wait_until("the job ends", T, || {
        control::request(&d.sock, &ControlRequest::Jobs)
            .unwrap()
            .jobs
            .unwrap()
            .iter()
            .any(|x| x.id == j.id && x.state == JobState::Cancelled)
    });
    drop(front);
    d.stop();
    check_clean(&disk.path);
    check_clean(&overlay);
    let got = contents(&overlay);
    for i in 0..16u64 {
        let o = (i * 512 * 512) as usize;
        assert!(got[o..o + 65536] == pattern(700 + i, 65536), "block {i}");
    }
    // The temporary bitmap is gone, or (if the device had stopped before the job could
    // remove it) left under its reserved name for the next open to remove.
    for b in bitmap_names(&overlay) {
        assert!(b.starts_with("xdisk-commit-"), "{b}");
    }
}

/// The backing file `qemu-img info` reads in an image's header, if any.
fn backing_of(image: &Path) -> Option<String> {
    let info = qemu_img(&["info", "-U", "--output=json", image.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    info["backing-filename"].as_str().map(str::to_owned)
}

/// `xdisk stream` under writes through the ring, over a chain base <- mid <- top: a stream
/// limited to 512 KiB/s is paused (it copies nothing more), resumed and cancelled (the
/// chain as before); one with `--base base` copies mid's data up and makes base the top's
/// backing file; one without a base, limited to 4 MiB/s, takes at least about the time
/// its bytes need at that speed and leaves the top alone. The frontend reads its model
/// all along, qemu-img checks every image clean and reads the model from the top alone.
#[test]
fn stream_under_writes_pause_cancel_base_and_speed() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let mid = disk.dir.path().join("mid.qcow2");
    let top = disk.dir.path().join("top.qcow2");
    let dom = d.host.guest(1);
    let base_params = format!("qcow2:{}", disk.path.display());
    d.host.add_qdisk(1, 51712, &base_params, &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    // Nothing to stream without a backing file.
    let e = d.stream_job("xvda", None, 0).unwrap_err().to_string();
    assert!(e.contains("no backing file"), "{e}");
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 4_000_000, pace.clone());
    // The base gets data everywhere; mid and top (64 KiB clusters, each 4 KiB write
    // allocates one) only some: a guest that writes less.
    std::thread::sleep(Duration::from_millis(300));
    pace.store(5_000, Ordering::SeqCst);
    d.snapshot("xvda", &mid, false).expect("snapshot mid");
    std::thread::sleep(Duration::from_millis(300));
    pace.store(50_000, Ordering::SeqCst);
    d.snapshot("xvda", &top, false).expect("snapshot top");
    std::thread::sleep(Duration::from_millis(100));
    let e = d.stream_job("xvda", Some(&top), 0).unwrap_err().to_string();
    assert!(e.contains("not a layer under the top"), "{e}");

    let j = d.stream_job("xvda", None, 512 << 10).expect("stream job");
    eprintln!("first stream: {j:?}");
    assert_eq!(j.kind, JobKind::Stream);
    assert!(j.total_bytes > 0, "{j:?}");
    let e = d.commit_job("xvda", 0).unwrap_err().to_string();
    assert!(e.contains("runs on it"), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    d.job(j.id, JobAction::Pause)
        .unwrap_or_else(|e| panic!("pause: {e}: {:?}", d.wait(j.id)));
    std::thread::sleep(Duration::from_millis(300));
    let before = d.job(j.id, JobAction::Pause).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let after = d.job(j.id, JobAction::Pause).unwrap();
    assert_eq!(after.state, JobState::Paused);
    assert_eq!(before.done_bytes, after.done_bytes, "a paused job copied");
    assert!(after.done_bytes > 0, "{after:?}");
    d.job(j.id, JobAction::Resume).expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Cancelled, "{end:?}");
    let chain3 = vec![
        top.display().to_string(),
        mid.display().to_string(),
        disk.path.display().to_string(),
    ];
    assert_eq!(d.chain_of("xvda"), chain3);
    assert_eq!(backing_of(&top).as_deref(), mid.to_str());

    // --base: mid's data comes up, the top's backing file becomes base.
    let j = d
        .stream_job("xvda", Some(&disk.path), 0)
        .expect("stream --base");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let r = end.stream.clone().unwrap();
    assert_eq!(r.backing.as_deref(), disk.path.to_str());
    assert_eq!(
        d.chain_of("xvda"),
        vec![top.display().to_string(), disk.path.display().to_string()]
    );
    assert_eq!(backing_of(&top).as_deref(), disk.path.to_str());

    // All of it, at 4 MiB/s; a bitmap of the top survives the change of its header.
    d.bitmap("xvda", BitmapAction::Add, "s0", None)
        .expect("bitmap add");
    let speed = 4u64 << 20;
    let t0 = Instant::now();
    let j = d.stream_job("xvda", None, speed).expect("stream");
    let end = d.wait(j.id);
    let took = t0.elapsed();
    eprintln!("stream: {end:?} in {took:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let want_min = Duration::from_secs_f64(end.done_bytes as f64 / speed as f64 / 2.0);
    assert!(took >= want_min, "{took:?} < {want_min:?}");
    assert!(end.done_bytes >= 1 << 20, "{end:?}");
    assert_eq!(d.chain_of("xvda"), vec![top.display().to_string()]);
    assert_eq!(backing_of(&top), None);
    // The header moved the bitmaps extension: adding another updates it where it is now.
    let list = d
        .bitmap("xvda", BitmapAction::Add, "s1", None)
        .expect("bitmap add after the stream");
    assert_eq!(list.len(), 2, "{list:?}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", top.display()).as_str())
    );
    d.stop();
    for p in [&disk.path, &mid, &top] {
        check_clean(p);
    }
    assert_eq!(backing_of(&top), None);
    assert_eq!(bitmap_names(&top), vec!["s0", "s1"]);
    assert!(
        contents(&top) == want,
        "the top alone differs from the model"
    );
}

/// `xdisk commit --top MID` under writes through the ring, over base <- mid <- top: a
/// cancelled one leaves the chain as it was; then mid is merged into base (base then holds
/// the disk as of the second snapshot) and the top's backing file becomes base. The
/// frontend reads its model, every image checks clean, the top over base reads the model.
#[test]
fn intermediate_commit_under_writes() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let mid = disk.dir.path().join("mid.qcow2");
    let top = disk.dir.path().join("top.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 6_000_000, pace.clone());
    std::thread::sleep(Duration::from_millis(200));
    d.snapshot("xvda", &mid, false).expect("snapshot mid");
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    d.snapshot("xvda", &top, false).expect("snapshot top");
    let answered = Instant::now();
    pace.store(5_000, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let commit = |top_l: &Path, base_l: Option<&Path>, speed: u64| {
        control::request(
            &d.sock,
            &ControlRequest::Commit {
                device: "xvda".into(),
                speed,
                top: Some(top_l.to_str().unwrap().into()),
                base: base_l.map(|b| b.to_str().unwrap().into()),
            },
        )
        .map(|r| r.job.unwrap())
    };
    let e = commit(&mid, Some(&mid), 0).unwrap_err().to_string();
    assert!(e.contains("not a layer under --top"), "{e}");
    let e = commit(&disk.path, None, 0).unwrap_err().to_string();
    assert!(e.contains("nothing to commit into"), "{e}");
    let j = commit(&mid, None, 256 << 10).expect("commit --top mid");
    std::thread::sleep(Duration::from_millis(300));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    assert_eq!(d.wait(j.id).state, JobState::Cancelled);
    let chain3 = vec![
        top.display().to_string(),
        mid.display().to_string(),
        disk.path.display().to_string(),
    ];
    assert_eq!(d.chain_of("xvda"), chain3);
    assert_eq!(backing_of(&top).as_deref(), mid.to_str());

    let j = commit(&mid, Some(&disk.path), 0).expect("commit --top mid --base base");
    let end = d.wait(j.id);
    eprintln!("intermediate commit: {end:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(
        d.chain_of("xvda"),
        vec![top.display().to_string(), disk.path.display().to_string()]
    );
    assert_eq!(backing_of(&top).as_deref(), disk.path.to_str());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", top.display()).as_str())
    );
    d.stop();
    for p in [&disk.path, &mid, &top] {
        check_clean(p);
    }
    assert!(contents(&top) == want, "the chain top <- base differs");
    check_old_top(&contents(&disk.path), &recs, sent, answered);
}

/// `qemu-img compare` of an image (its chain) with the model's bytes.
fn compare_with_model(image: &Path, want: &[u8]) {
    let model = image.with_extension("model");
    std::fs::write(&model, want).unwrap();
    qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        image.to_str().unwrap(),
        model.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&model);
}

/// `xdisk commit --top M1` of a layer two under the top, under writes through the ring,
/// over base <- m1 <- m2 <- top: a cancelled one leaves the chain as it was; then m1 is
/// merged into base (base then holds the disk as of the snapshot that made m2), m2's header
/// names base and the device reads through top <- m2 <- base. The frontend reads its model,
/// every image checks clean, qemu-img compare finds the chain equal to the model.
#[test]
fn deep_intermediate_commit_under_writes() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let m1 = disk.dir.path().join("m1.qcow2");
    let m2 = disk.dir.path().join("m2.qcow2");
    let top = disk.dir.path().join("top.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 7_000_000, pace.clone());
    std::thread::sleep(Duration::from_millis(200));
    d.snapshot("xvda", &m1, false).expect("snapshot m1");
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    d.snapshot("xvda", &m2, false).expect("snapshot m2");
    let answered = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    d.snapshot("xvda", &top, false).expect("snapshot top");
    pace.store(5_000, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let commit = |top_l: &Path, base_l: Option<&Path>, speed: u64| {
        control::request(
            &d.sock,
            &ControlRequest::Commit {
                device: "xvda".into(),
                speed,
                top: Some(top_l.to_str().unwrap().into()),
                base: base_l.map(|b| b.to_str().unwrap().into()),
            },
        )
        .map(|r| r.job.unwrap())
    };
    let e = commit(&disk.dir.path().join("nope.qcow2"), None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a layer of the chain"), "{e}");
    let e = commit(&m1, Some(&m2), 0).unwrap_err().to_string();
    assert!(e.contains("not a layer under --top"), "{e}");
    let chain4 = vec![
        top.display().to_string(),
        m2.display().to_string(),
        m1.display().to_string(),
        disk.path.display().to_string(),
    ];
    let j = commit(&m1, None, 256 << 10).expect("commit --top m1");
    std::thread::sleep(Duration::from_millis(300));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    assert_eq!(d.wait(j.id).state, JobState::Cancelled);
    assert_eq!(d.chain_of("xvda"), chain4);
    assert_eq!(backing_of(&m2).as_deref(), m1.to_str());

    let j = commit(&m1, None, 0).expect("commit --top m1");
    let end = d.wait(j.id);
    eprintln!("deep intermediate commit: {end:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(
        end.commit.as_ref().unwrap().image,
        disk.path.display().to_string()
    );
    assert_eq!(
        d.chain_of("xvda"),
        vec![
            top.display().to_string(),
            m2.display().to_string(),
            disk.path.display().to_string()
        ]
    );
    assert_eq!(backing_of(&m2).as_deref(), disk.path.to_str());
    assert_eq!(backing_of(&top).as_deref(), m2.to_str());
    // The device reads through the new chain: a snapshot and a commit of the top still work.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", top.display()).as_str())
    );
    d.stop();
    for p in [&disk.path, &m1, &m2, &top] {
        check_clean(p);
    }
    compare_with_model(&top, &want);
    check_old_top(&contents(&disk.path), &recs, sent, answered);
}

const DEEP_COMMIT_KILL_CHILD: &str = "XDISK_LIVE_DEEP_COMMIT_KILL_CHILD";

/// The data the child of [`sigkill_mid_deep_commit_leaves_a_valid_chain`] writes: 48
/// blocks of 64 KiB into base, 32 into m1, 16 into m2, 8 into top (overlapping).
fn deep_commit_writes() -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for i in 0..48u64 {
        v.push((i * 256, 100 + i));
    }
    for i in 0..32u64 {
        v.push((i * 384 + 128, 200 + i));
    }
    for i in 0..16u64 {
        v.push((i * 768 + 64, 300 + i));
    }
    for i in 0..8u64 {
        v.push((i * 1024 + 512, 400 + i));
    }
    v
}

/// The child of [`sigkill_mid_deep_commit_leaves_a_valid_chain`] (does nothing unless run
/// by it): base <- m1 <- m2 <- top written as [`deep_commit_writes`] says, then a commit of
/// m1 into base at 2 MiB/s, looped until the kill.
#[test]
fn deep_commit_kill_child() {
    let Ok(dir) = std::env::var(DEEP_COMMIT_KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, mut front) = kill_child_daemon(&dir, "base.qcow2");
    let writes = deep_commit_writes();
    let layers = [
        (0usize, 48usize, None),
        (48, 80, Some("m1")),
        (80, 96, Some("m2")),
        (96, 104, Some("top")),
    ];
    for (from, to, snap) in layers {
        if let Some(s) = snap {
            d.snapshot("xvda", &dir.join(format!("{s}.qcow2")), false)
                .expect("snapshot");
        }
        for &(sector, seed) in &writes[from..to] {
            front.write(sector, &pattern(seed, 65536)).unwrap();
        }
        front.flush().unwrap();
    }
    println!("DEEP-READY");
    let r = control::request(
        &d.sock,
        &ControlRequest::Commit {
            device: "xvda".into(),
            speed: 2 << 20,
            top: Some(dir.join("m1.qcow2").to_str().unwrap().into()),
            base: None,
        },
    )
    .unwrap();
    let end = d.wait(r.job.unwrap().id);
    println!("DEEP-DONE {:?}", end.state);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A daemon killed (SIGKILL) at moments of a commit of a layer two under the top leaves a
/// valid chain: no image corrupt, the top reads what the guest wrote (qemu-img compare with
/// the model) through whichever link m2's header holds, and a restarted daemon commits m1
/// again if m2 still names it.
#[test]
fn sigkill_mid_deep_commit_leaves_a_valid_chain() {
    let mut want = vec![0u8; DISK as usize];
    for (sector, seed) in deep_commit_writes() {
        let o = (sector * 512) as usize;
        want[o..o + 65536].copy_from_slice(&pattern(seed, 65536));
    }
    for (round, delay_ms) in [5u64, 300, 900, 2500].into_iter().enumerate() {
        let dir = tmpdir();
        let done = KillChild::kill_after(
            "deep_commit_kill_child",
            DEEP_COMMIT_KILL_CHILD,
            dir.path(),
            "DEEP-",
            delay_ms,
        );
        eprintln!("round {round}: killed {delay_ms} ms after the commit started ({done:?})");
        let [base, m1, m2, top] =
            ["base", "m1", "m2", "top"].map(|n| dir.path().join(format!("{n}.qcow2")));
        for p in [&base, &m1, &m2, &top] {
            check_no_corruption(p);
        }
        compare_with_model(&top, &want);
        let relinked = backing_of(&m2).as_deref() == base.to_str();
        if done.is_some_and(|l| l.contains("Completed")) {
            assert!(relinked, "round {round}: completed, but m2 names m1");
        }
        if !relinked {
            assert_eq!(backing_of(&m2).as_deref(), m1.to_str(), "round {round}");
            let d = daemon();
            let _dom = d.host.guest(1);
            d.host
                .add_qdisk(1, 51712, &format!("qcow2:{}", top.display()), &[]);
            wait_until("the device runs", T, || {
                d.sup
                    .device("qdisk/1/51712")
                    .is_some_and(|s| s.phase == xdisk_daemon::status::Phase::Running)
            });
            let r = control::request(
                &d.sock,
                &ControlRequest::Commit {
                    device: "qdisk/1/51712".into(),
                    speed: 0,
                    top: Some(m1.to_str().unwrap().into()),
                    base: None,
                },
            )
            .unwrap();
            assert_eq!(d.wait(r.job.unwrap().id).state, JobState::Completed);
            d.stop();
            for p in [&base, &m2, &top] {
                check_no_corruption(p);
            }
            assert_eq!(backing_of(&m2).as_deref(), base.to_str(), "round {round}");
            compare_with_model(&top, &want);
        }
    }
}

const STREAM_KILL_CHILD: &str = "XDISK_LIVE_STREAM_KILL_CHILD";

/// The child of [`sigkill_mid_stream_leaves_a_valid_chain`] (does nothing unless run by
/// it): 64 blocks of 64 KiB written to the base, a snapshot, 16 written to the top, then a
/// stream at 2 MiB/s, looped until the kill.
#[test]
fn stream_kill_child() {
    let Ok(dir) = std::env::var(STREAM_KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, _front) = two_layer_child(&dir);
    println!("STREAM-READY");
    let j = d.stream_job("xvda", None, 2 << 20).unwrap();
    let end = d.wait(j.id);
    println!("STREAM-DONE {:?}", end.state);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A daemon killed (SIGKILL) at a random moment of a stream leaves a valid chain: the top
/// (over the base, or alone once its link was dropped) reads what the guest wrote, no image
/// is corrupt, and a restarted daemon serving the top streams it to the end.
#[test]
fn sigkill_mid_stream_leaves_a_valid_chain() {
    let want = two_layer_model();
    for (round, delay_ms) in [5u64, 300, 1200, 3000].into_iter().enumerate() {
        let dir = tmpdir();
        let done = KillChild::kill_after(
            "stream_kill_child",
            STREAM_KILL_CHILD,
            dir.path(),
            "STREAM-",
            delay_ms,
        );
        eprintln!("round {round}: killed {delay_ms} ms after the stream started ({done:?})");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        check_no_corruption(&base);
        check_no_corruption(&top);
        assert!(contents(&top) == want, "round {round}: the chain lost data");
        let d = daemon();
        let _dom = d.host.guest(1);
        d.host
            .add_qdisk(1, 51712, &format!("qcow2:{}", top.display()), &[]);
        wait_until("the device runs", T, || {
            d.sup
                .device("qdisk/1/51712")
                .is_some_and(|s| s.phase == xdisk_daemon::status::Phase::Running)
        });
        if backing_of(&top).is_some() {
            let j = d.stream_job("qdisk/1/51712", None, 0).unwrap();
            assert_eq!(d.wait(j.id).state, JobState::Completed);
        }
        d.stop();
        check_no_corruption(&top);
        assert_eq!(backing_of(&top), None, "round {round}");
        assert!(contents(&top) == want, "round {round}: the top differs");
    }
}

/// `xdisk mirror` under writes through the ring, from a chain base <- top: a full mirror
/// limited to 512 KiB/s is paused (it copies nothing more), resumed and cancelled (the
/// device stays on its top, no bitmap left); a `--sync top` mirror with `--pivot` at
/// 8 MiB/s takes at least about the time its bytes need and switches the device to a
/// qcow2 target over the same base; a full mirror to a raw target without `--pivot` becomes
/// ready, keeps following the writes, and switches over on `job complete`. The frontend
/// reads its model, the raw target holds it, every qcow2 image checks clean.
#[test]
fn mirror_under_writes_cancel_sync_top_pivot_and_complete() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let top = disk.dir.path().join("top.qcow2");
    let t1 = disk.dir.path().join("t1.qcow2");
    let t2 = disk.dir.path().join("t2.raw");
    let t3 = disk.dir.path().join("t3.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 5_000_000, pace.clone());
    std::thread::sleep(Duration::from_millis(300));
    pace.store(5_000, Ordering::SeqCst);
    d.snapshot("xvda", &top, false).expect("snapshot");
    std::thread::sleep(Duration::from_millis(300));
    let e = d
        .mirror_job("xvda", &disk.path, "qcow2", "full", false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chain"), "{e}");
    let e = d
        .mirror_job("xvda", &t2, "raw", "top", false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("qcow2 target"), "{e}");

    let j = d
        .mirror_job("xvda", &t1, "qcow2", "full", false, 512 << 10)
        .expect("mirror");
    assert_eq!(j.kind, JobKind::Mirror);
    assert!(j.total_bytes > 0, "{j:?}");
    std::thread::sleep(Duration::from_millis(300));
    d.job(j.id, JobAction::Pause).expect("pause");
    let e = d.job(j.id, JobAction::Complete).unwrap_err().to_string();
    assert!(e.contains("not ready"), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    let before = d.job(j.id, JobAction::Pause).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let after = d.job(j.id, JobAction::Pause).unwrap();
    assert_eq!(before.done_bytes, after.done_bytes, "a paused job copied");
    d.job(j.id, JobAction::Resume).expect("resume");
    std::thread::sleep(Duration::from_millis(100));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    assert_eq!(d.wait(j.id).state, JobState::Cancelled);
    assert_eq!(d.image_of("xvda"), top.display().to_string());
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", top.display()).as_str())
    );
    let list = control::request(
        &d.sock,
        &ControlRequest::Bitmap {
            device: "xvda".into(),
            action: BitmapAction::List,
            name: None,
            granularity: None,
            disabled: false,
            source: None,
        },
    )
    .unwrap();
    assert_eq!(list.bitmaps, Some(vec![]));

    // The top only, over the same base, switched over by itself; the guest writes less
    // (a copy slower than its writes would never be ready).
    pace.store(50_000, Ordering::SeqCst);
    let speed = 8u64 << 20;
    let t0 = Instant::now();
    let j = d
        .mirror_job("xvda", &t3, "qcow2", "top", true, speed)
        .expect("mirror --sync top");
    let end = d.wait(j.id);
    let took = t0.elapsed();
    eprintln!("mirror --sync top: {end:?} in {took:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let want_min = Duration::from_secs_f64(j.total_bytes as f64 / speed as f64 / 2.0);
    assert!(took >= want_min, "{took:?} < {want_min:?}");
    assert_eq!(
        d.chain_of("xvda"),
        vec![t3.display().to_string(), disk.path.display().to_string()]
    );
    assert_eq!(backing_of(&t3).as_deref(), disk.path.to_str());
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", t3.display()).as_str())
    );

    // Full, to raw: ready, then completed.
    let j = d
        .mirror_job("xvda", &t2, "raw", "full", false, 0)
        .expect("mirror to raw");
    let ready = d.wait(j.id);
    assert_eq!(ready.state, JobState::Ready, "{ready:?}");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(d.image_of("xvda"), t3.display().to_string());
    d.job(j.id, JobAction::Complete).expect("complete");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(end.mirror.as_ref().unwrap().format, "raw");
    assert_eq!(d.chain_of("xvda"), vec![t2.display().to_string()]);
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("aio:{}", t2.display()).as_str())
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    for p in [&disk.path, &top, &t1, &t3] {
        check_clean(p);
    }
    for p in [&top, &t3] {
        assert!(bitmap_names(p).is_empty(), "{}", p.display());
    }
    assert!(
        std::fs::read(&t2).unwrap() == want,
        "the raw target differs"
    );
}

/// `xdisk mirror` of a device served from a raw image, under writes through the ring: the
/// guest's writes are recorded in memory (no persistent bitmap to keep them in); a mirror
/// at 4 MiB/s to a new qcow2 with --pivot copies the writes made during its first pass
/// again, switches the device over, and the target holds what the frontend wrote
/// (qemu-img check clean, qemu-img compare with the model); the raw source holds the
/// disk as of the switch at the latest. A cancelled mirror leaves the device on the raw
/// image.
#[test]
fn mirror_of_a_raw_top_under_writes_pivots() {
    let d = daemon();
    let disk = raw_disk(DISK);
    let t0 = disk.dir.path().join("t0.qcow2");
    let t1 = disk.dir.path().join("t1.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("aio:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), 8_000_000, pace.clone());
    std::thread::sleep(Duration::from_millis(300));
    // A guest that writes less than the copy goes (a mirror only converges then).
    pace.store(50_000, Ordering::SeqCst);
    let j = d
        .mirror_job("xvda", &t0, "qcow2", "full", false, 512 << 10)
        .expect("mirror");
    std::thread::sleep(Duration::from_millis(300));
    d.job(j.id, JobAction::Cancel).expect("cancel");
    assert_eq!(d.wait(j.id).state, JobState::Cancelled);
    assert_eq!(d.image_of("xvda"), disk.path.display().to_string());

    let speed = 4u64 << 20;
    let j = d
        .mirror_job("xvda", &t1, "qcow2", "full", true, speed)
        .expect("mirror of the raw top");
    let end = d.wait(j.id);
    eprintln!("mirror of a raw top: {end:?}");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let r = end.mirror.clone().unwrap();
    assert!(r.passes >= 3, "{r:?}");
    // The first pass took about 2 s, the guest wrote meanwhile: found and copied again.
    assert!(end.total_bytes > DISK, "{end:?}");
    assert_eq!(d.chain_of("xvda"), vec![t1.display().to_string()]);
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", t1.display()).as_str())
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let want = bytes_of(&model(&recs, |_| true));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    check_clean(&t1);
    compare_with_model(&t1, &want);
}

/// `xdisk job set-speed` (QEMU's block-job-set-speed) on a running commit under writes: a
/// commit limited to 64 KiB/s, which would take a minute, finishes within seconds once
/// its limit is lifted; the job reports each limit; a finished job's speed cannot change.
#[test]
fn job_set_speed_changes_a_running_commit() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let top = disk.dir.path().join("top.qcow2");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    d.snapshot("xvda", &top, false).expect("snapshot");
    for i in 0..64u64 {
        front.write(i * 256, &pattern(500 + i, 65536)).unwrap();
    }
    front.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(20_000));
    let w = paced_writer(front, stop.clone(), 9_000_000, pace);
    let set_speed = |id: u64, speed: u64| {
        control::request(&d.sock, &ControlRequest::JobSetSpeed { id, speed })
            .map(|r| r.job.unwrap())
    };
    let j = d.commit_job("xvda", 64 << 10).expect("commit");
    std::thread::sleep(Duration::from_millis(300));
    let now = set_speed(j.id, 32 << 10).expect("set-speed 32k");
    assert_eq!(now.speed, 32 << 10);
    assert_eq!(now.state, JobState::Running, "{now:?}");
    std::thread::sleep(Duration::from_millis(300));
    let slow = d.job(j.id, JobAction::Pause).unwrap();
    assert!(slow.done_bytes < 1 << 20, "{slow:?}");
    d.job(j.id, JobAction::Resume).unwrap();
    let t0 = Instant::now();
    assert_eq!(set_speed(j.id, 0).expect("set-speed 0").speed, 0);
    let end = d.wait(j.id);
    eprintln!("commit after set-speed 0: {end:?} in {:?}", t0.elapsed());
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let e = set_speed(j.id, 1).unwrap_err().to_string();
    assert!(e.contains("is completed"), "{e}");
    let e = set_speed(999, 1).unwrap_err().to_string();
    assert!(e.contains("no job 999"), "{e}");
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let mut want = vec![0u8; DISK as usize];
    for i in 0..64u64 {
        let o = (i * 256 * 512) as usize;
        want[o..o + 65536].copy_from_slice(&pattern(500 + i, 65536));
    }
    for r in &recs {
        let o = (r.block as usize) * BLOCK;
        want[o..o + BLOCK].copy_from_slice(&data_of(r.version));
    }
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    compare_with_model(&disk.path, &want);
}

/// Zeroes the guest wrote over backing data (64 KiB of zero bytes: a data cluster; a
/// discard: a zero cluster) read as zeroes after each job that copies them onto an image
/// that keeps a backing file under it: a stream with --base, an intermediate commit into a
/// layer with a backing file, a mirror --sync top (each copies them with write_zeroes
/// without unmap, which a layer over a backing file keeps as zero clusters).
#[test]
fn guest_zeroes_over_backing_data_survive_stream_commit_and_mirror() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let p = |n: &str| disk.dir.path().join(n);
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let mut want = vec![0u8; DISK as usize];
    let block = |i: u64| i * 128; // 64 KiB blocks, in sectors
    let mut put =
        |front: &mut xdisk_blkfront::Frontend, i: u64, seed: Option<u64>, discard: bool| {
            let o = (i * 65536) as usize;
            match seed {
                Some(sd) => {
                    let data = pattern(sd, 65536);
                    front.write(block(i), &data).unwrap();
                    want[o..o + 65536].copy_from_slice(&data);
                }
                None if discard => {
                    front.discard(block(i), 128).unwrap();
                    want[o..o + 65536].fill(0);
                }
                None => {
                    front.write(block(i), &[0u8; 65536]).unwrap();
                    want[o..o + 65536].fill(0);
                }
            }
        };
    for i in 0..24 {
        put(&mut front, i, Some(700 + i), false);
    }
    front.flush().unwrap();
    /// 64 KiB of zero bytes at block `from`, a discard of block `from + 1`, a flush.
    type Put<'a> = dyn FnMut(&mut xdisk_blkfront::Frontend, u64, Option<u64>, bool) + 'a;
    let zeroes = |front: &mut xdisk_blkfront::Frontend, put: &mut Put, from: u64| {
        put(front, from, None, false);
        put(front, from + 1, None, true);
        front.flush().unwrap();
    };
    // Stream --base: mid's zeroes come up into the top, which then names the base.
    d.snapshot("xvda", &p("mid.qcow2"), false).unwrap();
    zeroes(&mut front, &mut put, 0);
    d.snapshot("xvda", &p("top.qcow2"), false).unwrap();
    put(&mut front, 20, Some(800), false);
    front.flush().unwrap();
    let j = d.stream_job("xvda", Some(&disk.path), 0).unwrap();
    assert_eq!(d.wait(j.id).state, JobState::Completed);
    // Intermediate commit of t2 into the top, which keeps the base under it.
    d.snapshot("xvda", &p("t2.qcow2"), false).unwrap();
    zeroes(&mut front, &mut put, 4);
    d.snapshot("xvda", &p("t3.qcow2"), false).unwrap();
    let r = control::request(
        &d.sock,
        &ControlRequest::Commit {
            device: "xvda".into(),
            speed: 0,
            top: Some(p("t2.qcow2").to_str().unwrap().into()),
            base: None,
        },
    )
    .unwrap();
    assert_eq!(d.wait(r.job.unwrap().id).state, JobState::Completed);
    assert_eq!(
        backing_of(&p("t3.qcow2")).as_deref(),
        p("top.qcow2").to_str()
    );
    // Mirror --sync top: t3's zeroes go into a target over the same backing file.
    zeroes(&mut front, &mut put, 8);
    let j = d
        .mirror_job("xvda", &p("m.qcow2"), "qcow2", "top", true, 0)
        .unwrap();
    assert_eq!(d.wait(j.id).state, JobState::Completed);
    assert_eq!(
        d.chain_of("xvda"),
        vec![
            p("m.qcow2").display().to_string(),
            p("top.qcow2").display().to_string(),
            disk.path.display().to_string()
        ]
    );
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the frontend reads something else than it wrote"
    );
    front.disconnect().unwrap();
    d.stop();
    for n in ["mid.qcow2", "top.qcow2", "t2.qcow2", "t3.qcow2", "m.qcow2"] {
        check_clean(&p(n));
    }
    check_clean(&disk.path);
    compare_with_model(&p("m.qcow2"), &want);
}

const MIRROR_KILL_CHILD: &str = "XDISK_LIVE_MIRROR_KILL_CHILD";

/// The child of [`sigkill_mid_mirror_leaves_every_image_clean`] (does nothing unless run
/// by it): 64 blocks of 64 KiB written to the base, a snapshot, 16 to the top, then a full
/// mirror with --pivot at 2 MiB/s, looped until the kill.
#[test]
fn mirror_kill_child() {
    let Ok(dir) = std::env::var(MIRROR_KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, _front) = two_layer_child(&dir);
    println!("MIRROR-READY");
    let j = d
        .mirror_job(
            "xvda",
            &dir.join("target.qcow2"),
            "qcow2",
            "full",
            true,
            2 << 20,
        )
        .unwrap();
    let end = d.wait(j.id);
    println!("MIRROR-DONE {:?}", end.state);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A daemon killed (SIGKILL) at moments of a mirror: the source chain is untouched (it
/// reads what the guest wrote), no image is corrupt, and a target the device had switched
/// to reads it too.
#[test]
fn sigkill_mid_mirror_leaves_every_image_clean() {
    let want = two_layer_model();
    for (round, delay_ms) in [5u64, 400, 1500, 4000].into_iter().enumerate() {
        let dir = tmpdir();
        let done = KillChild::kill_after(
            "mirror_kill_child",
            MIRROR_KILL_CHILD,
            dir.path(),
            "MIRROR-",
            delay_ms,
        );
        eprintln!("round {round}: killed {delay_ms} ms after the mirror started ({done:?})");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let target = dir.path().join("target.qcow2");
        check_no_corruption(&base);
        check_no_corruption(&top);
        assert!(
            contents(&top) == want,
            "round {round}: the source lost data"
        );
        // A target killed while it was being created may not be an image yet; one that
        // was opened is never corrupt.
        let opened = Command::new("qemu-img")
            .args(["info", "-U", target.to_str().unwrap()])
            .output()
            .is_ok_and(|o| o.status.success());
        if opened {
            check_no_corruption(&target);
        }
        if done.is_some_and(|l| l.contains("Completed")) {
            assert!(
                contents(&target) == want,
                "round {round}: the target differs"
            );
        }
    }
}

const COMMIT_KILL_CHILD: &str = "XDISK_LIVE_COMMIT_KILL_CHILD";

/// The child of [`sigkill_mid_commit_leaves_a_valid_chain`] (does nothing unless run by
/// it): a snapshot, 4 MiB written to the overlay and flushed, then a commit, looped until
/// the kill.
#[test]
fn commit_kill_child() {
    let Ok(dir) = std::env::var(COMMIT_KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, mut front) = kill_child_daemon(&dir, "base.qcow2");
    round_trip(&mut front, 31);
    d.snapshot("xvda", &dir.join("top.qcow2"), false)
        .expect("snapshot");
    for i in 0..64u64 {
        front.write(i * 256, &pattern(100 + i, 65536)).unwrap();
    }
    front.flush().unwrap();
    println!("COMMIT-READY");
    let r = d.commit("xvda");
    println!("COMMIT-DONE {}", r.is_ok());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `qemu-img check` finds no corruption (leaked clusters, exit 3, are what a kill may leave).
fn check_no_corruption(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A daemon killed (SIGKILL) at a random moment of an active commit leaves a valid chain:
/// the top over the base reads what the guest wrote whatever the copy had done, no image is
/// corrupt, and a restarted daemon serving the top commits it to the end.
#[test]
fn sigkill_mid_commit_leaves_a_valid_chain() {
    for (round, delay_ms) in [5u64, 30, 90, 400].into_iter().enumerate() {
        let dir = tmpdir();
        // Into the copy passes, or past the pivot, or before the first pass.
        let done = KillChild::kill_after(
            "commit_kill_child",
            COMMIT_KILL_CHILD,
            dir.path(),
            "COMMIT-",
            delay_ms,
        );
        eprintln!("round {round}: killed {delay_ms} ms after the commit started ({done:?})");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        check_no_corruption(&base);
        check_no_corruption(&top);
        // What the guest wrote: round_trip(31)'s patterns, then the 64 KiB blocks.
        let mut want = vec![0u8; DISK as usize];
        let sectors = DISK / 512;
        for (s, len, seed) in [
            (0u64, 4096usize, 31u64),
            (9, 512, 32),
            (300, 128 * 1024, 33),
            (sectors - 8, 4096, 34),
        ] {
            want[s as usize * 512..s as usize * 512 + len].copy_from_slice(&pattern(seed, len));
        }
        for i in 0..64u64 {
            let o = (i * 256 * 512) as usize;
            want[o..o + 65536].copy_from_slice(&pattern(100 + i, 65536));
        }
        assert!(contents(&top) == want, "round {round}: the chain lost data");
        // A restarted daemon on the top (what params named before the pivot) commits it.
        let d = daemon();
        let _dom = d.host.guest(1);
        d.host
            .add_qdisk(1, 51712, &format!("qcow2:{}", top.display()), &[]);
        wait_until("the device runs", T, || {
            d.sup
                .device("qdisk/1/51712")
                .is_some_and(|s| s.phase == xdisk_daemon::status::Phase::Running)
        });
        d.commit("qdisk/1/51712").expect("commit after the restart");
        d.stop();
        check_no_corruption(&base);
        // The temporary bitmap a kill left in the top was removed when it was opened again.
        assert!(
            bitmap_names(&top).is_empty(),
            "round {round}: {:?}",
            bitmap_names(&top)
        );
        assert!(contents(&base) == want, "round {round}: the base differs");
    }
}

// ---- xdisk backup ------------------------------------------------------------------------

impl Daemon {
    /// Starts a backup of `dev` exported on the unix socket `sock`.
    fn backup(
        &self,
        dev: &str,
        sock: &Path,
        bitmap: Option<&str>,
        new_bitmap: Option<&str>,
    ) -> xdisk_daemon::Result<JobInfo> {
        control::request(
            &self.sock,
            &ControlRequest::Backup {
                device: dev.into(),
                export: format!("nbd+unix:///backup?socket={}", sock.display()),
                bitmap: bitmap.map(str::to_owned),
                new_bitmap: new_bitmap.map(str::to_owned),
                scratch: None,
            },
        )
        .map(|r| r.job.unwrap())
    }

    fn backup_finish(&self, dev: &str, clear_bitmap: bool) -> xdisk_daemon::Result<JobInfo> {
        control::request(
            &self.sock,
            &ControlRequest::BackupFinish {
                device: dev.into(),
                clear_bitmap,
            },
        )
        .map(|r| r.job.unwrap())
    }
}

fn export_uri(sock: &Path) -> String {
    format!("nbd+unix:///backup?socket={}", sock.display())
}

/// The whole export read by `qemu-img convert` (raw).
fn read_export(sock: &Path, out: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &export_uri(sock),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// The dirty ranges of context `qemu:dirty-bitmap:NAME` of an export, as `nbdinfo --map`
/// lists them.
fn export_dirty(uri: &str, name: &str) -> Vec<(u64, u64)> {
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(uri)
        .output()
        .expect("nbdinfo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

/// A full backup, then an incremental one, of a disk under continuous writes (two queues,
/// several writes in flight, flushes), read with the real tools: `qemu-img convert` reads
/// the whole export of the first backup while the guest writes (copy-before-write keeps
/// the instant), `--finish --clear-bitmap` leaves the bitmap with the writes since that
/// instant, the second backup's `qemu:dirty-bitmap:b0` context (`nbdinfo --map`) lists
/// them, and the first backup patched with only those ranges of the second export is the
/// disk as of the second instant. The image is `qemu-img check` clean afterwards, with no
/// temporary bitmap left.
#[test]
fn backup_full_then_incremental_under_writes_restores_each_instant() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let dir = disk.dir.path().to_path_buf();
    let sock = dir.join("backup.sock");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    d.bitmap("xvda", BitmapAction::Add, "b0", None).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A guest that writes, but leaves the copy some room on two shared cores.
    let pace = Arc::new(AtomicU64::new(1000));
    let w = paced_writer(front, stop.clone(), 1, pace.clone());
    std::thread::sleep(Duration::from_millis(400));

    // The full backup.
    let sent1 = Instant::now();
    let j1 = d.backup("xvda", &sock, Some("b0"), None).expect("backup");
    let answered1 = Instant::now();
    assert_eq!(j1.kind, JobKind::Backup);
    assert_eq!(j1.state, JobState::Running);
    let b1 = j1.backup.clone().unwrap();
    assert!(b1.dirty_bytes.unwrap() > 0, "{b1:?}");
    // One job per device: no other backup, snapshot or commit meanwhile.
    let e = d.backup("xvda", &sock, None, None).unwrap_err().to_string();
    assert!(e.contains("runs on it"), "{e}");
    let e = d
        .snapshot("xvda", &dir.join("s.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("runs on it"), "{e}");
    let e = d.job(j1.id, JobAction::Pause).unwrap_err().to_string();
    assert!(e.contains("backup"), "{e}");
    let t = Instant::now();
    let full = read_export(&sock, &dir.join("full.raw"));
    // Twice (more writes meanwhile; the second read finds more granules saved).
    let again = read_export(&sock, &dir.join("full2.raw"));
    assert!(again == full, "two reads of the export differ");
    let read1 = (t, Instant::now());
    // Fewer writes until the second backup (on an 8 MiB disk of 128 granules, random
    // writes soon touch them all), more again while it is read.
    pace.store(15_000, Ordering::SeqCst);
    // The bitmap as of the instant: b0 was added before the first write.
    let dirty1 = export_dirty(&export_uri(&sock), "b0");
    assert!(!dirty1.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    let info = d.sup.jobs().into_iter().find(|j| j.id == j1.id).unwrap();
    eprintln!("full backup: {:?}", info.backup);
    let e1 = d.backup_finish("xvda", true).expect("finish");
    assert_eq!(e1.state, JobState::Completed, "{e1:?}");
    // Finished (asked to complete), a backup still shows no mirror's `pivot`.
    assert_eq!(e1.pivot, None, "{e1:?}");
    let r1 = e1.backup.unwrap();
    assert!(r1.cleared && r1.saved_bytes > 0, "{r1:?}");
    assert!(!sock.exists(), "the export's socket is left");

    std::thread::sleep(Duration::from_millis(500));
    // The incremental backup, rotating to a new bitmap at its instant.
    let sent2 = Instant::now();
    d.backup("xvda", &sock, Some("b0"), Some("b1"))
        .expect("backup 2");
    let answered2 = Instant::now();
    pace.store(1000, Ordering::SeqCst);
    let dirty2 = export_dirty(&export_uri(&sock), "b0");
    // qemu's NBD client reads the context as libvirt has it read (`x-dirty-bitmap`: a
    // dirty range shows as `data: false`) and agrees with nbdinfo.
    let map = qemu_img(&[
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,export=backup,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
            sock.display()
        ),
    ]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let mut qemu_dirty: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"] == false {
            let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match qemu_dirty.last_mut() {
                Some((po, pl)) if *po + *pl == o => *pl += l,
                _ => qemu_dirty.push((o, l)),
            }
        }
    }
    assert_eq!(qemu_dirty, dirty2, "qemu-img map and nbdinfo disagree");
    let inc = read_export(&sock, &dir.join("inc.raw"));
    std::thread::sleep(Duration::from_millis(200));
    let e2 = d.backup_finish("qdisk/1/51712", false).expect("finish 2");
    assert_eq!(e2.state, JobState::Completed, "{e2:?}");
    assert!(!e2.backup.as_ref().unwrap().cleared);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let during = recs
        .iter()
        .filter(|r| r.acked > read1.0 && r.submitted < read1.1)
        .count();
    eprintln!(
        "{} writes, {during} while the full backup was read ({:?}), backup start paused the queues {} us",
        recs.len(),
        read1.1 - read1.0,
        b1.paused_us
    );
    assert!(
        during >= 5,
        "only {during} writes while the export was read"
    );
    // The guest's write latency before the backup and while it runs (figures only: a
    // debug build on shared cores).
    let lat = |from: Instant, to: Instant| -> (usize, Duration, Duration) {
        let mut v: Vec<Duration> = recs
            .iter()
            .filter(|r| r.submitted >= from && r.submitted < to)
            .map(|r| r.acked - r.submitted)
            .collect();
        v.sort();
        if v.is_empty() {
            return (0, Duration::ZERO, Duration::ZERO);
        }
        (v.len(), v[v.len() / 2], v[v.len() * 99 / 100])
    };
    eprintln!(
        "write latency (n, p50, p99): before the backup {:?}, while it ran {:?}",
        lat(sent1 - Duration::from_millis(350), sent1),
        lat(answered1, read1.1)
    );
    // Each export is the disk as of its instant.
    check_old_top(&full, &recs, sent1, answered1);
    check_old_top(&inc, &recs, sent2, answered2);
    // The bitmap of the second export covers every write acknowledged between the two
    // instants (made after the first backup's start returned and before the second's was
    // sent).
    for r in recs
        .iter()
        .filter(|r| r.submitted > answered1 && r.acked < sent2)
    {
        assert!(
            covered(&dirty2, r.block * BLOCK as u64, BLOCK as u64),
            "write to block {} between the two backups is not in the bitmap",
            r.block
        );
    }
    // ... and nothing else: every dirty granule holds a write that may lie between the
    // two instants (--clear-bitmap dropped what b0 had before the first one).
    let gran = 65536u64;
    let written: std::collections::HashSet<u64> = recs
        .iter()
        .filter(|r| r.acked >= sent1 && r.submitted < answered2)
        .map(|r| r.block * BLOCK as u64 / gran)
        .collect();
    for &(o, l) in &dirty2 {
        for g in o / gran..(o + l).div_ceil(gran) {
            assert!(
                written.contains(&g),
                "granule {g} is dirty in the second backup, but nothing wrote it between the instants"
            );
        }
    }
    let dirty2_bytes: u64 = dirty2.iter().map(|r| r.1).sum();
    assert!(dirty2_bytes < DISK, "the bitmap says everything changed");
    assert_eq!(
        e2.backup.as_ref().unwrap().dirty_bytes,
        Some(dirty2_bytes),
        "the job and nbdinfo disagree"
    );
    // Restore: the full backup, plus only the dirty ranges of the second export.
    let mut restored = full.clone();
    for &(o, l) in &dirty2 {
        let (o, l) = (o as usize, l as usize);
        restored[o..o + l].copy_from_slice(&inc[o..o + l]);
    }
    check_old_top(&restored, &recs, sent2, answered2);
    eprintln!(
        "incremental: {dirty2_bytes} of {DISK} bytes dirty, {} ranges",
        dirty2.len()
    );
    let fin = model(&recs, |_| true);
    assert!(front.read(0, DISK / 512).unwrap() == bytes_of(&fin));
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
    let mut names = bitmap_names(&disk.path);
    names.sort();
    assert_eq!(names, ["b0", "b1"]);
    // b1 (added at the second instant) holds the writes after it.
    let b1_dirty = dirty_ranges(&disk.path, "b1");
    for r in recs.iter().filter(|r| r.submitted > answered2) {
        assert!(covered(&b1_dirty, r.block * BLOCK as u64, BLOCK as u64));
    }
    assert!(contents(&disk.path) == bytes_of(&fin));
}

const BACKUP_KILL_CHILD: &str = "XDISK_LIVE_BACKUP_KILL_CHILD";

/// The child of [`sigkill_mid_backup_leaves_the_image_clean_and_the_bitmap_removed`] (does
/// nothing unless run by it): a daemon with a qcow2 disk and a bitmap, writes, a backup
/// started with the bitmap, more writes (copied before they land), a flush; prints the
/// writes and waits for its kill with the backup running.
#[test]
fn backup_kill_child() {
    let Ok(dir) = std::env::var(BACKUP_KILL_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (d, mut front) = kill_child_daemon(&dir, "disk.qcow2");
    d.bitmap("xvda", BitmapAction::Add, "b0", None).unwrap();
    let before = round_trip(&mut front, 5);
    d.backup("xvda", &dir.join("b.sock"), Some("b0"), None)
        .expect("backup");
    let after = [(1000u64, pattern(6, 65536)), (5000, pattern(7, 4096))];
    for (s, data) in &after {
        front.write(*s, data).unwrap();
    }
    front.flush().unwrap();
    let state = serde_json::json!({ "before": enc_writes(&before), "after": enc_writes(&after) });
    println!("BACKUP-KILL {state}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A daemon killed (SIGKILL) with a backup running: the image is `qemu-img check` clean
/// and holds every flushed write; the backup's temporary bitmap is left (`in_use`) and
/// removed by the next daemon that opens the image, which then takes a new backup on the
/// same socket path (the stale socket is replaced) and finishes it.
#[test]
fn sigkill_mid_backup_leaves_the_image_clean_and_the_bitmap_removed() {
    let dir = tmpdir();
    let child = KillChild::spawn(
        "backup_kill_child",
        BACKUP_KILL_CHILD,
        dir.path(),
        "BACKUP-KILL ",
    );
    let line = child.line();
    child.kill();
    let line = line.expect("the child got ready");
    let state: serde_json::Value =
        serde_json::from_str(line.strip_prefix("BACKUP-KILL ").unwrap()).unwrap();
    let (before, after) = (dec_writes(&state["before"]), dec_writes(&state["after"]));
    let disk = dir.path().join("disk.qcow2");
    let sock = dir.path().join("b.sock");
    check_clean(&disk);
    check_image(&disk, &before);
    check_image(&disk, &after);
    let names = bitmap_names(&disk);
    assert!(
        names.iter().any(|n| n.starts_with("xdisk-backup-")),
        "{names:?}"
    );
    // No scratch file is left (it was unlinked when created).
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("scratch"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The restart removes the temporary bitmap.
    let d = daemon();
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let list = control::request(
        &d.sock,
        &ControlRequest::Bitmap {
            device: "xvda".into(),
            action: BitmapAction::List,
            name: None,
            granularity: None,
            disabled: false,
            source: None,
        },
    )
    .unwrap()
    .bitmaps
    .unwrap();
    let names: Vec<&str> = list.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b0"], "{list:?}");
    // b0 was in use when the daemon died: inconsistent, refused for an incremental backup.
    assert!(list[0].inconsistent);
    let e = d
        .backup("xvda", &sock, Some("b0"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inconsistent"), "{e}");
    // A full backup on the stale socket's path.
    d.backup("xvda", &sock, None, None).expect("full backup");
    let got = read_export(&sock, &dir.path().join("full.raw"));
    for (s, data) in before.iter().chain(&after) {
        let o = (*s * 512) as usize;
        assert!(got[o..o + data.len()] == data[..], "sector {s}");
    }
    let more = round_trip(&mut front, 9);
    d.backup_finish("xvda", false).unwrap();
    front.disconnect().unwrap();
    d.stop();
    check_clean(&disk);
    check_image(&disk, &more);
    assert_eq!(bitmap_names(&disk), ["b0"]);
}

/// A backup ends with its device: removing the device cancels it (the export closes), and
/// a daemon stop ends a running backup with its temporary bitmap removed.
#[test]
fn device_removal_and_daemon_stop_end_a_backup() {
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let disk2 = qcow2_disk(DISK);
    let sock = disk.dir.path().join("b.sock");
    let sock2 = disk2.dir.path().join("b.sock");
    let dom = d.host.guest(1);
    let dom2 = d.host.guest(2);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    d.host
        .add_qdisk(2, 51728, &format!("qcow2:{}", disk2.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let mut front2 = connect_with(&dom2, 51728, front_cfg());
    d.bitmap("xvda", BitmapAction::Add, "b0", None).unwrap();
    d.bitmap("xvdb", BitmapAction::Add, "b0", None).unwrap();
    round_trip(&mut front, 11);
    round_trip(&mut front2, 12);
    let j = d.backup("xvda", &sock, Some("b0"), None).unwrap();
    d.backup("xvdb", &sock2, Some("b0"), None).unwrap();
    let w1 = round_trip(&mut front, 13);
    d.host.remove_disk("qdisk", 1, 51712);
    wait_until("the backup ends", T, || {
        d.sup
            .jobs()
            .iter()
            .any(|x| x.id == j.id && x.state == JobState::Cancelled)
    });
    wait_until("the export closes", T, || !sock.exists());
    drop(front);
    // The second one runs until the daemon stops.
    let w3 = round_trip(&mut front2, 14);
    front2.disconnect().unwrap();
    d.stop();
    assert!(!sock2.exists());
    check_clean(&disk.path);
    check_clean(&disk2.path);
    check_image(&disk.path, &w1);
    check_image(&disk2.path, &w3);
    assert_eq!(bitmap_names(&disk2.path), ["b0"]);
    for b in bitmap_names(&disk.path) {
        assert!(b == "b0" || b.starts_with("xdisk-backup-"), "{b}");
    }
}

/// Backups that cannot be: clear errors, nothing changed; a raw top takes a full backup
/// (no bitmap), whose export is read-only for a hostile client.
#[test]
fn backup_refusals_and_a_raw_full_backup() {
    use std::io::{BufRead, BufReader, Write};
    let d = daemon();
    let disk = qcow2_disk(DISK);
    let raw = raw_disk(DISK);
    let dir = disk.dir.path().display().to_string();
    let dom = d.host.guest(1);
    let dom2 = d.host.guest(2);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    d.host
        .add_qdisk(2, 51728, &format!("aio:{}", raw.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let mut front2 = connect_with(&dom2, 51728, front_cfg());
    let long = "a".repeat(5000);
    let requests = [
        r#"{"cmd":"backup","device":"xvda"}"#.to_string(),
        r#"{"cmd":"backup","device":"xvda","export":""}"#.into(),
        r#"{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket=rel.sock"}"#.into(),
        r#"{"cmd":"backup","device":"xvda","export":"http://x/y"}"#.into(),
        r#"{"cmd":"backup","device":"xvda","export":"nbds+unix:///b?socket=/tmp/x.sock"}"#.into(),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/b.sock","bitmap":"nosuch"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/b.sock","bitmap":""}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/b.sock","new_bitmap":"xdisk-backup-1-1"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/b.sock","scratch":"rel"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/b.sock","scratch":"/nonexistent/dir"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={dir}/{long}.sock"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvda","export":"nbd+unix:///b?socket={}"}}"#,
            disk.path.display()
        ),
        format!(
            r#"{{"cmd":"backup","device":"xvdb","export":"nbd+unix:///b?socket={dir}/b.sock","bitmap":"b0"}}"#
        ),
        format!(
            r#"{{"cmd":"backup","device":"nosuch","export":"nbd+unix:///b?socket={dir}/b.sock"}}"#
        ),
        r#"{"cmd":"backup","device":"xvda","export":"nbd://256.1.1.1:1/b"}"#.into(),
        r#"{"cmd":"backup-finish","device":"xvda"}"#.into(),
        r#"{"cmd":"backup-finish","device":"xvda","clear_bitmap":"yes"}"#.into(),
        r#"{"cmd":"backup-finish"}"#.into(),
    ];
    for req in &requests {
        let mut s = std::os::unix::net::UnixStream::connect(&d.sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{req} -> {line}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{line}");
    }
    assert!(d.sup.jobs().is_empty(), "{:?}", d.sup.jobs());
    // The disk file named as the socket is untouched.
    check_clean(&disk.path);
    // The raw top: a full backup.
    let data = pattern(21, 1 << 20);
    front2.write(2048, &data).unwrap();
    let sock = raw.dir.path().join("b.sock");
    d.backup("xvdb", &sock, None, None)
        .expect("raw full backup");
    front2.write(2048, &pattern(22, 1 << 20)).unwrap();
    let got = read_export(&sock, &raw.dir.path().join("full.raw"));
    assert!(got[1 << 20..2 << 20] == data[..]);
    // Read-only for clients: a writer is refused, the view unchanged.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4096"])
        .arg(export_uri(&sock))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io cannot even open it for writing (the export says read-only); the server
    // refusing writes on read-only exports is in the NBD hostile-client suite.
    assert!(!out.status.success(), "{text}");
    assert!(read_export(&sock, &raw.dir.path().join("again.raw")) == got);
    let r = d.backup_finish("xvdb", true).unwrap();
    assert_eq!(r.state, JobState::Completed);
    round_trip(&mut front, 3);
    front.disconnect().unwrap();
    front2.disconnect().unwrap();
    d.stop();
    check_clean(&disk.path);
}

// ---- devices that are not host files: RBD images, NBD exports ----------------------------

use xdisk_rbd::testing::{cluster, rbd_ok, TestImage};

/// A raw RBD image of [`DISK`] bytes on the test cluster (removed when dropped).
fn rbd_disk(conf: &Path, prefix: &str) -> TestImage {
    let t = TestImage::new(conf, prefix);
    rbd_ok(conf, &["create", "--size", "8M", &t.spec()]);
    t
}

/// The whole RBD image as `rbd export` reads it.
fn rbd_export(t: &TestImage, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{}.export", t.image));
    rbd_ok(
        &t.conf,
        &["export", "--no-progress", &t.spec(), out.to_str().unwrap()],
    );
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// Runs a guest writing (paced, so that the copy converges) through `front` while
/// a `--pivot` mirror to `target` runs; returns the job's end, the frontend (still
/// connected) and the model of every write.
fn mirror_under_writes(
    d: &Daemon,
    front: Frontend,
    target: &str,
    format: &str,
    seed: u64,
) -> (JobInfo, Frontend, Vec<u8>) {
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let w = paced_writer(front, stop.clone(), seed, pace.clone());
    std::thread::sleep(Duration::from_millis(300));
    pace.store(20_000, Ordering::SeqCst);
    let t = Instant::now();
    let j = d
        .mirror_job("xvda", Path::new(target), format, "full", true, 0)
        .expect("mirror");
    let end = d.wait(j.id);
    eprintln!("mirror to {target}: {:?}: {end:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let after = recs.iter().filter(|r| r.submitted > t).count();
    assert!(
        after > 10,
        "only {after} writes during and after the mirror"
    );
    let m = model(&recs, |_| true);
    let want = bytes_of(&m);
    let got = front.read(0, DISK / 512).unwrap();
    if got != want {
        let mut bad = Vec::new();
        for b in 0..BLOCKS as usize {
            let g = &got[b * BLOCK..(b + 1) * BLOCK];
            if g != &want[b * BLOCK..(b + 1) * BLOCK] {
                let held = recs
                    .iter()
                    .filter(|r| r.block as usize == b)
                    .find(|r| data_of(r.version) == g)
                    .map(|r| (r.version, r.submitted > t, r.acked.duration_since(t)));
                let zero = g.iter().all(|&x| x == 0);
                bad.push((b, m[b], held, zero));
            }
        }
        panic!(
            "the frontend reads something else than it wrote: {} blocks differ: {:?}",
            bad.len(),
            &bad[..bad.len().min(12)]
        );
    }
    (end, front, want)
}

/// `xdisk mirror` of a device served from a raw RBD image to a local qcow2 file, under
/// writes through the ring (the raw top's writes tracked in memory): the device switches to
/// the file, which holds the model; the RBD image is left as it was, read-only, and a
/// snapshot of an RBD top into a local overlay is refused with what to do instead.
#[test]
fn mirror_of_an_rbd_top_to_a_local_file_under_writes_pivots() {
    let Some(conf) = cluster() else { return };
    let src = rbd_disk(conf, "livemirsrc");
    let d = daemon();
    let dir = tmpdir();
    let target = dir.path().join("t.qcow2");
    let params = format!("aio:{}", src.name());
    let dom = d.host.guest(1);
    d.host.add_qdisk(1, 51712, &params, &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    // An overlay over an RBD image cannot be made live: the refusal says what to do.
    let e = d
        .snapshot("xvda", &dir.path().join("o.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--rbd-snap") && e.contains("mirror"), "{e}");
    assert!(!dir.path().join("o.qcow2").exists());
    let (end, mut front, want) =
        mirror_under_writes(&d, front, target.to_str().unwrap(), "qcow2", 9_000_000);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert!(end.mirror.as_ref().unwrap().passes >= 2, "{end:?}");
    assert_eq!(d.chain_of("xvda"), vec![target.display().to_string()]);
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(format!("qcow2:{}", target.display()).as_str())
    );
    // Writes after the switch go to the file only.
    let before = rbd_export(&src, dir.path());
    front.write(0, &pattern(77, 65536)).unwrap();
    front.flush().unwrap();
    front.disconnect().unwrap();
    d.stop();
    assert!(
        rbd_export(&src, dir.path()) == before,
        "the source changed after the switch"
    );
    let mut want = want;
    want[..65536].copy_from_slice(&pattern(77, 65536));
    check_clean(&target);
    compare_with_model(&target, &want);
}

/// Storage migration into Ceph: `xdisk mirror DEV rbd:POOL/NEW -f raw --pivot` of a
/// device served from a local qcow2 file, under writes: the RBD image is created as `img
/// create` makes one, the device switches to it (`params` = `aio:rbd:...`), `rbd export`
/// and qemu-img's rbd driver read the model from it, and a restarted daemon serves it from
/// `params`. A qcow2 mirror into an existing RBD image (used as it is) works the same way;
/// `--sync top` to RBD and NBD targets are refused with the reason.
#[test]
fn mirror_of_a_local_disk_to_rbd_under_writes_pivots() {
    let Some(conf) = cluster() else { return };
    let disk = qcow2_disk(DISK);
    let target = TestImage::new(conf, "livemirdst");
    let name = target.name();
    let d = daemon();
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let front = connect_with(&dom, 51712, front_cfg());
    let e = d
        .mirror_job("xvda", Path::new(&name), "qcow2", "top", false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--sync full"), "{e}");
    let e = d
        .mirror_job(
            "xvda",
            Path::new("nbd+unix:///e?socket=/tmp/nosuch.sock"),
            "raw",
            "full",
            false,
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("NBD exports are not supported"), "{e}");
    assert_eq!(
        String::from_utf8_lossy(&xdisk_rbd::testing::rbd(conf, &["info", &target.spec()]).stdout),
        "",
        "a refused mirror created the target"
    );
    let (end, mut front, want) = mirror_under_writes(&d, front, &name, "raw", 10_000_000);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let params = format!("aio:{name}");
    assert_eq!(
        d.host
            .read("/local/domain/0/backend/qdisk/1/51712/params")
            .as_deref(),
        Some(params.as_str())
    );
    assert_eq!(
        d.image_of("xvda"),
        format!("rbd:rbd/{}:conf={}", target.image, conf.display())
    );
    front.disconnect().unwrap();
    let host = d.stop();
    drop(host);
    assert!(
        rbd_export(&target, disk.dir.path()) == want,
        "rbd export differs"
    );
    let model_file = disk.dir.path().join("model.raw");
    std::fs::write(&model_file, &want).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &format!("rbd:{}:conf={}", target.spec(), conf.display()),
        model_file.to_str().unwrap(),
    ]);
    // The source was left as it was, clean.
    check_clean(&disk.path);
    // A restarted daemon serves the RBD image from params.
    let d = daemon();
    let dom = d.host.guest(1);
    d.host.add_qdisk(1, 51712, &params, &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "after the restart"
    );

    // Into an existing RBD image holding a qcow2 image: used as it is, every byte copied.
    let t2 = TestImage::new(conf, "livemirdst2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &format!("rbd:{}:conf={}", t2.spec(), conf.display()),
        &DISK.to_string(),
    ]);
    front.write(8, &pattern(88, 4096)).unwrap();
    front.flush().unwrap();
    let mut want = want;
    want[4096..8192].copy_from_slice(&pattern(88, 4096));
    let j = d
        .mirror_job("xvda", Path::new(&t2.name()), "qcow2", "full", true, 0)
        .expect("mirror into an existing image");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(end.total_bytes, DISK, "{end:?}");
    assert!(front.read(0, DISK / 512).unwrap() == want);
    front.disconnect().unwrap();
    d.stop();
    std::fs::write(&model_file, &want).unwrap();
    let t2_name = format!("rbd:{}:conf={}", t2.spec(), conf.display());
    qemu_img(&["check", "-f", "qcow2", &t2_name]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &t2_name,
        model_file.to_str().unwrap(),
    ]);
}

/// `xdisk mirror` of a local disk into a new RBD image with librbd's encryption (a key file
/// in the target's name): the target is formatted, and every byte is copied (the unwritten
/// parts of objects written in part read as noise in an encrypted image, so the source's
/// holes cannot be skipped as for a plain new image); the frontend reads what it wrote after
/// the switch, QEMU's rbd driver with `encrypt.*` reads the model, Ceph stores no plaintext.
#[test]
fn mirror_of_a_local_disk_to_an_encrypted_rbd_image_copies_every_byte() {
    let Some(conf) = cluster() else { return };
    let disk = qcow2_disk(DISK);
    let key = disk.dir.path().join("key");
    std::fs::write(&key, "mirror passphrase").unwrap();
    let target = TestImage::new(conf, "livemirenc");
    let name = target.name_with(&format!(
        ":encrypt.format=luks:encrypt.key-file={}",
        key.display()
    ));
    let d = daemon();
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    // A sparse disk: a few blocks written, holes around them in the same RBD objects.
    let mut want = vec![0u8; DISK as usize];
    for (i, block) in [1u64, 700, 1500].into_iter().enumerate() {
        let data = pattern(40 + i as u64, BLOCK);
        front.write(block * 8, &data).unwrap();
        want[block as usize * BLOCK..][..BLOCK].copy_from_slice(&data);
    }
    front.flush().unwrap();
    let j = d
        .mirror_job("xvda", Path::new(&name), "raw", "full", true, 0)
        .expect("mirror to an encrypted RBD image");
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert!(d.image_of("xvda").contains("encrypt.format=luks"));
    assert!(
        front.read(0, DISK / 512).unwrap() == want,
        "the switched disk reads something else than was written (noise in holes?)"
    );
    assert_eq!(end.total_bytes, DISK, "not every byte was copied: {end:?}");
    front.disconnect().unwrap();
    d.stop();
    let model_file = disk.dir.path().join("model.raw");
    std::fs::write(&model_file, &want).unwrap();
    qemu_img(&[
        "compare",
        "--object",
        &format!("secret,id=sec0,file={}", key.display()),
        "--image-opts",
        &format!(
            "driver=rbd,pool={},image={},conf={},encrypt.format=luks,encrypt.key-secret=sec0",
            xdisk_rbd::testing::POOL,
            target.image,
            conf.display()
        ),
        &format!(
            "driver=raw,file.driver=file,file.filename={}",
            model_file.display()
        ),
    ]);
    let stored = rbd_export(&target, disk.dir.path());
    assert!(stored.starts_with(b"LUKS\xba\xbe"));
    let block = want
        .chunks(4096)
        .find(|b| b.iter().any(|&x| x != 0))
        .expect("the guest wrote something");
    assert!(
        !stored.windows(block.len()).any(|w| w == block),
        "plaintext stored"
    );
}

/// `xdisk backup` of a device served from a raw RBD image, under writes: the export read
/// with `qemu-img convert` while the guest writes is the disk as of the backup's instant
/// (the scratch a local file); finishing it leaves the image as the guest wrote it.
#[test]
fn backup_of_an_rbd_disk_under_writes_is_the_disk_at_the_instant() {
    let Some(conf) = cluster() else { return };
    let src = rbd_disk(conf, "livebackup");
    let d = daemon();
    let dir = tmpdir();
    let sock = dir.path().join("b.sock");
    d.host
        .add_qdisk(1, 51712, &format!("aio:{}", src.name()), &[]);
    let dom = d.host.guest(1);
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(1000));
    let w = paced_writer(front, stop.clone(), 11_000_000, pace);
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    let j = d.backup("xvda", &sock, None, None).expect("backup");
    let answered = Instant::now();
    let t = Instant::now();
    let full = read_export(&sock, &dir.path().join("full.raw"));
    let read = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let end = d.backup_finish("xvda", false).expect("finish");
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(end.id, j.id);
    assert_eq!(end.pivot, None, "{end:?}");
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let during = recs
        .iter()
        .filter(|r| r.acked > t && r.submitted < t + read)
        .count();
    eprintln!(
        "backup of an RBD disk: paused {} us, read in {read:?} with {during} writes meanwhile, saved {} bytes",
        j.backup.as_ref().unwrap().paused_us,
        end.backup.as_ref().unwrap().saved_bytes
    );
    assert!(
        during >= 5,
        "only {during} writes while the export was read"
    );
    check_old_top(&full, &recs, sent, answered);
    let want = bytes_of(&model(&recs, |_| true));
    assert!(front.read(0, DISK / 512).unwrap() == want);
    front.disconnect().unwrap();
    d.stop();
    assert!(
        rbd_export(&src, dir.path()) == want,
        "the RBD image differs"
    );
}

/// An NBD export served by `qemu-nbd` (raw file `file`) on `sock`, killed when dropped.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(file: &Path, sock: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "e",
                "-e",
                "8",
                "-t",
                "--cache=writeback",
                "-k",
            ])
            .arg(sock)
            .arg(file)
            .spawn()
            .expect("qemu-nbd runs");
        wait_until("qemu-nbd's socket", T, || sock.exists());
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `xdisk mirror` of a device served from an NBD export (qemu-nbd over a raw file) to a
/// local qcow2 file, under writes: the device switches to the file, which holds the model;
/// the export is not written after the switch; a snapshot of an NBD top is refused with
/// what to do instead.
#[test]
fn mirror_of_an_nbd_top_under_writes_pivots() {
    let disk = raw_disk(DISK);
    let sock = disk.dir.path().join("e.sock");
    let _server = QemuNbd::start(&disk.path, &sock);
    let d = daemon();
    let target = disk.dir.path().join("t.qcow2");
    let dom = d.host.guest(1);
    d.host.add_qdisk(
        1,
        51712,
        &format!("aio:nbd+unix:///e?socket={}", sock.display()),
        &[],
    );
    let front = connect_with(&dom, 51712, front_cfg());
    let e = d
        .snapshot("xvda", &disk.dir.path().join("o.qcow2"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NBD") && e.contains("mirror"), "{e}");
    let (end, mut front, want) =
        mirror_under_writes(&d, front, target.to_str().unwrap(), "qcow2", 12_000_000);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    assert_eq!(d.chain_of("xvda"), vec![target.display().to_string()]);
    let before = std::fs::read(&disk.path).unwrap();
    front.write(0, &pattern(78, 4096)).unwrap();
    front.flush().unwrap();
    front.disconnect().unwrap();
    d.stop();
    assert!(
        std::fs::read(&disk.path).unwrap() == before,
        "the export changed after the switch"
    );
    let mut want = want;
    want[..4096].copy_from_slice(&pattern(78, 4096));
    check_clean(&target);
    compare_with_model(&target, &want);
}

impl Daemon {
    fn rbd_snap(&self, dev: &str, name: &str) -> xdisk_daemon::Result<control::RbdSnapReply> {
        control::request(
            &self.sock,
            &ControlRequest::RbdSnap {
                device: dev.into(),
                name: name.into(),
            },
        )
        .map(|r| r.rbd_snap.unwrap())
    }
}

/// `xdisk snapshot DEV --rbd-snap NAME` on a device served from a raw RBD image, under
/// writes: `rbd export IMAGE@NAME` holds every write acknowledged before the request and
/// none made after its answer (crash-consistent: the queues were paused and the image
/// flushed), while the device goes on serving the image; on a qcow2 image stored in RBD the
/// snapshot is a `qemu-img check` clean image of what was written before it. Host-file
/// devices, bad names and an existing snapshot name are refused.
#[test]
fn rbd_snapshot_of_a_running_rbd_device_is_crash_consistent() {
    let Some(conf) = cluster() else { return };
    let src = rbd_disk(conf, "livesnap");
    let q = TestImage::new(conf, "livesnapq");
    let qname = format!("rbd:{}:conf={}", q.spec(), conf.display());
    qemu_img(&["create", "-q", "-f", "qcow2", &qname, &DISK.to_string()]);
    let local = raw_disk(DISK);
    let d = daemon();
    let dir = tmpdir();
    d.host
        .add_qdisk(1, 51712, &format!("aio:{}", src.name()), &[]);
    d.host
        .add_qdisk(2, 51728, &format!("qcow2:{}", q.name()), &[]);
    d.host
        .add_qdisk(3, 51744, &format!("aio:{}", local.path.display()), &[]);
    let dom = d.host.guest(1);
    let dom2 = d.host.guest(2);
    let _dom3 = d.host.guest(3);
    wait_until("the devices run", T, || {
        d.sup
            .devices()
            .iter()
            .filter(|s| s.phase == xdisk_daemon::status::Phase::Running)
            .count()
            == 3
    });
    let e = d.rbd_snap("3/51744", "s1").unwrap_err().to_string();
    assert!(e.contains("not one"), "{e}");
    for bad in ["", "a@b", "a/b", "a:b", &"x".repeat(200)] {
        let e = d.rbd_snap("1/51712", bad).unwrap_err().to_string();
        assert!(e.contains("--rbd-snap"), "{bad:?}: {e}");
    }
    let front = connect_with(&dom, 51712, front_cfg());
    let stop = Arc::new(AtomicBool::new(false));
    let w = paced_writer(front, stop.clone(), 13_000_000, Arc::new(AtomicU64::new(0)));
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    let r = d.rbd_snap("1/51712", "s1").expect("rbd snapshot");
    let answered = Instant::now();
    eprintln!("RBD snapshot: {r:?} ({:?})", answered - sent);
    assert_eq!(r.snapshot, format!("rbd:{}@s1", src.spec()));
    std::thread::sleep(Duration::from_millis(400));
    // The name is taken now.
    let e = d.rbd_snap("1/51712", "s1").unwrap_err().to_string();
    assert!(e.contains("s1"), "{e}");
    stop.store(true, Ordering::SeqCst);
    let (mut front, recs) = w.join().unwrap();
    let after = recs.iter().filter(|r| r.submitted > answered).count();
    assert!(after > 10, "only {after} writes after the snapshot");
    let snap = {
        let out = dir.path().join("s1.raw");
        rbd_ok(
            conf,
            &[
                "export",
                "--no-progress",
                &format!("{}@s1", src.spec()),
                out.to_str().unwrap(),
            ],
        );
        std::fs::read(&out).unwrap()
    };
    check_old_top(&snap, &recs, sent, answered);
    let want = bytes_of(&model(&recs, |_| true));
    assert!(front.read(0, DISK / 512).unwrap() == want);
    assert_eq!(
        d.image_of("1/51712"),
        format!("rbd:{}:conf={}", src.spec(), conf.display())
    );
    front.disconnect().unwrap();

    // qcow2 in RBD: the snapshot is a clean image of what was written before it.
    let mut front2 = connect_with(&dom2, 51728, front_cfg());
    let before = round_trip(&mut front2, 41);
    d.rbd_snap("2/51728", "q1")
        .expect("snapshot of qcow2 in RBD");
    front2.write(0, &pattern(99, 65536)).unwrap();
    front2.flush().unwrap();
    front2.disconnect().unwrap();
    d.stop();
    let snap_name = format!("rbd:{}@q1:conf={}", q.spec(), conf.display());
    qemu_img(&["check", "-f", "qcow2", &snap_name]);
    let out = dir.path().join("q1.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &snap_name,
        out.to_str().unwrap(),
    ]);
    let got = std::fs::read(&out).unwrap();
    for (s, data) in &before {
        let o = (*s * 512) as usize;
        assert!(
            got[o..o + data.len()] == data[..],
            "sector {s} of the snapshot"
        );
    }
    qemu_img(&["check", "-f", "qcow2", &qname]);
}

/// A mirror started while the guest writes only to clusters it never wrote before (each
/// write allocates one): the writes between the look-up of the first pass's ranges and the
/// start of the write tracking must not be lost. The guest writes 4 KiB at the start of
/// cluster after cluster of a 64 MiB qcow2 image, one write at a time, across the start of
/// a `--pivot` mirror to a new raw file; the file switched to holds every write.
#[test]
fn mirror_started_among_first_writes_to_clusters_misses_none() {
    const SIZE: u64 = 64 * MIB;
    const CLUSTER: u64 = 65536;
    let d = daemon();
    let disk = qcow2_disk(SIZE);
    let target = disk.dir.path().join("t.raw");
    let dom = d.host.guest(1);
    d.host
        .add_qdisk(1, 51712, &format!("qcow2:{}", disk.path.display()), &[]);
    let mut front = connect_with(&dom, 51712, front_cfg());
    let started = Arc::new(AtomicBool::new(false));
    let s2 = started.clone();
    let w = std::thread::spawn(move || {
        let mut n = 0u64;
        for k in 0..SIZE / CLUSTER {
            front
                .write(k * CLUSTER / 512, &pattern(500 + k, 4096))
                .unwrap();
            n += 1;
            // Slower once the mirror is started: a copy that keeps up converges.
            if s2.load(Ordering::SeqCst) && n.is_multiple_of(8) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        front.flush().unwrap();
        front
    });
    std::thread::sleep(Duration::from_millis(100));
    let j = d
        .mirror_job("xvda", &target, "raw", "full", true, 0)
        .expect("mirror");
    started.store(true, Ordering::SeqCst);
    let mut front = w.join().unwrap();
    let end = d.wait(j.id);
    assert_eq!(end.state, JobState::Completed, "{end:?}");
    let mut want = vec![0u8; SIZE as usize];
    for k in 0..SIZE / CLUSTER {
        let o = (k * CLUSTER) as usize;
        want[o..o + 4096].copy_from_slice(&pattern(500 + k, 4096));
    }
    front.disconnect().unwrap();
    d.stop();
    let got = std::fs::read(&target).unwrap();
    let lost: Vec<u64> = (0..SIZE / CLUSTER)
        .filter(|&k| {
            let o = (k * CLUSTER) as usize;
            got[o..o + 4096] != want[o..o + 4096]
        })
        .collect();
    assert!(lost.is_empty(), "clusters missing in the target: {lost:?}");
}
