//! qcow2 creation and check/repair, with qemu-img / qemu-io as the oracle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use xdisk_image::qcow2::check::{check, CheckReport, Repair};
use xdisk_image::qcow2::create::create;
use xdisk_image::qcow2::format::{refcount_get, refcount_set, Header};
use xdisk_image::raw::create as create_raw;
use xdisk_image::{CacheMode, Error, ImageFile};
use xdisk_image::{CompressionType, CreateOptions, Preallocation};

fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_img(args: &[&str]) -> String {
    let (rc, out, err) = run("qemu-img", args);
    assert_eq!(rc, 0, "qemu-img {args:?} failed: {out}{err}");
    out
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().unwrap();
    args.push(p);
    let (rc, out, err) = run("qemu-io", &args);
    assert_eq!(rc, 0, "qemu-io {args:?} failed: {out}{err}");
    assert!(
        !out.contains("Pattern verification failed") && !err.contains("failed"),
        "qemu-io {cmds:?}: {out}{err}"
    );
}

fn info(path: &Path) -> Value {
    let out = qemu_img(&["info", "--output=json", "-U", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// qemu-img check --output=json: (exit code, JSON).
fn qemu_check(path: &Path) -> (i32, Value) {
    let (rc, out, err) = run(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (rc, v)
}

fn xcheck(path: &Path, repair: Repair) -> CheckReport {
    let f = ImageFile::open(path, repair == Repair::None, CacheMode::WriteBack).unwrap();
    check(&f, repair).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_opts(o: &CreateOptions) -> String {
    let mut v = vec![
        format!("cluster_size={}", o.cluster_size),
        format!("compat={}", if o.version == 2 { "0.10" } else { "1.1" }),
        format!("refcount_bits={}", o.refcount_bits),
        format!("preallocation={}", o.preallocation),
    ];
    if o.version == 3 {
        v.push(format!(
            "lazy_refcounts={}",
            if o.lazy_refcounts { "on" } else { "off" }
        ));
        v.push(format!("compression_type={}", o.compression_type.as_str()));
    }
    v.join(",")
}

fn qemu_create(path: &Path, o: &CreateOptions) {
    let opts = qemu_opts(o);
    let size = o.size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if let Some(b) = &o.backing_file {
        args.extend(["-b", b, "-F", o.backing_format.as_deref().unwrap()]);
    }
    args.extend([s(path), &size]);
    qemu_img(&args);
}

/// The report must agree with qemu-img check's JSON on every counter.
fn assert_same_as_qemu(path: &Path) -> CheckReport {
    let (rc, q) = qemu_check(path);
    let r = xcheck(path, Repair::None);
    let get = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
    let ours = r.json();
    let our = |k: &str| ours.get(k).and_then(Value::as_u64).unwrap_or(0);
    for k in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "corruptions",
        "leaks",
        "check-errors",
    ] {
        assert_eq!(
            our(k),
            get(k),
            "{k} differs for {}: qemu {q}, ours {ours}, messages {:?}",
            path.display(),
            r.messages
        );
    }
    assert_eq!(r.exit_code(), rc, "exit code for {}", path.display());
    r
}

fn assert_clean(path: &Path) {
    let (rc, q) = qemu_check(path);
    assert_eq!(rc, 0, "qemu-img check {}: {q}", path.display());
    let r = xcheck(path, Repair::None);
    assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
}

#[test]
fn create_matches_qemu_img() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    let mut cases = Vec::new();
    for size in [0u64, 1000, 1 << 20, 1 << 30, 100 << 30] {
        for cluster_size in [512u64, 4096, 65536, 1 << 21] {
            cases.push(CreateOptions {
                size,
                cluster_size,
                ..Default::default()
            });
        }
    }
    for refcount_bits in [1u32, 2, 4, 8, 16, 32, 64] {
        for cluster_size in [512u64, 65536] {
            cases.push(CreateOptions {
                size: 5 << 30,
                cluster_size,
                refcount_bits,
                ..Default::default()
            });
        }
    }
    for version in [2u32, 3] {
        cases.push(CreateOptions {
            size: 10 << 20,
            version,
            backing_file: Some(s(&base).into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        });
        cases.push(CreateOptions {
            size: 10 << 20,
            version,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        });
    }
    cases.push(CreateOptions {
        size: 1 << 30,
        lazy_refcounts: true,
        ..Default::default()
    });
    cases.push(CreateOptions {
        size: 1 << 30,
        compression_type: CompressionType::Zstd,
        ..Default::default()
    });
    cases.push(CreateOptions {
        size: 1 << 30,
        compression_type: CompressionType::Zstd,
        lazy_refcounts: true,
        refcount_bits: 8,
        cluster_size: 4096,
        ..Default::default()
    });
    for preallocation in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        for (size, cluster_size, refcount_bits, version) in [
            (10u64 << 20, 65536u64, 16u32, 3u32),
            ((3 << 20) + 512, 512, 1, 3),
            (100 << 20, 4096, 64, 3),
            (20 << 20, 1 << 21, 16, 2),
        ] {
            cases.push(CreateOptions {
                size,
                cluster_size,
                refcount_bits,
                version,
                preallocation,
                ..Default::default()
            });
        }
    }
    // Large metadata preallocation: several L2 tables and refcount blocks.
    cases.push(CreateOptions {
        size: 8 << 30,
        preallocation: Preallocation::Metadata,
        ..Default::default()
    });
    cases.push(CreateOptions {
        size: 512 << 20,
        cluster_size: 4096,
        refcount_bits: 2,
        preallocation: Preallocation::Metadata,
        ..Default::default()
    });

    for (i, o) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("ours{i}.qcow2"));
        let theirs = dir.path().join(format!("theirs{i}.qcow2"));
        create(&ours, o).unwrap_or_else(|e| panic!("create {o:?}: {e}"));
        qemu_create(&theirs, o);
        let (rc, q) = qemu_check(&ours);
        assert_eq!(rc, 0, "qemu-img check of {o:?}: {q}");
        assert!(
            q.get("leaks").is_none() && q.get("corruptions").is_none(),
            "{q}"
        );
        let (a, b) = (info(&ours), info(&theirs));
        for k in [
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "format-specific",
        ] {
            assert_eq!(a.get(k), b.get(k), "{k} differs for {o:?}");
        }
        // Our check agrees with qemu-img on both images.
        assert_same_as_qemu(&ours);
        assert_same_as_qemu(&theirs);
        if o.preallocation == Preallocation::Off && o.size <= 1 << 30 {
            // Same layout: same file length.
            assert_eq!(
                std::fs::metadata(&ours).unwrap().len(),
                std::fs::metadata(&theirs).unwrap().len(),
                "file length for {o:?}"
            );
        }
        if o.preallocation != Preallocation::Off {
            let m = xcheck(&ours, Repair::None);
            assert_eq!(m.allocated_clusters, m.total_clusters, "{o:?}");
            assert_eq!(m.fragmented_clusters, 0, "{o:?}");
        }
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("x.qcow2");
    let d = |size| CreateOptions {
        size,
        ..Default::default()
    };
    let bad = [
        CreateOptions {
            cluster_size: 1000,
            ..d(1 << 20)
        },
        CreateOptions {
            cluster_size: 256,
            ..d(1 << 20)
        },
        CreateOptions {
            cluster_size: 4 << 20,
            ..d(1 << 20)
        },
        CreateOptions {
            refcount_bits: 3,
            ..d(1 << 20)
        },
        CreateOptions {
            refcount_bits: 128,
            ..d(1 << 20)
        },
        CreateOptions {
            refcount_bits: 0,
            ..d(1 << 20)
        },
        CreateOptions {
            version: 2,
            refcount_bits: 8,
            ..d(1 << 20)
        },
        CreateOptions {
            version: 2,
            lazy_refcounts: true,
            ..d(1 << 20)
        },
        CreateOptions {
            version: 2,
            compression_type: CompressionType::Zstd,
            ..d(1 << 20)
        },
        CreateOptions {
            version: 4,
            ..d(1 << 20)
        },
        // L1 table over 32 MiB.
        d(2 << 60),
        CreateOptions {
            cluster_size: 512,
            ..d(200 << 30)
        },
        d(u64::MAX),
        CreateOptions {
            backing_file: Some("b.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..d(0)
        },
        CreateOptions {
            backing_file: Some("b.qcow2".into()),
            ..d(1 << 20)
        },
        CreateOptions {
            backing_file: Some("b.qcow2".into()),
            backing_format: Some("qcow2".into()),
            preallocation: Preallocation::Metadata,
            ..d(1 << 20)
        },
    ];
    for o in bad {
        match create(&p, &o) {
            Err(Error::InvalidArgument(m)) => assert!(!m.is_empty()),
            r => panic!("{o:?} accepted: {r:?}"),
        }
        assert!(!p.exists(), "nothing created for {o:?}");
    }
    // Sizes are rounded up to 512 bytes like qemu-img does.
    create(&p, &d(1000)).unwrap();
    assert_eq!(info(&p)["virtual-size"], 1024);
    // The largest size with 2 MiB clusters (L1 table of exactly 32 MiB... minus one entry).
    create(
        &p,
        &CreateOptions {
            cluster_size: 1 << 21,
            ..d(1 << 60)
        },
    )
    .unwrap();
    assert_clean(&p);
}

#[test]
fn create_raw_like_qemu_img() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("x.raw");
    create_raw(&p, 1000, Preallocation::Off).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024);
    create_raw(&p, 10 << 20, Preallocation::Off).unwrap();
    let f = ImageFile::open(&p, true, CacheMode::WriteBack).unwrap();
    assert_eq!(f.len().unwrap(), 10 << 20);
    assert!(f.allocated_bytes().unwrap() < 1 << 20, "sparse");
    drop(f);
    for pre in [Preallocation::Falloc, Preallocation::Full] {
        create_raw(&p, 4 << 20, pre).unwrap();
        let f = ImageFile::open(&p, true, CacheMode::WriteBack).unwrap();
        assert_eq!(f.len().unwrap(), 4 << 20);
        assert!(f.allocated_bytes().unwrap() >= 4 << 20, "{pre:?} allocates");
    }
    assert!(matches!(
        create_raw(&p, 1 << 20, Preallocation::Metadata),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(info(&p)["format"], "raw");
}

#[test]
fn qemu_io_writes_into_created_images() {
    let dir = TempDir::new().unwrap();
    for (i, o) in [
        CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
        CreateOptions {
            size: 64 << 20,
            version: 2,
            cluster_size: 4096,
            ..Default::default()
        },
        CreateOptions {
            size: 64 << 20,
            refcount_bits: 1,
            cluster_size: 512,
            ..Default::default()
        },
        CreateOptions {
            size: 64 << 20,
            refcount_bits: 64,
            lazy_refcounts: true,
            compression_type: CompressionType::Zstd,
            ..Default::default()
        },
        CreateOptions {
            size: 16 << 20,
            preallocation: Preallocation::Metadata,
            ..Default::default()
        },
        CreateOptions {
            size: 16 << 20,
            preallocation: Preallocation::Full,
            cluster_size: 1 << 21,
            ..Default::default()
        },
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("img{i}.qcow2"));
        create(&p, o).unwrap();
        let last = format!("{}", o.size - (1 << 20));
        qemu_io(
            &p,
            &[
                "write -P 0xa5 0 1M",
                "write -P 0x5a 5M 100k",
                "write -z 8M 1M",
                &format!("write -P 0x11 {last} 1M"),
            ],
        );
        qemu_io(
            &p,
            &[
                "read -P 0xa5 0 1M",
                "read -P 0x5a 5M 100k",
                "read -P 0 8M 1M",
                &format!("read -P 0x11 {last} 1M"),
                "read -P 0 2M 1M",
            ],
        );
        assert_same_as_qemu(&p);
        assert_clean(&p);
    }
}

/// Makes images with qemu tools in all the interesting shapes.
fn qemu_made_images(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let raw = dir.join("data.raw");
    // Compressible but not trivial data, with holes.
    let mut data = vec![0u8; 6 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        if (i >> 16) % 3 != 1 {
            *b = ((i * 7 + i / 4099) % 251) as u8;
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for cs in [512u64, 4096, 65536, 1 << 21] {
        for rb in [1u32, 16, 64] {
            let p = dir.join(format!("w-{cs}-{rb}.qcow2"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs},refcount_bits={rb}"),
                s(&p),
                "32M",
            ]);
            qemu_io(
                &p,
                &[
                    "write -P 1 0 3M",
                    "write -P 2 10M 64k",
                    "write -P 3 1M 4k",
                    "discard 2M 512k",
                    "write -z 20M 1M",
                    "write -P 4 31M 1M",
                ],
            );
            out.push(p);
        }
    }
    for (ty, cs) in [
        ("zlib", 65536u64),
        ("zstd", 4096),
        ("zlib", 512),
        ("zlib", 1 << 21),
    ] {
        let p = dir.join(format!("c-{ty}-{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ty},cluster_size={cs}"),
            s(&raw),
            s(&p),
        ]);
        // Overwrite some compressed clusters.
        qemu_io(&p, &["write -P 9 0 128k"]);
        out.push(p);
    }
    // Internal snapshots: shared L2 tables and data, COW after the snapshot.
    let p = dir.join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    qemu_io(&p, &["write -P 1 0 2M", "write -P 2 8M 1M"]);
    qemu_img(&["snapshot", "-c", "s1", s(&p)]);
    qemu_io(&p, &["write -P 3 1M 64k", "write -P 4 12M 64k"]);
    qemu_img(&["snapshot", "-c", "s2", s(&p)]);
    qemu_io(&p, &["write -P 5 0 64k"]);
    qemu_img(&["snapshot", "-c", "s3", s(&p)]);
    qemu_img(&["snapshot", "-d", "s2", s(&p)]);
    out.push(p);
    // Snapshots with small clusters and narrow refcounts.
    let p = dir.join("snap-512.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=4",
        s(&p),
        "4M",
    ]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    for n in 0..4 {
        qemu_img(&["snapshot", "-c", &format!("s{n}"), s(&p)]);
        qemu_io(&p, &[&format!("write -P {} {}k 8k", n + 2, n * 100)]);
    }
    out.push(p);
    // Backing chain.
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&base, &["write -P 1 0 4M"]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 2 1M 64k", "write -z 2M 64k"]);
    out.push(base);
    out.push(top);
    // v2 image.
    let p = dir.join("v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&p),
        "8M",
    ]);
    qemu_io(&p, &["write -P 1 0 1M", "write -z 4M 64k"]);
    out.push(p);
    // Persistent bitmaps.
    let p = dir.join("bitmap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    qemu_img(&["bitmap", "--add", s(&p), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&p), "b1"]);
    out.push(p);
    // Preallocated by qemu-img.
    for pre in ["metadata", "falloc", "full"] {
        let p = dir.join(format!("pre-{pre}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("preallocation={pre}"),
            s(&p),
            "8M",
        ]);
        out.push(p);
    }
    out
}

#[test]
fn check_agrees_with_qemu_img_on_qemu_made_images() {
    let dir = TempDir::new().unwrap();
    for p in qemu_made_images(dir.path()) {
        let r = assert_same_as_qemu(&p);
        assert_eq!(r.exit_code(), 0, "{}: {:?}", p.display(), r.messages);
        assert!(r.messages.is_empty(), "{}: {:?}", p.display(), r.messages);
    }
}

/// Offset of the refcount entry of `cluster` (image with the block in reftable[0..]).
fn refcount_of(path: &Path, cluster: u64) -> (Header, u64) {
    let bytes = std::fs::read(path).unwrap();
    let h = Header::parse(&bytes[..bytes.len().min(1 << 21)], bytes.len() as u64).unwrap();
    let per = h.refcount_block_entries();
    let ti = (h.refcount_table_offset + cluster / per * 8) as usize;
    let block = u64::from_be_bytes(bytes[ti..ti + 8].try_into().unwrap()) & !0x1ff;
    (h, block)
}

fn set_refcount(path: &Path, cluster: u64, value: u64) -> u64 {
    let (h, block) = refcount_of(path, cluster);
    let mut bytes = std::fs::read(path).unwrap();
    let cs = h.cluster_size() as usize;
    let b = &mut bytes[block as usize..block as usize + cs];
    let idx = (cluster % h.refcount_block_entries()) as usize;
    let old = refcount_get(b, idx, h.refcount_order);
    refcount_set(b, idx, h.refcount_order, value);
    std::fs::write(path, bytes).unwrap();
    old
}

fn write_u64(path: &Path, off: u64, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &v.to_be_bytes(), off).unwrap();
}

fn read_u64(path: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// A 64 MiB image with data at 0..1M and 10M..10M+64k: clusters 0 header, 1 reftable,
/// 2 refblock, 3 L1, 4 L2, 5..20 and 21 data.
fn sample(dir: &Path, name: &str, opts: &CreateOptions) -> PathBuf {
    let p = dir.join(name);
    create(&p, opts).unwrap();
    qemu_io(&p, &["write -P 0x11 0 1M", "write -P 0x22 10M 64k"]);
    p
}

#[test]
fn leaks_are_reported_and_repaired() {
    let dir = TempDir::new().unwrap();
    for rb in [1u32, 4, 16, 64] {
        let o = CreateOptions {
            size: 64 << 20,
            refcount_bits: rb,
            ..Default::default()
        };
        let p = sample(dir.path(), &format!("leak{rb}.qcow2"), &o);
        let len = std::fs::metadata(&p).unwrap().len();
        // A leaked cluster past the data, inside the file.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len + 2 * 65536)
            .unwrap();
        let end = len.div_ceil(65536);
        set_refcount(&p, end, 1);
        if rb > 1 {
            // A data cluster with one reference too many.
            set_refcount(&p, 6, 2);
        }
        let r = assert_same_as_qemu(&p);
        assert_eq!(
            r.exit_code(),
            if rb > 1 { 2 } else { 3 },
            "{:?}",
            r.messages
        );
        assert_eq!(r.leaks, if rb > 1 { 2 } else { 1 });
        assert!(r
            .messages
            .iter()
            .any(|m| m == &format!("Leaked cluster {end} refcount=1 reference=0")));
        let fixed = xcheck(&p, Repair::Leaks);
        assert_eq!(fixed.leaks_fixed, r.leaks, "{:?}", fixed.messages);
        assert_eq!(fixed.leaks, 0);
        assert_eq!(fixed.corruptions, 0, "{:?}", fixed.messages);
        assert_eq!(fixed.exit_code(), 0);
        assert!(fixed.human().contains("The following inconsistencies"));
        assert_clean(&p);
        qemu_io(&p, &["read -P 0x11 0 1M", "read -P 0x22 10M 64k"]);
    }
}

#[test]
fn leak_only_image_exit_code_3_and_json() {
    let dir = TempDir::new().unwrap();
    let p = sample(
        dir.path(),
        "l.qcow2",
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len + 65536)
        .unwrap();
    set_refcount(&p, len / 65536, 5);
    let r = assert_same_as_qemu(&p);
    assert_eq!(r.exit_code(), 3);
    assert!(r
        .human()
        .contains("1 leaked clusters were found on the image.\nThis means waste of disk space"));
    let (_, q) = qemu_check(&p);
    let mut ours = r.json();
    // Same keys and values as qemu-img (filename aside).
    ours["filename"] = q["filename"].clone();
    assert_eq!(ours, q);
    // Repair through the same path qemu-img takes and compare the JSON after repair too.
    let q2 = dir.path().join("l2.qcow2");
    std::fs::copy(&p, &q2).unwrap();
    let (rc, out, _) = run(
        "qemu-img",
        &["check", "-r", "leaks", "--output=json", s(&q2)],
    );
    assert_eq!(rc, 0);
    let qj: Value = serde_json::from_str(&out).unwrap();
    let fixed = xcheck(&p, Repair::Leaks);
    let mut fj = fixed.json();
    fj["filename"] = qj["filename"].clone();
    assert_eq!(fj, qj);
}

#[test]
fn corruptions_are_reported_and_repaired() {
    let dir = TempDir::new().unwrap();
    for (i, o) in [
        CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
        CreateOptions {
            size: 64 << 20,
            version: 2,
            ..Default::default()
        },
        CreateOptions {
            size: 64 << 20,
            refcount_bits: 2,
            ..Default::default()
        },
    ]
    .iter()
    .enumerate()
    {
        // (a) A used cluster with refcount 0.
        let p = sample(dir.path(), &format!("rc{i}.qcow2"), o);
        set_refcount(&p, 6, 0);
        let r = assert_same_as_qemu(&p);
        assert_eq!(r.exit_code(), 2);
        assert!(r
            .messages
            .iter()
            .any(|m| m == "ERROR cluster 6 refcount=0 reference=1"));
        let fixed = xcheck(&p, Repair::All);
        assert!(fixed.corruptions_fixed > 0, "{:?}", fixed.messages);
        assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
        assert_clean(&p);
        qemu_io(&p, &["read -P 0x11 0 1M", "read -P 0x22 10M 64k"]);

        // (b) An L2 entry past the end of the file.
        let p = sample(dir.path(), &format!("eof{i}.qcow2"), o);
        let l2 = read_u64(&p, 3 * 65536) & 0x00ff_ffff_ffff_fe00;
        write_u64(&p, l2 + 8 * 40, (1 << 63) | (1000 << 16));
        let r = assert_same_as_qemu(&p);
        assert_eq!(r.exit_code(), 2);
        // -r leaks cannot fix it.
        let still = xcheck(&p, Repair::Leaks);
        assert_eq!(still.exit_code(), 2);
        let fixed = xcheck(&p, Repair::All);
        assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
        assert!(fixed.corruptions_fixed >= 1, "{:?}", fixed.messages);
        assert_clean(&p);
        qemu_io(
            &p,
            &[
                "read -P 0x11 0 1M",
                "read -P 0x22 10M 64k",
                "read -P 0 2560k 64k",
            ],
        );
        // The entry now reads as zeroes (v3: zero flag; v2: unallocated).
        let e = read_u64(&p, l2 + 8 * 40);
        assert_eq!(e, if o.version == 3 { 1 } else { 0 });

        // (c) Both at once, plus a refcount block pointer with reserved bits and a wrong
        //     COPIED flag.
        let p = sample(dir.path(), &format!("multi{i}.qcow2"), o);
        set_refcount(&p, 7, 0);
        write_u64(&p, l2 + 8 * 41, (1 << 63) | (1u64 << 40));
        let e = read_u64(&p, l2 + 8 * 3);
        write_u64(&p, l2 + 8 * 3, e & !(1 << 63));
        let r = assert_same_as_qemu(&p);
        assert_eq!(r.exit_code(), 2);
        let fixed = xcheck(&p, Repair::All);
        assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
        assert_clean(&p);
        qemu_io(&p, &["read -P 0x11 0 1M", "read -P 0x22 10M 64k"]);
    }
}

#[test]
fn broken_refcount_table_is_rebuilt() {
    let dir = TempDir::new().unwrap();
    let p = sample(
        dir.path(),
        "rt.qcow2",
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    // Refcount table entry 0 unaligned and with reserved bits: every refcount reads as 0.
    write_u64(&p, 65536, 2 * 65536 + 0x1234);
    let r = xcheck(&p, Repair::None);
    assert_eq!(r.exit_code(), 2);
    // qemu-img cannot even read the refcounts (check errors, exit 1); we count the
    // refcounts as 0 (corruptions) and can rebuild them.
    let (rc, _) = qemu_check(&p);
    assert_ne!(rc, 0);
    let fixed = xcheck(&p, Repair::All);
    assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
    assert_clean(&p);
    qemu_io(
        &p,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 10M 64k",
            "write -P 7 30M 1M",
        ],
    );
    assert_clean(&p);

    // A refcount block outside the file.
    let p = sample(
        dir.path(),
        "rb.qcow2",
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    write_u64(&p, 65536, 1 << 40);
    assert_eq!(xcheck(&p, Repair::None).exit_code(), 2);
    let fixed = xcheck(&p, Repair::All);
    assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
    assert_clean(&p);
}

#[test]
fn dirty_lazy_refcount_image_is_cleaned() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("dirty.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 64 << 20,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    // Kill qemu-io after a write: the image stays dirty with stale refcounts.
    let (_, _, _) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 0 256k",
            "-c",
            "sigraise 9",
            s(&p),
        ],
    );
    assert_eq!(info(&p)["dirty-flag"], true);
    let r = assert_same_as_qemu(&p);
    assert_eq!(r.exit_code(), 2);
    // -r leaks cannot clean it.
    let r = xcheck(&p, Repair::Leaks);
    assert_eq!(r.exit_code(), 2);
    assert_eq!(info(&p)["dirty-flag"], true);
    let fixed = xcheck(&p, Repair::All);
    assert_eq!(fixed.exit_code(), 0, "{:?}", fixed.messages);
    assert_eq!(fixed.corruptions_fixed, 4);
    assert_eq!(info(&p)["dirty-flag"], false);
    assert_clean(&p);
    qemu_io(&p, &["read -P 0x33 0 256k"]);

    // A dirty bit alone (consistent refcounts) is cleared too.
    let p = sample(
        dir.path(),
        "d2.qcow2",
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    let inc = read_u64(&p, 72);
    write_u64(&p, 72, inc | 1);
    assert_eq!(info(&p)["dirty-flag"], true);
    assert_eq!(xcheck(&p, Repair::None).exit_code(), 0);
    xcheck(&p, Repair::All);
    assert_eq!(info(&p)["dirty-flag"], false);
}

#[test]
fn corrupted_qemu_images_with_snapshots_and_compression_repair() {
    let dir = TempDir::new().unwrap();
    let images = qemu_made_images(dir.path());
    for p in images {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.starts_with("snap") || name.starts_with("c-")) {
            continue;
        }
        // Zero the refcount of every cluster up to 16: lots of errors.
        let bytes = std::fs::read(&p).unwrap();
        let h = Header::parse(&bytes[..bytes.len().min(1 << 21)], bytes.len() as u64).unwrap();
        let n = (bytes.len() as u64 / h.cluster_size()).min(16);
        for c in 1..n {
            set_refcount(&p, c, 0);
        }
        let r = assert_same_as_qemu(&p);
        assert_eq!(r.exit_code(), 2, "{name}");
        let fixed = xcheck(&p, Repair::All);
        assert_eq!(fixed.exit_code(), 0, "{name}: {:?}", fixed.messages);
        assert_clean(&p);
        let (rc, out, err) = run("qemu-img", &["snapshot", "-l", s(&p)]);
        assert_eq!(rc, 0, "{out}{err}");
    }
}

#[test]
fn hostile_images_do_not_panic() {
    let dir = TempDir::new().unwrap();
    let p = sample(
        dir.path(),
        "h.qcow2",
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    );
    let good = std::fs::read(&p).unwrap();
    let q = dir.path().join("x.qcow2");
    let try_check = |bytes: &[u8]| {
        std::fs::write(&q, bytes).unwrap();
        let f = ImageFile::open(&q, false, CacheMode::WriteBack).unwrap();
        let t = Instant::now();
        let _ = check(&f, Repair::None);
        let _ = check(&f, Repair::All);
        let _ = check(&f, Repair::None);
        assert!(t.elapsed() < Duration::from_secs(20));
    };
    // Truncations.
    for len in [
        0usize,
        10,
        71,
        72,
        104,
        4096,
        65536,
        65540,
        3 * 65536,
        4 * 65536 + 17,
    ] {
        try_check(&good[..len.min(good.len())]);
    }
    // Garbage in each metadata cluster.
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for cluster in 1..5usize {
        for _ in 0..3 {
            let mut b = good.clone();
            for i in (cluster * 65536..(cluster + 1) * 65536).step_by(8) {
                b[i..i + 8].copy_from_slice(&next().to_be_bytes());
            }
            try_check(&b);
        }
    }
    // Huge l1_size (refused by the header parser), huge snapshot count, hostile offsets.
    for (off, val) in [
        (36usize, vec![0xff, 0xff, 0xff, 0xff]),
        (36, 4_000_000u32.to_be_bytes().to_vec()),
        (60, 65536u32.to_be_bytes().to_vec()),
        (56, 1000u32.to_be_bytes().to_vec()),
    ] {
        let mut b = good.clone();
        b[off..off + val.len()].copy_from_slice(&val);
        try_check(&b);
    }
    // Every L1 entry pointing at the same L2 table; every L2 entry at the same cluster.
    let mut b = good.clone();
    b[36..40].copy_from_slice(&8192u32.to_be_bytes());
    b.resize(b.len().max(3 * 65536 + 8192 * 8), 0);
    for i in 0..8192 {
        b[3 * 65536 + i * 8..3 * 65536 + i * 8 + 8]
            .copy_from_slice(&((1u64 << 63) | (4 * 65536)).to_be_bytes());
    }
    for i in 0..8192 {
        b[4 * 65536 + i * 8..4 * 65536 + i * 8 + 8]
            .copy_from_slice(&((1u64 << 63) | (5 * 65536)).to_be_bytes());
    }
    std::fs::write(&q, &b).unwrap();
    let f = ImageFile::open(&q, true, CacheMode::WriteBack).unwrap();
    let r = check(&f, Repair::None).unwrap();
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn huge_sparse_files_are_bounded() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("big.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 1 << 30,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    qemu_io(&p, &["write -P 1 0 64k"]);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // 2^31 clusters of 512 bytes: qemu-img refuses ("File too large"); we check it quickly.
    f.set_len(1 << 40).unwrap();
    let t = Instant::now();
    let r = xcheck(&p, Repair::None);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    assert!(r.image_end_offset <= len.next_multiple_of(512));
    // Over 2^32 clusters: refused as a check error (exit code 1), like qemu-img.
    f.set_len(3 << 40).unwrap();
    let r = xcheck(&p, Repair::All);
    assert_eq!(r.exit_code(), 1, "{:?}", r.messages);
    assert_eq!(r.check_errors, 1);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// A small image with 512-byte clusters, compressed clusters and a snapshot (its bytes:
    /// a static TempDir would never be removed).
    fn base_image() -> &'static Vec<u8> {
        static IMG: OnceLock<Vec<u8>> = OnceLock::new();
        IMG.get_or_init(|| {
            let dir = TempDir::new().unwrap();
            let raw = dir.path().join("d.raw");
            let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 13) as u8).collect();
            std::fs::write(&raw, data).unwrap();
            let p = dir.path().join("small.qcow2");
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                s(&raw),
                s(&p),
            ]);
            qemu_io(&p, &["write -P 1 0 8k"]);
            qemu_img(&["snapshot", "-c", "s", s(&p)]);
            qemu_io(&p, &["write -P 2 4k 8k"]);
            std::fs::read(&p).unwrap()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn mutated_images_never_panic(
            muts in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..16),
            repair in 0u8..3,
        ) {
            let dir = TempDir::new().unwrap();
            let mut b = base_image().clone();
            for (i, v) in &muts {
                let at = i.index(b.len());
                b[at] = *v;
            }
            let p = dir.path().join("m.qcow2");
            std::fs::write(&p, &b).unwrap();
            let f = ImageFile::open(&p, false, CacheMode::WriteBack).unwrap();
            let t = Instant::now();
            let repair = [Repair::None, Repair::Leaks, Repair::All][repair as usize];
            let _ = check(&f, repair);
            let _ = check(&f, Repair::None);
            prop_assert!(t.elapsed() < Duration::from_secs(10));
        }
    }
}

