//! `xdisk img` against qemu-img as the oracle, both directions.

mod support;
use support::{json, ok, run, s, tmp, XDISK};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn xdisk(args: &[&str]) -> String {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    ok(XDISK, &a)
}

fn xdisk_out(args: &[&str]) -> Output {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    run(XDISK, &a)
}

/// The qemu-img info fields that describe the image (not the host file).
fn info_fields(v: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for k in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        out.push((k.to_string(), v.get(k).cloned().unwrap_or(Value::Null)));
    }
    for k in [
        "compat",
        "refcount-bits",
        "lazy-refcounts",
        "compression-type",
        "corrupt",
    ] {
        out.push((
            k.to_string(),
            v.pointer(&format!("/format-specific/data/{k}"))
                .cloned()
                .unwrap_or(Value::Null),
        ));
    }
    out
}

#[test]
fn create_matches_qemu_img_create_and_passes_check() {
    let d = tmp("xdisk-cli-");
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "32M"]);
    let cases: &[&[&str]] = &[
        &["-f", "qcow2"],
        &["-f", "qcow2", "-o", "cluster_size=512"],
        &["-f", "qcow2", "-o", "cluster_size=2M"],
        &["-f", "qcow2", "-o", "compat=0.10"],
        &["-f", "qcow2", "-o", "refcount_bits=1"],
        &["-f", "qcow2", "-o", "refcount_bits=64,lazy_refcounts=on"],
        &["-f", "qcow2", "-o", "compression_type=zstd"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,cluster_size=4k",
        ],
        &["-f", "qcow2", "-o", "preallocation=falloc"],
        &["-f", "qcow2", "-o", "preallocation=full"],
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
    ];
    for (i, opts) in cases.iter().enumerate() {
        let ours = d.path().join(format!("ours{i}.qcow2"));
        let theirs = d.path().join(format!("theirs{i}.qcow2"));
        let has_backing = opts.contains(&"-b");
        let mut a: Vec<&str> = vec!["create", "-q"];
        a.extend_from_slice(opts);
        let mut x = a.clone();
        x.push(s(&ours));
        let mut q = a.clone();
        q.push(s(&theirs));
        if !has_backing {
            x.push("64M");
            q.push("64M");
        }
        // Relative backing names resolve against the image's directory.
        let xo = Command::new(XDISK)
            .arg("img")
            .args(&x)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            xo.status.success(),
            "xdisk create {opts:?}: {}",
            String::from_utf8_lossy(&xo.stderr)
        );
        let qo = Command::new("qemu-img")
            .args(&q)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(qo.status.success(), "qemu-img create {opts:?}");
        ok("qemu-img", &["check", s(&ours)]);
        let vi = json(&ok("qemu-img", &["info", "--output=json", s(&ours)]));
        let vq = json(&ok("qemu-img", &["info", "--output=json", s(&theirs)]));
        assert_eq!(info_fields(&vi), info_fields(&vq), "create {opts:?}");
        // And xdisk's own info agrees with qemu-img's on both.
        let xi = json(&xdisk(&["info", "--output=json", s(&theirs)]));
        assert_eq!(info_fields(&xi), info_fields(&vq), "xdisk info {opts:?}");
        // qemu-io can use what xdisk created.
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x42 0 128k",
                "-c",
                "read -P 0x42 0 128k",
                s(&ours),
            ],
        );
        ok("qemu-img", &["check", s(&ours)]);
    }
    // Raw create.
    let raw = d.path().join("r.raw");
    xdisk(&["create", "-q", "-f", "raw", s(&raw), "10M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 10 << 20);
}

/// Images written by qemu-io in many shapes; xdisk convert -O raw must equal qemu-img's.
#[test]
fn convert_reads_qemu_images_byte_identically() {
    let d = tmp("xdisk-cli-");
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x12 5M 1M",
            s(&base),
        ],
    );
    let mut images: Vec<PathBuf> = vec![];
    for (i, o) in [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536,refcount_bits=64",
        "cluster_size=2M",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("img{i}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                o,
                "-b",
                s(&base),
                "-F",
                "qcow2",
                s(&p),
            ],
        );
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x21 100k 300k",
                "-c",
                "write -z 1M 512k",
                "-c",
                "discard 2M 256k",
                "-c",
                "write -P 0x22 7M 1000k",
                s(&p),
            ],
        );
        images.push(p);
    }
    // Compressed, zlib and zstd.
    for ct in ["zlib", "zstd"] {
        let p = d.path().join(format!("c-{ct}.qcow2"));
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                s(&base),
                s(&p),
            ],
        );
        images.push(p);
    }
    for img in &images {
        let ours = d.path().join("ours.raw");
        let theirs = d.path().join("theirs.raw");
        // The format is given: a probed image does not open its backing file.
        xdisk(&["convert", "-f", "qcow2", "-O", "raw", s(img), s(&ours)]);
        ok("qemu-img", &["convert", "-O", "raw", s(img), s(&theirs)]);
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{} reads differently",
            img.display()
        );
        // And to qcow2: qemu-img check clean, qemu-img compare identical.
        let q = d.path().join("ours.qcow2");
        let _ = std::fs::remove_file(&q);
        xdisk(&["convert", "-f", "qcow2", "-O", "qcow2", s(img), s(&q)]);
        ok("qemu-img", &["check", s(&q)]);
        ok("qemu-img", &["compare", s(img), s(&q)]);
    }
}

