//! Property tests: random read/write/discard/write-zeroes/flush/reopen sequences on raw and
//! qcow2 images (with and without a backing file; on files and on Ceph RBD images) behave
//! like an in-memory disk; qcow2 images stay clean for `qemu-img check` and read the same
//! through qemu-img.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use xdisk_image::{CacheMode, CreateOptions, DiskSource, Format, Image, OpenOptions};
use xdisk_rbd::testing::{cluster, rbd_ok, TestImage};

mod support;
use support::{open, qemu_img, qemu_read_all};

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Read { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Flush,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Byte-granular offsets and lengths (unaligned on purpose), up to 300 KiB.
    (0..SIZE - 1).prop_flat_map(|off| {
        let max = (SIZE - off).min(300 << 10);
        (Just(off), 1..=max)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ ((off + i) as u8).wrapping_mul(31))
        .collect()
}

/// Runs ops against the image that `open` opens (already created) and the model.
fn run(
    open: &dyn Fn(CacheMode) -> Arc<Image>,
    model: &mut [u8],
    ops: &[Op],
    cache: CacheMode,
    discard_zeroes: bool,
    backing: Option<&[u8]>,
) {
    let mut img = open(cache);
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, off, len);
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf[..] == model[off as usize..(off + len) as usize],
                    "read {off}+{len} differs from the model"
                );
            }
            Op::Discard { off, len } => {
                img.discard(off, len).unwrap();
                if discard_zeroes {
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    // Discarded data may read as zeroes, as before, or (no zero clusters in
                    // qcow2 v2) from the backing file: resync the model.
                    let mut buf = vec![0u8; len as usize];
                    img.read_at(&mut buf, off).unwrap();
                    for (i, &b) in buf.iter().enumerate() {
                        let at = off as usize + i;
                        let from_backing = backing.is_some_and(|bk| bk[at] == b);
                        assert!(
                            b == 0 || b == model[at] || from_backing,
                            "discard produced garbage at {at}"
                        );
                        model[at] = b;
                    }
                }
            }
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                img.close().unwrap();
                drop(img);
                img = open(cache);
            }
        }
    }
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);
    // The whole image, read back fresh.
    let img = open(CacheMode::WriteBack);
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "whole image differs from the model after reopen"
    );
}

fn qemu_agrees(path: &Path, model: &[u8], dir: &Path) {
    let chk = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(
        chk.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    assert!(
        qemu_read_all(path, dir) == model,
        "qemu-img reads what the model says"
    );
}

fn tmp() -> tempfile::TempDir {
    support::tmpdir("xdisk-model-")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn model_raw(ops in prop::collection::vec(op(), 1..40), direct in any::<bool>()) {
        let d = tmp();
        let p = d.path().join("d.raw");
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let cache = if direct { CacheMode::None } else { CacheMode::WriteBack };
        run(&|c| open(&p, c), &mut model, &ops, cache, true, None);
    }

    #[test]
    fn model_qcow2(
        ops in prop::collection::vec(op(), 1..40),
        cluster_bits in prop::sample::select(vec![9u32, 12, 16]),
        v2 in any::<bool>(),
        refcount_bits in prop::sample::select(vec![1u32, 16, 64]),
    ) {
        let d = tmp();
        let p = d.path().join("d.qcow2");
        let compat = if v2 { "0.10" } else { "1.1" };
        let refcount_bits = if v2 { 16 } else { refcount_bits };
        let o = format!("cluster_size={},compat={compat},refcount_bits={refcount_bits}", 1u64 << cluster_bits);
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p.to_str().unwrap(), &SIZE.to_string()]).status.success());
        let mut model = vec![0u8; SIZE as usize];
        run(&|c| open(&p, c), &mut model, &ops, CacheMode::None, true, None);
        qemu_agrees(&p, &model, d.path());
    }

    #[test]
    fn model_qcow2_with_backing(
        ops in prop::collection::vec(op(), 1..40),
        raw_backing in any::<bool>(),
        v2 in any::<bool>(),
    ) {
        let d = tmp();
        let base = d.path().join("base");
        let p = d.path().join("top.qcow2");
        let mut model = pattern(0x5a, 0, SIZE);
        if raw_backing {
            std::fs::write(&base, &model).unwrap();
        } else {
            let r = d.path().join("base.raw");
            std::fs::write(&r, &model).unwrap();
            assert!(qemu_img(&["convert", "-O", "qcow2", r.to_str().unwrap(), base.to_str().unwrap()]).status.success());
        }
        let compat = if v2 { "0.10" } else { "1.1" };
        let bfmt = if raw_backing { "raw" } else { "qcow2" };
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size=4096,compat={compat}"),
            "-b", base.to_str().unwrap(), "-F", bfmt, p.to_str().unwrap()]).status.success());
        // v2 images have no zero flag: a discard may leave the backing data visible.
        let backing = model.clone();
        run(&|c| open(&p, c), &mut model, &ops, CacheMode::None, !v2, Some(&backing));
        qemu_agrees(&p, &model, d.path());
    }
}

