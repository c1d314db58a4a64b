//! `xdisk img bitmap` and the bitmaps of `xdisk img info` against qemu-img as the oracle:
//! the same command lines on twin images give the same bitmaps (names, granularities,
//! flags, dirty ranges as `qemu-nbd -B` + `nbdinfo --map` export them), the same exit codes
//! and messages; info shows bitmaps as qemu-img does (text and JSON); writes through `xdisk
//! img bench -w`, `xdisk img convert -n`, `xdisk img resize` and an `xdisk nbd` export land
//! in the enabled bitmaps; a killed `xdisk nbd` leaves them in use, the image clean.

mod support;
use support::{ok, run, s, tmp, XDISK};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn xdisk(args: &[&str]) -> Output {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    run(XDISK, &a)
}

fn create(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), size]);
    p
}

/// `format-specific.data.bitmaps` of qemu-img info (`Null` without bitmaps).
fn qemu_bitmaps(p: &Path) -> Value {
    let v: Value =
        serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", s(p)])).unwrap();
    v.pointer("/format-specific/data/bitmaps")
        .cloned()
        .unwrap_or(Value::Null)
}

fn names(p: &Path) -> Vec<String> {
    qemu_bitmaps(p)
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| b["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Dirty ranges of bitmap `name` as QEMU exports them (qemu-nbd -B, nbdinfo --map).
fn qemu_dirty(p: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = p.with_extension(format!("{name}.sock"));
    let pid = p.with_extension(format!("{name}.pid"));
    let _ = std::fs::remove_file(&sock);
    ok(
        "qemu-nbd",
        &[
            "--fork",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            s(&sock),
            "--pid-file",
            s(&pid),
            s(p),
        ],
    );
    let out = ok(
        "nbdinfo",
        &[
            &format!("--map=qemu:dirty-bitmap:{name}"),
            &format!("nbd+unix:///?socket={}", s(&sock)),
        ],
    );
    // qemu-nbd exits when its client leaves (a zombie until reaped: exited all the same),
    // releasing the image's lock.
    if let Some(n) = std::fs::read_to_string(&pid)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    {
        for _ in 0..500 {
            let st = std::fs::read_to_string(format!("/proc/{n}/status")).unwrap_or_default();
            if !st
                .lines()
                .any(|l| l.starts_with("State:") && !l.contains("Z (zombie)"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut v: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "1" {
            let (o, l): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            match v.last_mut() {
                Some((a, b)) if *a + *b == o => *b += l,
                _ => v.push((o, l)),
            }
        }
    }
    v
}

/// What a command printed on stderr, without the program's name.
fn message(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr);
    e.lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("xdisk: "))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn img_bitmap_actions_match_qemu_img_on_twin_images() {
    let d = tmp("xdisk-cli-bitmap-");
    let mine = create(d.path(), "mine.qcow2", "32M");
    let theirs = create(d.path(), "theirs.qcow2", "32M");
    let src_m = create(d.path(), "src-mine.qcow2", "32M");
    let src_t = create(d.path(), "src-theirs.qcow2", "32M");
    for p in [&src_m, &src_t] {
        ok("qemu-img", &["bitmap", "--add", "-g", "4k", s(p), "ext"]);
        ok("qemu-io", &["-c", "write 5M 4k", s(p)]);
    }
    // (command line before FILENAME BITMAP, bitmap, writes after it through qemu-io)
    let steps: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--add"], "b1", "write 0 4k"),
        (vec!["--add", "-g", "4k", "--disable"], "b2", "write 1M 64k"),
        (vec!["--add"], "b1", ""),
        (vec!["--add", "--add"], "b3", ""),
        (vec!["--add", "-g", "512"], "fine", "write 2M 512"),
        (
            vec!["--clear", "--disable", "--clear", "--enable"],
            "b1",
            "write 3M 4k",
        ),
        (vec!["--enable"], "b2", "write 4M 4k"),
        (vec!["--merge", "b2"], "b1", ""),
        (vec!["--merge", "ext", "-b", "SRC", "-F", "qcow2"], "b3", ""),
        (vec!["--merge", "nope"], "b1", ""),
        (vec!["--remove"], "nope", ""),
        (vec!["--enable"], "nope", ""),
        (vec!["-g", "4k", "--enable"], "b1", ""),
        (vec![], "b1", ""),
        (vec!["--add", "-g", "3000"], "g", ""),
        (vec!["--add", "-g", "256"], "g", ""),
        (vec!["--add", "-g", "2G"], "big", "write 6M 4k"),
        (vec!["--add"], "", ""),
        (vec!["-b", "SRC", "--add"], "x", ""),
        (vec!["-F", "qcow2", "--add"], "x", ""),
        (vec!["--remove"], "b3", "write 7M 4k"),
        (vec!["--disable", "--remove"], "b2", ""),
    ];
    for (args, bitmap, writes) in steps {
        let mut outs = Vec::new();
        for (prog, img, src) in [("qemu-img", &theirs, &src_t), (XDISK, &mine, &src_m)] {
            let mut a: Vec<&str> = if prog == XDISK {
                vec!["img", "bitmap"]
            } else {
                vec!["bitmap"]
            };
            a.extend(args.iter().map(|&x| if x == "SRC" { s(src) } else { x }));
            a.extend([s(img), bitmap]);
            let o = run(prog, &a);
            if !writes.is_empty() {
                ok("qemu-io", &["-c", writes, s(img)]);
            }
            outs.push(o);
        }
        let what = format!("bitmap {args:?} {bitmap:?}");
        assert_eq!(
            outs[0].status.code(),
            outs[1].status.code(),
            "{what}: exit codes (qemu-img: {}; xdisk: {})",
            message(&outs[0]),
            message(&outs[1])
        );
        if !outs[0].status.success() {
            let (t, m) = (message(&outs[0]), message(&outs[1]));
            // The same first line, except where QEMU names its internal nodes.
            if !t.contains("#block") {
                assert_eq!(t.lines().next(), m.lines().next(), "{what}: messages");
            }
        }
        assert_eq!(
            qemu_bitmaps(&theirs),
            qemu_bitmaps(&mine),
            "{what}: bitmaps"
        );
        for n in names(&theirs) {
            assert_eq!(
                qemu_dirty(&theirs, &n),
                qemu_dirty(&mine, &n),
                "{what}: dirty ranges of {n}"
            );
        }
    }
    let c = run("qemu-img", &["check", s(&mine)]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    // Raw images have no bitmaps.
    let raw = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let o = xdisk(&["bitmap", "--add", "-f", "raw", s(&raw), "b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        message(&o).starts_with("Operation add on bitmap b failed"),
        "{}",
        message(&o)
    );
}

#[test]
fn img_info_shows_bitmaps_like_qemu_img_in_text_and_json() {
    let d = tmp("xdisk-cli-bitmap-");
    let img = create(d.path(), "i.qcow2", "16M");
    ok("qemu-img", &["bitmap", "--add", s(&img), "plain"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", "--disable", s(&img), "off"],
    );
    ok("qemu-img", &["bitmap", "--add", "-g", "1M", s(&img), "big"]);
    // Leave "plain" and "big" in use: QEMU aborts while it has the image open.
    let o = run("qemu-io", &["-c", "write 0 4k", "-c", "abort", s(&img)]);
    assert!(!o.status.success());
    ok("qemu-img", &["bitmap", "--remove", s(&img), "big"]);
    let section = |text: &str| -> String {
        let i = text.find("Format specific information:").unwrap();
        text[i..].to_owned()
    };
    let theirs = ok("qemu-img", &["info", s(&img)]);
    let mine = String::from_utf8(xdisk(&["info", s(&img)]).stdout).unwrap();
    assert_eq!(section(&mine), section(&theirs));
    assert!(theirs.contains("[0]: in-use"), "{theirs}");
    let j = |text: &str| -> Value {
        let v: Value = serde_json::from_str(text).unwrap();
        v.pointer("/format-specific/data/bitmaps").cloned().unwrap()
    };
    let mine = String::from_utf8(xdisk(&["info", "--output=json", s(&img)]).stdout).unwrap();
    assert_eq!(
        j(&mine),
        j(&ok("qemu-img", &["info", "--output=json", s(&img)]))
    );
    // No bitmaps: no "bitmaps" entry, as qemu-img.
    let plain = create(d.path(), "p.qcow2", "1M");
    let mine = String::from_utf8(xdisk(&["info", "--output=json", s(&plain)]).stdout).unwrap();
    assert!(!mine.contains("bitmaps"), "{mine}");
}

fn wait_for(p: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while !p.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("xdisk nbd exited early: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "xdisk did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn writes_through_xdisk_img_commands_and_nbd_exports_land_in_bitmaps() {
    let d = tmp("xdisk-cli-bitmap-");
    // img bench -w: 100 requests of 4k from 1M, step 64k (through the ImageQueue).
    let img = create(d.path(), "bench.qcow2", "64M");
    ok("qemu-img", &["bitmap", "--add", "-g", "4k", s(&img), "b"]);
    let o = xdisk(&[
        "bench",
        "-w",
        "-c",
        "100",
        "-d",
        "8",
        "-s",
        "4k",
        "-S",
        "64k",
        "-o",
        "1M",
        "-t",
        "none",
        s(&img),
    ]);
    assert!(o.status.success(), "{}", message(&o));
    let want: Vec<(u64, u64)> = (0..100).map(|i| ((1 << 20) + i * 65536, 4096)).collect();
    assert_eq!(qemu_dirty(&img, "b"), want);
    ok("qemu-img", &["check", s(&img)]);

    // img convert -n into an image with bitmaps: exactly the data ranges written.
    let src = d.path().join("src.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&src), "64M"]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 8M 100k", s(&src)],
    );
    let dst = create(d.path(), "dst.qcow2", "64M");
    ok("qemu-img", &["bitmap", "--add", "-g", "64k", s(&dst), "b"]);
    let o = xdisk(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&dst),
    ]);
    assert!(o.status.success(), "{}", message(&o));
    assert_eq!(qemu_dirty(&dst, "b"), [(8 << 20, 128 << 10)]);
    ok("qemu-img", &["check", s(&dst)]);

    // img resize: grown range clean (as qemu-img resize), bitmaps still valid.
    let o = xdisk(&["resize", s(&dst), "+16M"]);
    assert!(o.status.success(), "{}", message(&o));
    assert_eq!(qemu_dirty(&dst, "b"), [(8 << 20, 128 << 10)]);
    ok("qemu-img", &["check", s(&dst)]);

    // An xdisk nbd export (each client's ImageQueue): qemu-io writes over NBD; the server
    // exits after its client and stores the bitmaps. Trims reach the image (and the
    // bitmaps) with --discard=unmap only (ignored ones are not recorded, as in QEMU).
    let img = create(d.path(), "nbd.qcow2", "16M");
    ok("qemu-img", &["bitmap", "--add", "-g", "4k", s(&img), "b"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&img), "off"],
    );
    let sock = d.path().join("nbd.sock");
    let mut child = Command::new(XDISK)
        .args([
            "nbd",
            "-f",
            "qcow2",
            "--discard=unmap",
            "-k",
            s(&sock),
            s(&img),
        ])
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "--discard=unmap",
            "-c",
            "write -P 1 1M 64k",
            "-c",
            "write -z 2M 8k",
            "-c",
            "discard 3M 4k",
            "-c",
            "write -P 2 5000 100",
            &uri,
        ],
    );
    assert!(wait_exit(&mut child).success());
    ok("qemu-img", &["check", s(&img)]);
    assert_eq!(
        qemu_dirty(&img, "b"),
        [
            (4096, 4096),
            (1 << 20, 64 << 10),
            (2 << 20, 8 << 10),
            (3 << 20, 4096)
        ]
    );
    assert_eq!(qemu_dirty(&img, "off"), []);

    // Killed while serving: the enabled bitmap stays in use, the image has no corruption.
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(XDISK)
        .args(["nbd", "-f", "qcow2", "-t", "-k", s(&sock), s(&img)])
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 3 9M 4k", &uri]);
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let c = run("qemu-img", &["check", s(&img)]);
    assert!(
        matches!(c.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&c.stdout)
    );
    let bm = qemu_bitmaps(&img);
    assert_eq!(
        bm[0]["flags"],
        serde_json::json!(["in-use", "auto"]),
        "{bm}"
    );
    assert_eq!(bm[1]["flags"], serde_json::json!([]), "{bm}");
}

#[test]
fn img_check_repair_leaves_in_use_bitmaps_alone_as_qemu_img_does() {
    let d = tmp("xdisk-cli-bitmap-");
    let img = create(d.path(), "u.qcow2", "8M");
    ok("qemu-img", &["bitmap", "--add", s(&img), "b"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", s(&img), "off"],
    );
    let o = run("qemu-io", &["-c", "write 0 4k", "-c", "abort", s(&img)]);
    assert!(!o.status.success());
    let twin = d.path().join("twin.qcow2");
    std::fs::copy(&img, &twin).unwrap();
    for r in ["leaks", "all"] {
        let mine = xdisk(&["check", "-r", r, s(&img)]);
        let theirs = run("qemu-img", &["check", "-r", r, s(&twin)]);
        assert_eq!(mine.status.code(), theirs.status.code(), "-r {r}");
        assert_eq!(mine.status.code(), Some(0), "-r {r}: {}", message(&mine));
    }
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&twin).unwrap());
    assert_eq!(
        qemu_bitmaps(&img)[0]["flags"],
        serde_json::json!(["in-use", "auto"])
    );
}
