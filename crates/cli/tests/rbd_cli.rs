//! Every command that takes an image name, on Ceph RBD images (`rbd:POOL/IMAGE`), on a
//! real throwaway cluster (see `xdisk_rbd::testing`), with `rbd export` and qemu-img's own
//! rbd driver (qemu-block-extra) as the oracles: `img create/info/map/check/convert/
//! compare/resize/bench`, `xdisk bench` (the blkif backend on the simulation serving an RBD
//! disk, verified) and `xdisk nbd` serving one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xdisk_rbd::testing::{ceph_ok, cluster, rbd, rbd_ok, TestImage};

mod support;
use support::{ok_bounded as ok, run_bounded as run, s, XDISK};

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    support::tmp("xdisk-rbd-")
}

fn xdisk(args: &[&str]) -> String {
    ok(XDISK, args)
}

fn qemu_img(args: &[&str]) -> String {
    ok("qemu-img", args)
}

/// A raw file of `size` bytes: data in some places, holes elsewhere.
fn source_file(dir: &Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("src.raw");
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate() {
        let mb = i as u64 / MIB;
        if mb % 3 != 1 {
            *b = (i as u8).wrapping_mul(7) ^ (i >> 12) as u8 ^ 0x5a;
        }
    }
    std::fs::write(&p, &data).unwrap();
    p
}

/// (start, length, data, zero) of each run of a map, merged where both tools might split.
fn runs(map: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: Value = serde_json::from_str(map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for r in v.as_array().unwrap() {
        let (st, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        let (data, zero) = (r["data"].as_bool().unwrap(), r["zero"].as_bool().unwrap());
        match out.last_mut() {
            Some(l) if l.0 + l.1 == st && l.2 == data && l.3 == zero => l.1 += len,
            _ => out.push((st, len, data, zero)),
        }
    }
    out
}

#[test]
fn raw_images_on_rbd_create_convert_map_and_compare_like_qemu_img() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 24 * MIB);
    let t = TestImage::new(conf, "cliraw");
    let name = t.name();

    let out = xdisk(&["img", "create", "-f", "raw", &name, "24M"]);
    assert!(out.starts_with("Formatting 'rbd:rbd/"), "{out}");
    // It exists now: creating it again fails (qemu-img does not overwrite RBD images).
    let o = run(XDISK, &["img", "create", "-f", "raw", &name, "24M"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));

    let info: Value =
        serde_json::from_str(&xdisk(&["img", "info", "--output=json", &name])).unwrap();
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"].as_u64(), Some(24 * MIB));
    let rbd_info = String::from_utf8_lossy(&rbd_ok(conf, &["info", &t.spec()]).stdout).into_owned();
    assert!(rbd_info.contains("size 24 MiB"), "{rbd_info}");

    // Into the existing image (-n), sparse: the holes of the source stay unallocated.
    xdisk(&[
        "img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        &name,
    ]);
    let exported = rbd_ok(conf, &["export", "--no-progress", &t.spec(), "-"]).stdout;
    assert!(
        exported == std::fs::read(&src).unwrap(),
        "rbd export differs"
    );
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), &name]);
    xdisk(&["img", "compare", s(&src), &name]);

    // Block status from the object map: xdisk and qemu-img see the same runs (whole 4 MiB
    // objects: MiB 1 of [0, 4) is a hole of the source but shares an object with data).
    let ours = runs(&xdisk(&["img", "map", "--output=json", &name]));
    let theirs = runs(&qemu_img(&["map", "--output=json", "-f", "raw", &name]));
    assert_eq!(ours, theirs);
    assert!(
        ours.iter().all(|r| r.2),
        "every object was written: {ours:?}"
    );

    // Back out of RBD, and between two RBD images.
    let back = d.path().join("back.raw");
    xdisk(&["img", "convert", "-O", "raw", &name, s(&back)]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    let t2 = TestImage::new(conf, "cliraw2");
    xdisk(&["img", "convert", "-O", "raw", &name, &t2.name()]);
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &name, &t2.name()]);

    // Resize grows the RBD image.
    xdisk(&["img", "resize", "-f", "raw", &name, "32M"]);
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", "raw", &name])).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(32 * MIB));
}

