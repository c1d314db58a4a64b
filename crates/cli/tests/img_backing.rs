//! `xdisk img` against hostile backing files (issue 9, finding 2), tried from the outside as
//! the review did: a raw disk carrying a qcow2 header naming another tenant's image, a qcow2
//! backed by /dev/zero, a FIFO backing file, and `--backing-dirs`.

mod support;
use support::{s, tmp, XDISK};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `xdisk img ARGS`, killing it after 20 s (a FIFO open blocks forever).
fn img(args: &[&str]) -> Output {
    let mut child = Command::new(XDISK)
        .arg("img")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "xdisk img {args:?} still running after 20 s: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qcow2_naming(p: &Path, backing: &str, fmt: &str) {
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            s(p),
            "1M",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn convert_of_a_probed_image_never_reads_its_backing_file() {
    let d = tmp("xdisk-cli-backing-");
    let tenant = d.path().join("tenant.raw");
    std::fs::write(&tenant, vec![0x5au8; 1 << 20]).unwrap();
    let disk = d.path().join("disk.raw");
    qcow2_naming(&disk, s(&tenant), "raw");
    let out = d.path().join("out.raw");
    let o = img(&["convert", "-O", "raw", s(&disk), s(&out)]);
    assert!(
        !o.status.success(),
        "convert of a probed image with a backing file succeeded"
    );
    let e = stderr(&o);
    assert!(e.contains("probed") && e.contains("-f qcow2"), "{e}");
    if let Ok(data) = std::fs::read(&out) {
        assert!(
            !data.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)),
            "the tenant's data reached the output"
        );
    }
    // As raw (what the disk really is): the output is the disk's own bytes.
    let o = img(&["convert", "-f", "raw", "-O", "raw", s(&disk), s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
    // (The raw size is rounded up to sectors.)
    assert!(
        a.len() >= b.len() && a[..b.len()] == b[..] && a[b.len()..].iter().all(|&x| x == 0),
        "the raw conversion differs from the disk ({} vs {} bytes)",
        a.len(),
        b.len()
    );
}

#[test]
fn convert_with_dev_zero_backing_fails() {
    let d = tmp("xdisk-cli-backing-");
    let z = d.path().join("z.qcow2");
    qcow2_naming(&z, "/dev/zero", "raw");
    let out = d.path().join("out.raw");
    let o = img(&["convert", "-f", "qcow2", "-O", "raw", s(&z), s(&out)]);
    assert!(!o.status.success(), "a /dev/zero backing file was opened");
    assert!(stderr(&o).contains("character device"), "{}", stderr(&o));
}

#[test]
fn fifo_backing_file_fails_promptly_and_info_shows_it() {
    let d = tmp("xdisk-cli-backing-");
    let fifo = d.path().join("fifo");
    let o = Command::new("mkfifo").arg(&fifo).output().unwrap();
    assert!(o.status.success());
    let f = d.path().join("f.qcow2");
    qcow2_naming(&f, "fifo", "raw");
    let out = d.path().join("out.raw");
    let o = img(&["convert", "-f", "qcow2", "-O", "raw", s(&f), s(&out)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    // info --backing-chain: the image, its backing file, and why it is not opened.
    let o = img(&[
        "info",
        "-f",
        "qcow2",
        "--backing-chain",
        "--output=json",
        s(&f),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let chain = v.as_array().unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0]["backing-filename"], "fifo");
    assert_eq!(chain[0]["full-backing-filename"], s(&fifo));
    assert!(
        chain[0]["backing-refused"]
            .as_str()
            .unwrap()
            .contains("FIFO"),
        "{v}"
    );
    let o = img(&["info", "-f", "qcow2", "--backing-chain", s(&f)]);
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(h.contains("backing file: fifo (actual path: "), "{h}");
    assert!(
        h.contains("backing file not opened: ") && h.contains("FIFO"),
        "{h}"
    );
}

#[test]
fn info_shows_the_backing_file_of_a_probed_image() {
    let d = tmp("xdisk-cli-backing-");
    let tenant = d.path().join("tenant.raw");
    std::fs::write(&tenant, vec![0x5au8; 1 << 20]).unwrap();
    let disk = d.path().join("disk.raw");
    qcow2_naming(&disk, s(&tenant), "raw");
    for args in [
        vec!["info", "--output=json", s(&disk)],
        vec!["info", "--backing-chain", "--output=json", s(&disk)],
    ] {
        let o = img(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let top = if v.is_array() { &v[0] } else { &v };
        assert_eq!(top["backing-filename"], s(&tenant), "{v}");
        if v.is_array() {
            assert_eq!(v.as_array().unwrap().len(), 1);
            assert!(top["backing-refused"].as_str().unwrap().contains("probed"));
        }
    }
    // With the format given, the chain opens and shows both.
    let o = img(&[
        "info",
        "-f",
        "qcow2",
        "--backing-chain",
        "--output=json",
        s(&disk),
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert!(v[0].get("backing-refused").is_none());
}

#[test]
fn backing_dirs_confine_backing_files() {
    let d = tmp("xdisk-cli-backing-");
    let images = d.path().join("images");
    let others = d.path().join("others");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&others).unwrap();
    let tenant = others.join("tenant.raw");
    std::fs::write(&tenant, vec![0x5au8; 1 << 20]).unwrap();
    let base = images.join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let good = images.join("good.qcow2");
    qcow2_naming(&good, "base.raw", "raw");
    let bad = images.join("bad.qcow2");
    qcow2_naming(&bad, s(&tenant), "raw");
    let dirs = format!("--backing-dirs={}", s(&images));
    let out = d.path().join("out.raw");
    let o = img(&[
        "convert",
        &dirs,
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&good),
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = img(&[
        "convert",
        &dirs,
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&bad),
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("outside the allowed backing directories"),
        "{}",
        stderr(&o)
    );
    for cmd in [
        vec!["map", &dirs, "-f", "qcow2", s(&bad)],
        vec![
            "compare",
            &dirs,
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            s(&bad),
            s(&good),
        ],
        vec!["resize", &dirs, "-f", "qcow2", s(&bad), "+0"],
    ] {
        let o = img(&cmd);
        assert!(!o.status.success(), "{cmd:?} accepted");
    }
    let both = format!("--backing-dirs={},{}", s(&images), s(&others));
    let o = img(&["map", &both, "-f", "qcow2", s(&bad)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = img(&[
        "info",
        &dirs,
        "--backing-chain",
        "--output=json",
        "-f",
        "qcow2",
        s(&bad),
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v[0]["backing-refused"]
        .as_str()
        .unwrap()
        .contains("outside the allowed backing directories"));
}