/// Expands a map (list of runs) into per-4k-block (present, zero, data, depth) tuples.
fn blocks(map: &Value, size: u64) -> Vec<(bool, bool, bool, u64)> {
    let mut out = vec![(false, false, false, 0); (size / 4096) as usize];
    for r in map.as_array().unwrap() {
        let start = r["start"].as_u64().unwrap();
        let len = r["length"].as_u64().unwrap();
        for b in start / 4096..(start + len) / 4096 {
            out[b as usize] = (
                r["present"].as_bool().unwrap(),
                r["zero"].as_bool().unwrap(),
                r["data"].as_bool().unwrap(),
                r["depth"].as_u64().unwrap(),
            );
        }
    }
    out
}

#[test]
fn map_agrees_with_qemu_img_map() {
    let d = tmp("xdisk-cli-");
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&base),
            "4M",
        ],
    );
    ok("qemu-io", &["-c", "write -P 1 0 1M", s(&base)]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    ok(
        "qemu-io",
        &["-c", "write -P 2 512k 1M", "-c", "write -z 2M 64k", s(&top)],
    );
    let ours = json(&xdisk(&["map", "-f", "qcow2", "--output=json", s(&top)]));
    let theirs = json(&ok("qemu-img", &["map", "--output=json", s(&top)]));
    assert_eq!(blocks(&ours, 4 << 20), blocks(&theirs, 4 << 20));
    let human = xdisk(&["map", "-f", "qcow2", s(&top)]);
    assert!(human.starts_with("Offset"), "{human}");
}