#[test]
fn qcow2_images_stored_in_rbd_round_trip_through_qemu_img() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 16 * MIB);

    // xdisk writes a qcow2 image into RBD; qemu-img checks and reads it.
    let t = TestImage::new(conf, "cliqcow");
    let name = t.name();
    xdisk(&["img", "convert", "-f", "raw", "-O", "qcow2", s(&src), &name]);
    let chk = qemu_img(&["check", "-f", "qcow2", &name]);
    assert!(chk.contains("No errors"), "{chk}");
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&src), &name]);
    let check: Value =
        serde_json::from_str(&xdisk(&["img", "check", "--output=json", &name])).unwrap();
    assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
    let info: Value =
        serde_json::from_str(&xdisk(&["img", "info", "--output=json", &name])).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(16 * MIB));
    // The qcow2 layer's map, as qemu-img sees it through its rbd driver.
    let ours = runs(&xdisk(&["img", "map", "--output=json", &name]));
    let theirs = runs(&qemu_img(&["map", "--output=json", "-f", "qcow2", &name]));
    assert_eq!(ours, theirs);

    // qemu-img writes one; xdisk reads it.
    let t2 = TestImage::new(conf, "cliqcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&src), &t2.name()]);
    xdisk(&[
        "img",
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&src),
        &t2.name(),
    ]);
    let back = d.path().join("back.raw");
    xdisk(&[
        "img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &t2.name(),
        s(&back),
    ]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());

    // An empty qcow2 made by `img create` inside RBD is what qemu-img would make.
    let t3 = TestImage::new(conf, "cliqcow3");
    xdisk(&["img", "create", "-q", "-f", "qcow2", &t3.name(), "1G"]);
    let chk = qemu_img(&["check", "-f", "qcow2", &t3.name()]);
    assert!(chk.contains("No errors"), "{chk}");
    // Backing files of images in RBD are refused clearly.
    let o = run(
        XDISK,
        &[
            "img",
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&src),
            "-F",
            "raw",
            &TestImage::new(conf, "x").name(),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not supported"));
}

#[test]
fn snapshots_open_read_only() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 8 * MIB);
    let t = TestImage::new(conf, "clisnap");
    xdisk(&["img", "create", "-q", "-f", "raw", &t.name(), "8M"]);
    xdisk(&["img", "convert", "-n", "-O", "raw", s(&src), &t.name()]);
    rbd_ok(conf, &["snap", "create", &format!("{}@before", t.spec())]);
    // The head changes; the snapshot does not.
    let zero = d.path().join("zero.raw");
    std::fs::write(&zero, vec![0u8; 8 * MIB as usize]).unwrap();
    xdisk(&["img", "convert", "-n", "-O", "raw", s(&zero), &t.name()]);
    let snap = t.name_with("@before");
    xdisk(&["img", "compare", "-f", "raw", "-F", "raw", s(&src), &snap]);
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), &snap]);
    let info: Value =
        serde_json::from_str(&xdisk(&["img", "info", "--output=json", &snap])).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(8 * MIB));
    // Writing to a snapshot is refused up front.
    let o = run(
        XDISK,
        &["img", "convert", "-n", "-O", "raw", s(&src), &snap],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{o:?}"
    );
    let o = run(
        XDISK,
        &[
            "bench",
            &format!("--filename={snap}"),
            "--rw=write",
            "--bs=4k",
            "--size=1M",
            "--number_ios=10",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{o:?}"
    );
    // Reading one through the ring works.
    xdisk(&[
        "bench",
        &format!("--filename={snap}"),
        "--rw=randread",
        "--bs=4k",
        "--size=8M",
        "--number_ios=200",
    ]);
}