/// Random damage to small images, repaired by us: whenever we call the result clean,
/// qemu-img check must agree.
#[test]
fn repaired_images_pass_qemu_img_check() {
    let dir = TempDir::new().unwrap();
    let raw = dir.path().join("d.raw");
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 13) as u8).collect();
    std::fs::write(&raw, data).unwrap();
    let mut bases = Vec::new();
    for (name, opts) in [
        ("c512", "cluster_size=512"),
        ("c4k-rb8", "cluster_size=4096,refcount_bits=8"),
        ("c64k-v2", "compat=0.10"),
    ] {
        let p = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&raw),
            s(&p),
        ]);
        qemu_io(&p, &["write -P 1 0 8k", "write -P 3 100k 64k"]);
        qemu_img(&["snapshot", "-c", "s", s(&p)]);
        qemu_io(&p, &["write -P 2 4k 8k"]);
        if !opts.contains("compat") {
            qemu_img(&["bitmap", "--add", s(&p), "b0"]);
        }
        bases.push(std::fs::read(&p).unwrap());
    }
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let q = dir.path().join("m.qcow2");
    let mut clean = 0;
    for case in 0..300 {
        let bytes = &bases[case % bases.len()];
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 12 {
            // Half of the damage goes to the first clusters, where most metadata is.
            let lim = if next() % 2 == 0 {
                16384
            } else {
                b.len() as u64
            };
            let at = (next() % lim) as usize;
            b[at] = next() as u8;
        }
        std::fs::write(&q, &b).unwrap();
        let repair = if case % 4 == 0 {
            Repair::Leaks
        } else {
            Repair::All
        };
        let f = ImageFile::open(&q, false, CacheMode::WriteBack).unwrap();
        let Ok(r) = check(&f, repair) else {
            continue;
        };
        drop(f);
        if r.exit_code() != 0 {
            continue;
        }
        clean += 1;
        let (rc, out, err) = run("qemu-img", &["check", s(&q)]);
        assert!(
            rc == 0 || (rc == 1 && err.contains("Could not open")),
            "case {case} ({repair:?}): we call it clean, qemu-img check says {rc}: {out}{err}\n\
             our messages: {:?}",
            r.messages
        );
    }
    assert!(clean > 100, "{clean}");
}