#[test]
fn check_resize_compare_exit_codes_like_qemu_img() {
    let d = tmp("xdisk-cli-");
    let a = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "16M"]);
    ok("qemu-io", &["-c", "write -P 7 1M 1M", s(&a)]);
    // check: clean image, human and JSON.
    let o = xdisk_out(&["check", s(&a)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found on the image."));
    let j = json(&xdisk(&["check", "--output=json", s(&a)]));
    // Like qemu-img, zero counters may be left out.
    assert_eq!(j["corruptions"].as_u64().unwrap_or(0), 0);
    assert_eq!(j["leaks"].as_u64().unwrap_or(0), 0);
    assert!(j["image-end-offset"].as_u64().unwrap() > 0);
    // resize grow and shrink.
    xdisk(&["resize", s(&a), "+16M"]);
    ok("qemu-img", &["check", s(&a)]);
    let v = json(&ok("qemu-img", &["info", "--output=json", s(&a)]));
    assert_eq!(v["virtual-size"], 32 << 20);
    assert_eq!(
        xdisk_out(&["resize", s(&a), "8M"]).status.code(),
        Some(1),
        "shrink needs --shrink"
    );
    xdisk(&["resize", "--shrink", s(&a), "8M"]);
    ok("qemu-img", &["check", s(&a)]);
    let v = json(&ok("qemu-img", &["info", "--output=json", s(&a)]));
    assert_eq!(v["virtual-size"], 8 << 20);
    ok("qemu-io", &["-c", "read -P 7 1M 1M", s(&a)]);
    // compare: identical, then different at a known offset.
    let b = d.path().join("b.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&a), s(&b)]);
    let o = xdisk_out(&["compare", s(&a), s(&b)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    ok("qemu-io", &["-f", "raw", "-c", "write -P 9 3m 512", s(&b)]);
    let o = xdisk_out(&["compare", s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(1));
    let q = run("qemu-img", &["compare", s(&a), s(&b)]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&q.stdout),
        "same message as qemu-img compare"
    );
    let o = xdisk_out(&["compare", s(&a), "/nonexistent"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bench_runs_like_qemu_img_bench() {
    let d = tmp("xdisk-cli-");
    let raw = d.path().join("b.raw");
    let q = d.path().join("b.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&q), "16M"]);
    for (img, fmt) in [(&raw, "raw"), (&q, "qcow2")] {
        for aio in ["io_uring", "native", "threads"] {
            for extra in [
                &["-w"][..],
                &[][..],
                &["-w", "--flush-interval=64", "-S", "1M"][..],
            ] {
                let mut a = vec![
                    "bench", "-f", fmt, "-t", "none", "-i", aio, "-c", "2000", "-d", "32",
                ];
                a.extend_from_slice(extra);
                a.push(s(img));
                let out = xdisk(&a);
                assert!(out.contains("Run completed in"), "{out}");
                assert!(out.starts_with("Sending 2000 "), "{out}");
            }
        }
    }
    ok("qemu-img", &["check", s(&q)]);
}

#[test]
fn hostile_or_missing_images_give_clear_errors() {
    let d = tmp("xdisk-cli-");
    let junk = d.path().join("junk.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 508]);
    std::fs::write(&junk, &bytes).unwrap();
    for args in [
        vec!["info", s(&junk)],
        vec!["map", s(&junk)],
        vec!["convert", "-O", "raw", s(&junk), "/dev/null"],
        vec!["info", "/nonexistent/image"],
    ] {
        let o = xdisk_out(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("xdisk: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A raw image with random, compressible (repeated text) and zero regions, and a tail that
/// is not cluster-aligned.
fn mixed_raw(path: &Path, size: usize) {
    let text = b"All work and no play makes Jack a dull boy. ";
    let mut v = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in v[..size / 4].iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> (i % 8)) as u8;
    }
    for (j, b) in v[size / 4..size * 3 / 4].iter_mut().enumerate() {
        *b = text[j % text.len()];
    }
    // Zeroes in [3/4, 7/8); a last piece of text up to the end.
    for (j, b) in v[size * 7 / 8..].iter_mut().enumerate() {
        *b = text[j % text.len()];
    }
    std::fs::write(path, v).unwrap();
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn convert_compressed_qemu_agrees() {
    let d = tmp("xdisk-cli-");
    let src = d.path().join("src.raw");
    mixed_raw(&src, (24 << 20) + 3 * 512);
    for cs in ["4k", "64k", "2M"] {
        for ty in ["zlib", "zstd"] {
            let what = format!("{cs} {ty}");
            let o = format!("cluster_size={cs},compression_type={ty}");
            let ours = d.path().join(format!("x-{cs}-{ty}.qcow2"));
            let plain = d.path().join(format!("p-{cs}-{ty}.qcow2"));
            xdisk(&["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&ours)]);
            xdisk(&["convert", "-O", "qcow2", "-o", &o, s(&src), s(&plain)]);
            ok("qemu-img", &["check", s(&ours)]);
            ok("qemu-img", &["compare", "-q", s(&src), s(&ours)]);
            xdisk(&["check", s(&ours)]);
            xdisk(&["compare", s(&src), s(&ours)]);
            // qemu-img sees compressed clusters: data without a host offset in the map, and
            // check counts them.
            let map = json(&ok("qemu-img", &["map", "--output=json", s(&ours)]));
            let compressed: u64 = map
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"] == true && e.get("offset").is_none())
                .map(|e| e["length"].as_u64().unwrap())
                .sum();
            assert!(
                compressed >= 12 << 20,
                "{what}: {compressed} bytes compressed"
            );
            let chk = json(&ok("qemu-img", &["check", "--output=json", s(&ours)]));
            assert!(chk["compressed-clusters"].as_u64().unwrap() > 0, "{what}");
            let info = json(&ok("qemu-img", &["info", "--output=json", s(&ours)]));
            assert_eq!(
                info["format-specific"]["data"]["compression-type"], ty,
                "{what}"
            );
            // The compressible half costs next to nothing.
            let (c, p) = (file_len(&ours), file_len(&plain));
            eprintln!("{what}: compressed {c} bytes, uncompressed {p} bytes");
            assert!(c * 10 < p * 6, "{what}: compressed {c}, uncompressed {p}");
            // Written over afterwards (copy-on-write from compressed clusters) by QEMU:
            // still clean and read the same by both.
            ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0x33 8M 100k", s(&ours)],
            );
            ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0x33 8M 100k", s(&plain)],
            );
            ok("qemu-img", &["check", s(&ours)]);
            xdisk(&["check", s(&ours)]);
            ok("qemu-img", &["compare", "-q", s(&plain), s(&ours)]);
            xdisk(&["compare", s(&plain), s(&ours)]);
            // QEMU's compressed output read by xdisk, and ours converted back by QEMU.
            let theirs = d.path().join(format!("q-{cs}-{ty}.qcow2"));
            ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &o,
                    s(&ours),
                    s(&theirs),
                ],
            );
            let again = d.path().join(format!("y-{cs}-{ty}.qcow2"));
            xdisk(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(&theirs),
                s(&again),
            ]);
            ok("qemu-img", &["check", s(&again)]);
            ok("qemu-img", &["compare", "-q", s(&plain), s(&again)]);
            for p in [&ours, &plain, &theirs, &again] {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    // -c needs a format that can hold compressed clusters.
    let o = xdisk_out(&[
        "convert",
        "-c",
        "-O",
        "raw",
        s(&src),
        s(&d.path().join("o.raw")),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Compression not supported for format 'raw'"),
        "{err}"
    );
}

/// `convert -m N`: threads each on their own 2 MiB chunk, in any order, must still produce
/// the source's bytes, clean qcow2 metadata, holes where the source has none (raw output),
/// and with -c compressed clusters made on several threads.
#[test]
fn convert_with_several_threads_is_byte_identical_and_checks_clean() {
    let d = tmp("xdisk-cli-");
    let src = d.path().join("src.qcow2");
    let srcs = s(&src);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            srcs,
            "67M",
        ],
    );
    let mut cmds = vec!["-f".to_string(), "qcow2".into()];
    // Data scattered over many chunks, some chunks empty, a partial last cluster.
    for i in 0..40u64 {
        let off = (i * 1637 * 1024) % (66 << 20);
        cmds.push("-c".into());
        cmds.push(format!("write -P {} {off} {}k", i + 1, 64 + (i % 5) * 300));
    }
    cmds.push("-c".into());
    cmds.push(format!("write -P 0xee {} 4k", (67 << 20) - 4096));
    cmds.push(srcs.into());
    let args: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ok("qemu-io", &args);
    for (fmt, extra) in [("raw", None), ("qcow2", None), ("qcow2", Some("-c"))] {
        let out = d.path().join(format!("out-{fmt}-{}", extra.is_some()));
        let outs = s(&out);
        let mut a = vec!["convert", "-m", "8", "-W", "-f", "qcow2", "-O", fmt];
        a.extend(extra);
        a.extend([srcs, outs]);
        xdisk(&a);
        ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", fmt, srcs, outs],
        );
        if fmt == "qcow2" {
            ok("qemu-img", &["check", "-f", "qcow2", outs]);
        } else {
            // Sparse: far less allocated than the virtual size.
            let used = std::fs::metadata(&out).map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            });
            assert!(used.unwrap() < 40 << 20);
        }
    }
}

/// `xdisk img map ... | head` closes the pipe early: the output is not wanted any more, so
/// xdisk ends quietly with SIGPIPE's status (as qemu-img, killed by the signal), never with
/// a panic's message and backtrace ("failed printing to stdout: Broken pipe").
#[test]
fn output_to_a_closed_pipe_ends_quietly_without_a_panic() {
    let dir = tmp("xdisk-epipe-");
    let img = dir.path().join("a.qcow2");
    let raw = dir.path().join("a.raw");
    xdisk(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    xdisk(&["create", "-q", "-f", "raw", s(&raw), "4M"]);
    let file = format!("--filename={}", s(&raw));
    for args in [
        vec!["img", "info", s(&img)],
        vec!["img", "map", "--output=json", s(&img)],
        vec![
            "bench",
            &file,
            "--bs=4k",
            "--number_ios=8",
            "--output-format=json",
        ],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // every write to stdout fails with EPIPE
        let out = Command::new(XDISK)
            .args(&args)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
    }
}