/// The blkif backend on the simulation serving RBD disks: a verified random read/write
/// workload on two queues, raw and qcow2 in RBD; the qcow2 image stays clean.
#[test]
fn xdisk_bench_through_the_ring_verifies_on_rbd_disks() {
    let Some(conf) = cluster() else { return };
    for fmt in ["raw", "qcow2"] {
        let t = TestImage::new(conf, &format!("bench{fmt}"));
        xdisk(&["img", "create", "-q", "-f", fmt, &t.name(), "64M"]);
        let out = xdisk(&[
            "bench",
            &format!("--filename={}", t.name()),
            &format!("--format={fmt}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=32M",
            "--number_ios=1500",
            "--verify=crc32c",
            "--output-format=json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let x = &v["jobs"][0]["xdisk"];
        assert_eq!(x["verify_mismatches"].as_u64(), Some(0), "{x}");
        assert_eq!(x["backend_errors"].as_u64(), Some(0), "{x}");
        assert!(x["verified_blocks"].as_u64().unwrap() > 0, "{x}");
        assert_eq!(
            v["jobs"][0]["error"].as_u64().unwrap_or(0),
            0,
            "{}",
            v["jobs"][0]
        );
        if fmt == "qcow2" {
            let chk = qemu_img(&["check", "-f", "qcow2", &t.name()]);
            assert!(chk.contains("No errors"), "{chk}");
        }
        // 1M sequential writes with flushes, on the engine's path.
        xdisk(&[
            "bench",
            &format!("--filename={}", t.name()),
            &format!("--format={fmt}"),
            "--rw=write",
            "--bs=1M",
            "--iodepth=4",
            "--size=16M",
            "--verify=crc32c",
        ]);
        let o = xdisk(&[
            "img",
            "bench",
            "-f",
            fmt,
            "-c",
            "2000",
            "-d",
            "16",
            &t.name(),
        ]);
        assert!(o.contains("Run completed"), "{o}");
    }
}

/// `xdisk nbd` exporting an RBD image: qemu-img reads it over NBD as it reads the image
/// through its rbd driver.
#[test]
fn xdisk_nbd_serves_an_rbd_image() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 8 * MIB);
    let t = TestImage::new(conf, "clinbd");
    xdisk(&["img", "convert", "-O", "qcow2", s(&src), &t.name()]);
    let sock = d.path().join("nbd.sock");
    let mut server = Command::new(XDISK)
        .args([
            "nbd",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-k",
            s(&sock),
            &t.name(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "xdisk nbd did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    let r = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&src), &uri],
    );
    // SIGTERM: the server closes the image (a killed one would leave its watch on the
    // image until the cluster times it out, and the image could not be removed meanwhile).
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// An RBD image as a Xen disk: `xdisk attach rbd:...` writes `params=aio:rbd:...` (what
/// libxl writes for `format=raw,backendtype=qdisk,target=rbd:pool/img`), the daemon on the
/// simulation serves it to the simulated frontend, which connects and reads it; `stat`
/// shows the image with its key hidden; `rbd resize` elsewhere reaches the device (online
/// resize).
#[test]
fn the_daemon_serves_an_rbd_disk_attached_by_name() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let t = TestImage::new(conf, "cliattach");
    xdisk(&["img", "create", "-q", "-f", "raw", &t.name(), "16M"]);
    let sock = d.path().join("control.sock");
    let mut serve = Command::new(XDISK)
        .args(["serve", "--platform=sim", "--control", s(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A key in the name (the cluster's own, so that it also works) must not be shown.
    let keyring = std::fs::read_to_string(conf.parent().unwrap().join("keyring")).unwrap();
    let key = keyring
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap()
        .to_owned();
    let name = t.name_with(&format!(":key={key}"));
    let r = run(
        XDISK,
        &[
            "attach",
            "--format",
            "raw",
            &name,
            "--control",
            s(&sock),
            "--timeout",
            "30",
        ],
    );
    let stat = run(XDISK, &["stat", "xvda", "--json", "--control", s(&sock)]);
    // Resized elsewhere (librbd's header watch tells the open image): the daemon follows.
    rbd_ok(
        conf,
        &["resize", "--no-progress", "--size", "32M", &t.spec()],
    );
    let t0 = Instant::now();
    let resized = loop {
        let o = run(XDISK, &["stat", "xvda", "--json", "--control", s(&sock)]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v[0]["size"].as_u64() == Some(32 * MIB) {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let detach = run(XDISK, &["detach", "xvda", "--control", s(&sock)]);
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let _ = serve.wait();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.contains("xvda") && out.contains("Connected"), "{out}");
    let stat = String::from_utf8_lossy(&stat.stdout);
    let v: Value = serde_json::from_str(&stat).unwrap_or_else(|e| panic!("{e}: {stat}"));
    assert_eq!(v[0]["format"], "raw");
    assert_eq!(v[0]["size"].as_u64(), Some(16 * MIB), "{v}");
    assert!(v[0]["counters"]["rd_req"].as_u64().unwrap() >= 1, "{v}");
    let shown = v[0]["image"].as_str().unwrap();
    assert!(
        shown.starts_with("rbd:rbd/") && shown.contains("key=<hidden>"),
        "{shown}"
    );
    assert!(!stat.contains(&key), "the key leaked: {stat}");
    assert!(resized, "the daemon did not follow rbd resize");
    assert!(detach.status.success());
}

/// A local qcow2 overlay whose backing file is an RBD image (as QEMU allows: `-b rbd:...`):
/// opened read-only through librbd, the chain read as qemu-img reads it; refused under
/// --backing-dirs (not a host file).
#[test]
fn a_local_overlay_of_an_rbd_image_reads_its_chain_like_qemu_img() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 8 * MIB);
    let t = TestImage::new(conf, "clibacking");
    let name = t.name();
    xdisk(&["img", "convert", "-f", "raw", "-O", "raw", s(&src), &name]);
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        &name,
        s(&top),
        "8M",
    ]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x66 1M 64k", s(&top)],
    );
    let info = xdisk(&["img", "info", "--backing-chain", "-f", "qcow2", s(&top)]);
    assert!(info.contains("image: rbd:"), "{info}");
    let (ours, theirs) = (d.path().join("ours.raw"), d.path().join("theirs.raw"));
    xdisk(&[
        "img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&top),
        s(&ours),
    ]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&top), s(&theirs)]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    let o = run(
        XDISK,
        &[
            "img",
            "info",
            "--backing-chain",
            "-f",
            "qcow2",
            "--backing-dirs",
            s(d.path()),
            s(&top),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("not a host file"), "{out}");
}

#[test]
fn img_create_takes_rbd_options_and_refuses_bad_ones_clearly() {
    let Some(conf) = cluster() else { return };
    let info = |t: &TestImage| {
        let o = rbd_ok(conf, &["info", "--format", "json", &t.spec()]);
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    // Object size, features, data pool (a second replicated pool here; a real setup names
    // an erasure-coded one), as `rbd info` reports them.
    ceph_ok(conf, &["osd", "pool", "create", "xdisk-data", "8", "8"]);
    ceph_ok(
        conf,
        &["osd", "pool", "application", "enable", "xdisk-data", "rbd"],
    );
    let t = TestImage::new(conf, "opts");
    xdisk(&[
        "img",
        "create",
        "-f",
        "raw",
        "-o",
        "object_size=1M,features=layering+exclusive-lock,data_pool=xdisk-data",
        &t.name(),
        "8M",
    ]);
    let i = info(&t);
    assert_eq!(i["order"], 20, "{i}");
    assert_eq!(i["object_size"], MIB, "{i}");
    let features: Vec<&str> = i["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features, ["layering", "exclusive-lock", "data-pool"], "{i}");
    assert_eq!(i["data_pool"], "xdisk-data", "{i}");
    // QEMU's spelling: a raw image's cluster_size is its object size.
    let q = TestImage::new(conf, "opts-qemu");
    xdisk(&[
        "img",
        "create",
        "-f",
        "raw",
        "-o",
        "cluster_size=64k",
        &q.name(),
        "1M",
    ]);
    assert_eq!(info(&q)["object_size"], 65536);
    // qcow2 in RBD: cluster_size is qcow2's; the RBD options still apply to the RBD image.
    let c = TestImage::new(conf, "opts-qcow2");
    xdisk(&[
        "img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k,object_size=8M,features=none",
        &c.name(),
        "16M",
    ]);
    let ci = info(&c);
    assert_eq!(ci["object_size"], 8 * MIB, "{ci}");
    assert_eq!(ci["features"].as_array().map(|a| a.len()), Some(0), "{ci}");
    let qi: Value =
        serde_json::from_str(&xdisk(&["img", "info", "--output=json", &c.name()])).unwrap();
    assert_eq!(qi["cluster-size"], 65536);

    // Refused, saying why, and nothing left behind.
    let bad = TestImage::new(conf, "opts-bad");
    for (o, why) in [
        ("object_size=3M", "power of two"),
        ("features=layering+turbo", "unknown RBD feature 'turbo'"),
        ("stripe_unit=64k", "together"),
        // librbd's own check: an object map needs the exclusive lock.
        ("features=layering+object-map", "Invalid argument"),
        ("data_pool=no-such-pool", "No such file or directory"),
    ] {
        let out = run(
            XDISK,
            &["img", "create", "-f", "raw", "-o", o, &bad.name(), "1M"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{o}: created");
        assert!(err.contains(why), "{o}: {err}");
        assert!(
            !rbd(conf, &["info", &bad.spec()]).status.success(),
            "{o}: left an image"
        );
    }
    let d = tmp();
    let f = d.path().join("f.raw");
    let out = run(
        XDISK,
        &[
            "img",
            "create",
            "-f",
            "raw",
            "-o",
            "object_size=1M",
            s(&f),
            "1M",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only images on RBD"));
}