/// The same model on a Ceph RBD image (raw, or a qcow2 image stored in RBD) made by
/// `DiskSource::create`, with `rbd export` and qemu-img reading `rbd:` as the oracles.
fn model_on_rbd(ops: &[Op], qcow2: bool, cluster_size: u64, direct: bool) {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "model");
    let name = t.name();
    let format = if qcow2 { Format::Qcow2 } else { Format::Raw };
    let src = DiskSource::parse(&name, Some(format)).unwrap();
    let opts = CreateOptions {
        size: SIZE,
        cluster_size,
        ..CreateOptions::default()
    };
    src.create(format, &opts).unwrap();
    let open = |cache| {
        src.open(&OpenOptions {
            format: Some(format),
            cache,
            ..OpenOptions::default()
        })
        .unwrap()
    };
    let mut model = vec![0u8; SIZE as usize];
    let cache = if direct {
        CacheMode::None
    } else {
        CacheMode::WriteBack
    };
    // RBD discards may leave data (partial objects are skipped); qcow2 v3 zeroes clusters.
    run(&open, &mut model, ops, cache, qcow2, None);
    let d = tmp();
    if qcow2 {
        qemu_agrees(Path::new(&name), &model, d.path());
    } else {
        let exported = rbd_ok(conf, &["export", "--no-progress", &t.spec(), "-"]).stdout;
        assert!(exported == model, "rbd export reads what the model says");
        assert!(
            qemu_read_all(Path::new(&name), d.path()) == model,
            "qemu-img reads what the model says"
        );
    }
}

/// The same model on a raw RBD image with librbd's LUKS encryption (`encrypt.format=luks` with
/// a key file in the name), zeroed first (the unwritten parts of an object written in part
/// read as noise there, not zeroes); QEMU's rbd driver with its `encrypt.*` options reads
/// what the model says, and Ceph stores none of the written data as it was written.
fn model_on_encrypted_rbd(ops: &[Op], direct: bool) {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let key = d.path().join("key");
    std::fs::write(&key, "model passphrase").unwrap();
    let t = TestImage::new(conf, "modelenc");
    let name = t.name_with(&format!(
        ":encrypt.format=luks:encrypt.key-file={}",
        key.display()
    ));
    let src = DiskSource::parse(&name, Some(Format::Raw)).unwrap();
    let opts = CreateOptions {
        size: SIZE,
        ..CreateOptions::default()
    };
    src.create(Format::Raw, &opts).unwrap();
    let open = |cache| {
        src.open(&OpenOptions {
            format: Some(Format::Raw),
            cache,
            ..OpenOptions::default()
        })
        .unwrap()
    };
    {
        let img = open(CacheMode::WriteBack);
        assert_eq!(img.size(), SIZE);
        img.write_at(&vec![0u8; SIZE as usize], 0).unwrap();
        img.close().unwrap();
    }
    let mut model = vec![0u8; SIZE as usize];
    let cache = if direct {
        CacheMode::None
    } else {
        CacheMode::WriteBack
    };
    run(&open, &mut model, ops, cache, false, None);
    let out = d.path().join("qemu.raw");
    let qemu = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            "--object",
            &format!("secret,id=sec0,file={}", key.display()),
            "--image-opts",
            &format!(
                "driver=rbd,pool={},image={},conf={},encrypt.format=luks,encrypt.key-secret=sec0",
                xdisk_rbd::testing::POOL,
                t.image,
                t.conf.display()
            ),
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        qemu.status.success(),
        "{}",
        String::from_utf8_lossy(&qemu.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == model,
        "QEMU's rbd driver with encrypt.* reads what the model says"
    );
    let stored = rbd_ok(conf, &["export", "--no-progress", &t.spec(), "-"]).stdout;
    for op in ops {
        if let Op::Write { off, len, seed } = *op {
            let data = pattern(seed, off, len.min(512));
            if data.len() >= 64 && data.iter().any(|&b| b != 0) {
                assert!(
                    !stored.windows(data.len()).any(|w| w == data),
                    "written data stored as plaintext"
                );
            }
        }
    }
}

proptest! {
    // Each case talks to the cluster: a few suffice next to the file cases above.
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    #[test]
    fn model_rbd_raw(ops in prop::collection::vec(op(), 1..40), direct in any::<bool>()) {
        model_on_rbd(&ops, false, 65536, direct);
    }

    #[test]
    fn model_encrypted_rbd_raw(ops in prop::collection::vec(op(), 1..30), direct in any::<bool>()) {
        model_on_encrypted_rbd(&ops, direct);
    }

    #[test]
    fn model_rbd_qcow2(
        ops in prop::collection::vec(op(), 1..40),
        cluster_size in prop::sample::select(vec![4096u64, 65536]),
        direct in any::<bool>(),
    ) {
        model_on_rbd(&ops, true, cluster_size, direct);
    }
}
