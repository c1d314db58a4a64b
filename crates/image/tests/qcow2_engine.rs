//! qcow2 engine tests with QEMU as the oracle: images are made by `qemu-img`/`qemu-io`,
//! read and written by xdisk, and checked with `qemu-img check` / `compare` / `convert`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xdisk_image::{CacheMode, Error, Extent, Image, LayerStatus, Mapping, OpenOptions};

// ---- helpers ---------------------------------------------------------------------------

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xdisk-qcow2-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run_status(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed:\n{out}\n{err}");
    out
}

fn qimg(args: &[&str]) -> String {
    run("qemu-img", args)
}

fn qio(img: &Path, cmds: &[String]) {
    let mut a: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    let p = img.to_str().unwrap();
    a.push(p);
    run("qemu-io", &a);
}

fn create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    let ps = p.to_str().unwrap().to_string();
    let ss = size.to_string();
    args.push(&ps);
    args.push(&ss);
    qimg(&args);
    p
}

/// The guest contents as QEMU reads them.
fn raw_of(img: &Path) -> Vec<u8> {
    let out = img.with_extension("oracle.raw");
    qimg(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn opts(cache: CacheMode, read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache,
        ..OpenOptions::default()
    }
}

/// The format of a test image, as the operator would give it.
fn format_of(img: &Path) -> xdisk_image::Format {
    let mut head = [0u8; 4];
    let f = std::fs::File::open(img).unwrap();
    if f.read_at(&mut head, 0).unwrap_or(0) == 4 && head == *b"QFI\xfb" {
        xdisk_image::Format::Qcow2
    } else {
        xdisk_image::Format::Raw
    }
}

/// Opens with the format given (a probed image does not open its backing file).
fn open(img: &Path, cache: CacheMode, read_only: bool) -> Arc<Image> {
    let o = OpenOptions {
        format: Some(format_of(img)),
        ..opts(cache, read_only)
    };
    Image::open(img, &o).unwrap()
}

fn qcow2(img: &Image) -> &xdisk_image::qcow2::Qcow2Image {
    img.as_qcow2().expect("a qcow2 image")
}

/// Reads the whole image through xdisk, in unevenly sized pieces.
fn read_all(img: &Image) -> Vec<u8> {
    let size = img.size() as usize;
    let mut v = vec![0u8; size];
    let mut pos = 0usize;
    let mut step = 1usize << 20;
    while pos < size {
        let n = step.min(size - pos);
        img.read_at(&mut v[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = if step == 1 << 20 { 777_777 } else { 1 << 20 };
    }
    v
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
}

#[derive(Debug, Default)]
struct CheckResult {
    code: i32,
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    #[allow(dead_code)] // shown by Debug in failures
    text: String,
}

fn qcheck(img: &Path) -> CheckResult {
    let (code, out, err) = run_status(
        "qemu-img",
        &["check", "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    CheckResult {
        code,
        corruptions: get("corruptions"),
        leaks: get("leaks"),
        check_errors: get("check-errors"),
        text: format!("{out}\n{err}"),
    }
}

/// `qemu-img check` finds nothing at all.
fn check_clean(img: &Path) {
    let r = qcheck(img);
    assert!(
        r.code == 0 && r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
        "qemu-img check {}: {r:?}",
        img.display()
    );
}

/// `qemu-img check` finds no corruption (leaks allowed: after crashes).
fn check_consistent(img: &Path) {
    let r = qcheck(img);
    assert!(
        (r.code == 0 || r.code == 3) && r.corruptions == 0 && r.check_errors == 0,
        "qemu-img check {}: {r:?}",
        img.display()
    );
}

/// `qemu-img compare` of the image against the expected guest contents.
fn compare_with(img: &Path, want: &[u8]) {
    let model = img.with_extension("model.raw");
    std::fs::write(&model, want).unwrap();
    let (code, out, err) = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            model.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&model).unwrap();
    if code != 0 {
        // Find the first difference for the message.
        let got = raw_of(img);
        assert_same(&got, want, "qemu-img compare");
        panic!("qemu-img compare failed ({code}): {out} {err}");
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    // Random 4 KiB chunks alternating with runs, so compressors have something to do.
    for (n, chunk) in v.chunks_mut(4096).enumerate() {
        if n % 2 == 0 {
            r.fill(chunk);
        } else {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = (seed as u8).wrapping_add((i / 100) as u8);
            }
        }
    }
    v
}

/// Applies an operation to the in-memory model the way the engine defines it.
struct Model {
    data: Vec<u8>,
    /// Backing contents (zero-extended to the image size), if any.
    base: Option<Vec<u8>>,
    cs: u64,
    v3: bool,
}

impl Model {
    fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }
    fn discard(&mut self, off: u64, len: u64) {
        if self.v3 || self.base.is_none() {
            return self.zero(off, len);
        }
        // v2 with a backing file: whole clusters show the backing file again, partial
        // clusters are left alone.
        let size = self.data.len() as u64;
        let end = off + len;
        let first = off.next_multiple_of(self.cs);
        let full_end = if end == size {
            end.next_multiple_of(self.cs)
        } else {
            end / self.cs * self.cs
        };
        let base = self.base.as_ref().unwrap();
        let mut c = first;
        while c < full_end {
            let e = (c + self.cs).min(size);
            self.data[c as usize..e as usize].copy_from_slice(&base[c as usize..e as usize]);
            c += self.cs;
        }
    }
}

/// Random writes, discards and zeroes (seeded), mirrored in the model; some reads compared.
fn random_ops(img: &Image, m: &mut Model, seed: u64, n: usize) {
    let mut r = StdRng::seed_from_u64(seed);
    let size = img.size();
    let cs = m.cs;
    for i in 0..n {
        let aligned = r.gen_bool(0.3);
        let max_len = (cs * 3).min(size).max(1);
        let (off, len) = if aligned {
            let clusters = size / cs;
            let c = r.gen_range(0..clusters.max(1));
            let n = r.gen_range(1..=3u64).min(clusters - c).max(1);
            (c * cs, (n * cs).min(size - c * cs))
        } else {
            let off = r.gen_range(0..size);
            let len = r.gen_range(1..=max_len).min(size - off);
            (off, len)
        };
        match r.gen_range(0..10) {
            0..=5 => {
                let buf = pattern(seed * 1000 + i as u64, len as usize);
                img.write_at(&buf, off).unwrap();
                m.write(off, &buf);
            }
            6 => {
                img.discard(off, len).unwrap();
                m.discard(off, len);
            }
            7 | 8 => {
                let unmap = r.gen_bool(0.5);
                img.write_zeroes(off, len, unmap).unwrap();
                m.zero(off, len);
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off).unwrap();
                assert_same(
                    &buf,
                    &m.data[off as usize..(off + len) as usize],
                    &format!("read {off:#x}+{len:#x} after op {i}"),
                );
            }
        }
        if r.gen_range(0..20) == 0 {
            img.flush().unwrap();
        }
    }
}

const CACHES: [CacheMode; 2] = [CacheMode::None, CacheMode::WriteBack];

// ---- reading images QEMU wrote ---------------------------------------------------------

#[test]
fn reads_match_qemu_across_cluster_sizes_refcount_widths_and_versions() {
    let d = tmp();
    let cases: &[(u64, u32, &str)] = &[
        (512, 16, "0.10"),
        (512, 1, "1.1"),
        (4096, 2, "1.1"),
        (4096, 16, "0.10"),
        (65536, 4, "1.1"),
        (65536, 8, "1.1"),
        (65536, 16, "1.1"),
        (65536, 32, "1.1"),
        (65536, 64, "1.1"),
        (2 << 20, 16, "1.1"),
        (2 << 20, 16, "0.10"),
    ];
    for &(cs, rb, compat) in cases {
        let size = (cs * 16).max(4 << 20) + 1536;
        let name = format!("r-{cs}-{rb}-{compat}.qcow2");
        let img = create(
            d.path(),
            &name,
            size,
            &format!("cluster_size={cs},refcount_bits={rb},compat={compat}"),
        );
        qio(
            &img,
            &[
                format!("write -P 0x11 0 {}", cs * 3 / 2),
                format!("write -P 0x22 {} 5000", size / 2 - 700),
                format!("write -P 0x44 {} {}", cs * 4, cs * 3),
                format!("write -z {} {}", cs * 5, cs),
                format!("discard {} {}", cs * 4, cs),
                format!("write -P 0x33 {} 1000", size - 1000),
            ],
        );
        let want = raw_of(&img);
        for cache in CACHES {
            let x = open(&img, cache, true);
            assert_eq!(x.size(), size);
            assert_same(&read_all(&x), &want, &format!("{name} {cache:?}"));
        }
        check_clean(&img);
    }
}

#[test]
fn compressed_clusters_zlib_and_zstd() {
    let d = tmp();
    for (cs, ty) in [
        (4096u64, "zlib"),
        (65536, "zlib"),
        (65536, "zstd"),
        (2 << 20, "zstd"),
        (512, "zlib"),
    ] {
        let size = (cs * 8).max(1 << 20) + 4096;
        let raw = d.path().join("src.raw");
        let mut content = vec![0u8; size as usize];
        for (i, chunk) in content.chunks_mut(cs as usize).enumerate() {
            match i % 3 {
                0 => chunk.copy_from_slice(&pattern(i as u64 + cs, chunk.len())),
                1 => {
                    for (j, b) in chunk.iter_mut().enumerate() {
                        *b = (i + j / 100) as u8;
                    }
                }
                _ => {}
            }
        }
        std::fs::write(&raw, &content).unwrap();
        let img = d.path().join(format!("c-{cs}-{ty}.qcow2"));
        qimg(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs},compression_type={ty}"),
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let x = open(&img, CacheMode::None, true);
        assert_same(&read_all(&x), &content, &format!("compressed {cs} {ty}"));
        let mut pos = 0;
        let mut compressed = 0;
        while pos < size {
            let st = x.layer_status(pos, size - pos).unwrap();
            if matches!(
                st,
                LayerStatus::Data {
                    compressed: true,
                    ..
                }
            ) {
                compressed += 1;
            }
            pos += st.len();
        }
        assert!(compressed > 0, "no compressed clusters in {cs} {ty}");
        drop(x);
        // Overwrite parts of compressed clusters: copy-on-write from the decompressed data,
        // and the compressed clusters' host clusters are released.
        let x = open(&img, CacheMode::WriteBack, false);
        let mut m = Model {
            data: content.clone(),
            base: None,
            cs,
            v3: true,
        };
        random_ops(&x, &mut m, cs ^ 7, 60);
        x.close().unwrap();
        drop(x);
        check_clean(&img);
        compare_with(&img, &m.data);
    }
}

/// Random, compressible (repeated text) and zero clusters, plus an unaligned tail.
fn compressible_content(cs: u64, size: u64, seed: u64) -> Vec<u8> {
    let text = b"It was the best of times, it was the worst of times, it was the age of wisdom. ";
    let mut content = vec![0u8; size as usize];
    for (i, chunk) in content.chunks_mut(cs as usize).enumerate() {
        match i % 4 {
            0 => StdRng::seed_from_u64(seed + i as u64).fill(chunk),
            1 | 2 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text[(j + i) % text.len()];
                }
            }
            _ => {}
        }
    }
    content
}

/// Guest clusters that `qemu-img map` reports as compressed (data without a host offset).
fn qemu_compressed_bytes(img: &Path) -> u64 {
    let out = qimg(&["map", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e.get("offset").is_none())
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn compressed_writes_zlib_and_zstd() {
    let d = tmp();
    for (cs, ty, compat) in [
        (4096u64, "zlib", "1.1"),
        (4096, "zstd", "1.1"),
        (65536, "zlib", "1.1"),
        (65536, "zstd", "1.1"),
        (2 << 20, "zlib", "1.1"),
        (2 << 20, "zstd", "1.1"),
        (512, "zlib", "0.10"),
    ] {
        let what = format!("{cs} {ty} {compat}");
        let size = (cs * 24).max(3 << 20) + 1536;
        let content = compressible_content(cs, size, cs);
        let img = create(
            d.path(),
            &format!("w-{cs}-{ty}.qcow2"),
            size,
            &format!("cluster_size={cs},compression_type={ty},compat={compat}"),
        );
        let x = open(&img, CacheMode::None, false);
        let (mut packed, mut plain) = (0, 0);
        for (g, chunk) in content.chunks(cs as usize).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            if x.write_compressed_cluster(g as u64, chunk).unwrap() {
                packed += 1;
            } else {
                plain += 1;
            }
        }
        assert!(
            packed > 0 && plain > 0,
            "{what}: {packed} compressed, {plain} not"
        );
        // Already allocated: written uncompressed.
        assert!(!x
            .write_compressed_cluster(0, &content[..cs as usize])
            .unwrap());
        // Not a whole cluster, or past the end.
        assert!(x.write_compressed_cluster(1, &content[..100]).is_err());
        assert!(x
            .write_compressed_cluster(size.div_ceil(cs), &content[..cs as usize])
            .is_err());
        assert_same(&read_all(&x), &content, &what);
        x.close().unwrap();
        drop(x);
        check_clean(&img);
        compare_with(&img, &content);
        assert!(
            qemu_compressed_bytes(&img) >= packed * cs.min(size) - cs,
            "{what}: qemu-img map shows too few compressed clusters"
        );
        // Much smaller than the same data converted uncompressed, and about what QEMU's own
        // compressed conversion takes (zlib streams are a little larger: see compress.rs).
        let raw = d.path().join("content.raw");
        std::fs::write(&raw, &content).unwrap();
        let len_of = |c: bool| {
            let out = d.path().join("q.qcow2");
            let o = format!("cluster_size={cs},compression_type={ty},compat={compat}");
            let mut a = vec!["convert", "-O", "qcow2", "-o", &o];
            if c {
                a.push("-c");
            }
            a.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
            qimg(&a);
            std::fs::metadata(&out).unwrap().len()
        };
        let (plain_len, qemu_len) = (len_of(false), len_of(true));
        let file_len = std::fs::metadata(&img).unwrap().len();
        assert!(
            file_len < plain_len * 3 / 4 && file_len <= qemu_len + qemu_len / 5,
            "{what}: file {file_len}, uncompressed {plain_len}, qemu-img convert -c {qemu_len}"
        );
        let x = open(&img, CacheMode::WriteBack, true);
        assert_same(&read_all(&x), &content, &format!("{what} reopened"));
        drop(x);
        // Guest writes over compressed clusters (copy-on-write from the decompressed data).
        let x = open(&img, CacheMode::WriteBack, false);
        let mut m = Model {
            data: content.clone(),
            base: None,
            cs,
            v3: compat == "1.1",
        };
        random_ops(&x, &mut m, cs ^ 11, 60);
        x.close().unwrap();
        drop(x);
        check_clean(&img);
        compare_with(&img, &m.data);
        // QEMU writes over them too.
        qio(&img, &[format!("write -P 0x5a {} {}", cs + 512, 1024)]);
        m.data[(cs + 512) as usize..(cs + 1536) as usize].fill(0x5a);
        check_clean(&img);
        compare_with(&img, &m.data);
    }
}

/// Many tiny compressed streams packed into shared host clusters, then every second one
/// overwritten and the rest discarded: the shared clusters' refcounts must go down exactly.
#[test]
fn compressed_writes_shared_host_clusters_refcounts() {
    let d = tmp();
    let cs = 65536u64;
    let size = cs * 200;
    let img = create(d.path(), "shared.qcow2", size, "cluster_size=65536");
    let x = open(&img, CacheMode::WriteBack, false);
    let mut content = vec![0u8; size as usize];
    for (g, chunk) in content.chunks_mut(cs as usize).enumerate() {
        chunk.fill(g as u8 | 1);
        assert!(x.write_compressed_cluster(g as u64, chunk).unwrap());
    }
    x.close().unwrap();
    // 200 streams of a few hundred bytes: a handful of host clusters.
    let file_len = std::fs::metadata(&img).unwrap().len();
    assert!(file_len < 10 * cs, "file {file_len}");
    check_clean(&img);
    compare_with(&img, &content);
    for g in (0..200u64).step_by(2) {
        x.write_at(&[0xee; 4096], g * cs + 100).unwrap();
        content[(g * cs + 100) as usize..(g * cs + 4196) as usize].fill(0xee);
    }
    x.flush().unwrap();
    check_clean(&img);
    compare_with(&img, &content);
    x.discard(0, size).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    compare_with(&img, &vec![0u8; size as usize]);
    // Compressed again into the freed space.
    let x = open(&img, CacheMode::WriteBack, false);
    for g in 0..50u64 {
        let c = vec![g as u8 + 1; cs as usize];
        assert!(x.write_compressed_cluster(g, &c).unwrap());
        content[(g * cs) as usize..((g + 1) * cs) as usize].copy_from_slice(&c);
    }
    content[(50 * cs) as usize..].fill(0);
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    compare_with(&img, &content);
}

#[test]
fn backing_chains_read_and_copy_on_write() {
    let d = tmp();
    for (cs, compat, base_fmt) in [
        (65536u64, "1.1", "qcow2"),
        (4096, "1.1", "raw"),
        (512, "0.10", "qcow2"),
        (65536, "0.10", "raw"),
        (2 << 20, "1.1", "qcow2"),
    ] {
        let base_size = (3 << 20) + 512;
        let size = 5 << 20;
        let base = if base_fmt == "raw" {
            let p = d.path().join(format!("base-{cs}-{compat}.raw"));
            let mut content = vec![0u8; base_size as usize];
            content[..1 << 20].copy_from_slice(&pattern(1, 1 << 20));
            content[(2 << 20) + 100..(2 << 20) + 100 + 70000].fill(0x5a);
            std::fs::write(&p, &content).unwrap();
            p
        } else {
            let p = create(
                d.path(),
                &format!("base-{cs}-{compat}.qcow2"),
                base_size,
                &format!("cluster_size={cs},compat={compat}"),
            );
            qio(
                &p,
                &[
                    "write -P 0x61 0 1M".to_string(),
                    format!("write -P 0x62 {} 70000", (2 << 20) + 100),
                    format!("write -P 0x63 {} 512", base_size - 512),
                ],
            );
            p
        };
        let ov = d.path().join(format!("ov-{cs}-{compat}-{base_fmt}.qcow2"));
        qimg(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs},compat={compat}"),
            "-b",
            base.file_name().unwrap().to_str().unwrap(),
            "-F",
            base_fmt,
            ov.to_str().unwrap(),
            &size.to_string(),
        ]);
        qio(
            &ov,
            &[
                "write -P 0x71 4096 10000".to_string(),
                "write -P 0x72 3M 4096".to_string(),
            ],
        );
        let want = raw_of(&ov);
        let x = open(&ov, CacheMode::None, true);
        assert!(x.backing().is_some());
        assert_same(
            &read_all(&x),
            &want,
            &format!("overlay {cs} {compat} {base_fmt}"),
        );
        drop(x);

        // Writes: partial-cluster COW over the backing file, discards and zeroes.
        let mut basecontent = raw_of_any(&base, base_fmt);
        basecontent.resize(size as usize, 0);
        let mut m = Model {
            data: want.clone(),
            base: Some(basecontent),
            cs,
            v3: compat == "1.1",
        };
        let x = open(&ov, CacheMode::None, false);
        x.write_at(&[0xee; 100], 4096 * 7 + 3).unwrap();
        m.write(4096 * 7 + 3, &[0xee; 100]);
        random_ops(&x, &mut m, cs + 1, 80);
        assert_same(&read_all(&x), &m.data, "overlay after writes (xdisk)");
        x.close().unwrap();
        drop(x);
        check_clean(&ov);
        compare_with(&ov, &m.data);
    }
}

fn raw_of_any(p: &Path, fmt: &str) -> Vec<u8> {
    if fmt == "raw" {
        std::fs::read(p).unwrap()
    } else {
        raw_of(p)
    }
}

#[test]
fn preallocated_images() {
    let d = tmp();
    for prealloc in ["metadata", "falloc", "full"] {
        for compat in ["1.1", "0.10"] {
            let img = create(
                d.path(),
                &format!("p-{prealloc}-{compat}.qcow2"),
                6 << 20,
                &format!("cluster_size=65536,preallocation={prealloc},compat={compat}"),
            );
            qio(&img, &["write -P 0x12 100000 300000".to_string()]);
            let want = raw_of(&img);
            let x = open(&img, CacheMode::None, false);
            assert_same(&read_all(&x), &want, prealloc);
            let mut m = Model {
                data: want,
                base: None,
                cs: 65536,
                v3: compat == "1.1",
            };
            random_ops(&x, &mut m, 99, 80);
            x.close().unwrap();
            drop(x);
            check_clean(&img);
            compare_with(&img, &m.data);
        }
    }
}

// ---- writing ---------------------------------------------------------------------------

#[test]
fn random_writes_every_layout_pass_qemu_check() {
    let d = tmp();
    let cases: &[(u64, u32, &str)] = &[
        (512, 16, "0.10"),
        (512, 64, "1.1"),
        (4096, 1, "1.1"),
        (4096, 2, "1.1"),
        (4096, 4, "1.1"),
        (65536, 8, "1.1"),
        (65536, 16, "0.10"),
        (65536, 32, "1.1"),
        (65536, 64, "1.1"),
        (2 << 20, 16, "1.1"),
    ];
    for (n, &(cs, rb, compat)) in cases.iter().enumerate() {
        let cache = CACHES[n % 2];
        let size = (cs * 24).max(3 << 20) + 4608;
        let img = create(
            d.path(),
            &format!("w-{cs}-{rb}-{compat}.qcow2"),
            size,
            &format!("cluster_size={cs},refcount_bits={rb},compat={compat}"),
        );
        let mut m = Model {
            data: vec![0u8; size as usize],
            base: None,
            cs,
            v3: compat == "1.1",
        };
        {
            let x = open(&img, cache, false);
            // Small caches: eviction of dirty L2 tables and refcount blocks.
            qcow2(&x).set_cache_limits(3, 2);
            random_ops(&x, &mut m, n as u64, 150);
            // One write spanning many clusters.
            let big = pattern(77, (cs * 9 + 123) as usize);
            x.write_at(&big, cs / 2).unwrap();
            m.write(cs / 2, &big);
            assert_same(&read_all(&x), &m.data, "xdisk read-back");
            x.close().unwrap();
        }
        check_clean(&img);
        compare_with(&img, &m.data);
        // Reopen and read back.
        let x = open(&img, cache, true);
        assert_same(&read_all(&x), &m.data, "after reopen");
    }
}

#[test]
fn sparse_writes_grow_l2_refcount_blocks_and_refcount_table() {
    let d = tmp();
    for rb in [64u32, 16] {
        let size = 1u64 << 30;
        let img = create(
            d.path(),
            &format!("g-{rb}.qcow2"),
            size,
            &format!("cluster_size=512,refcount_bits={rb}"),
        );
        let before = xdisk_header(&img);
        let model_path = d.path().join(format!("g-{rb}.model"));
        let model = std::fs::File::create(&model_path).unwrap();
        model.set_len(size).unwrap();
        let mut r = StdRng::seed_from_u64(rb as u64);
        {
            let x = open(&img, CacheMode::None, false);
            qcow2(&x).set_cache_limits(16, 4);
            for i in 0..400u64 {
                let off = r.gen_range(0..size - 70000);
                let len = r.gen_range(1..70000usize);
                let buf = pattern(i, len);
                x.write_at(&buf, off).unwrap();
                model.write_all_at(&buf, off).unwrap();
                if i % 97 == 0 {
                    x.flush().unwrap();
                }
            }
            x.close().unwrap();
        }
        let after = xdisk_header(&img);
        assert!(
            after.refcount_table_clusters > before.refcount_table_clusters,
            "refcount table grew: {} -> {}",
            before.refcount_table_clusters,
            after.refcount_table_clusters
        );
        check_clean(&img);
        let (code, out, err) = run_status(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                model_path.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "compare: {out} {err}");
    }
}

fn xdisk_header(img: &Path) -> xdisk_image::qcow2::format::Header {
    let x = open(img, CacheMode::WriteBack, true);
    qcow2(&x).header()
}

#[test]
fn internal_snapshots_are_preserved_by_copy_on_write() {
    let d = tmp();
    for (cs, rb) in [(65536u64, 16u32), (512, 16), (4096, 4)] {
        let size = 2u64 << 20;
        let img = create(
            d.path(),
            &format!("s-{cs}.qcow2"),
            size,
            &format!("cluster_size={cs},refcount_bits={rb}"),
        );
        qio(
            &img,
            &[
                "write -P 0x31 0 1M".to_string(),
                format!("write -z {} {}", 1 << 20, cs * 2),
            ],
        );
        qimg(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
        let snap1 = raw_of(&img);
        qio(&img, &["write -P 0x32 300000 200000".to_string()]);
        qimg(&["snapshot", "-c", "s2", img.to_str().unwrap()]);
        let snap2 = raw_of(&img);
        let mut m = Model {
            data: snap2.clone(),
            base: None,
            cs,
            v3: true,
        };
        {
            let x = open(&img, CacheMode::None, false);
            assert_eq!(qcow2(&x).snapshots().len(), 2);
            assert_eq!(qcow2(&x).snapshots()[0].name, "s1");
            random_ops(&x, &mut m, cs + 5, 120);
            x.write_at(&pattern(5, 5000), 1000).unwrap();
            m.write(1000, &pattern(5, 5000));
            x.close().unwrap();
        }
        check_clean(&img);
        compare_with(&img, &m.data);
        for (name, want) in [("s1", &snap1), ("s2", &snap2)] {
            let out = d.path().join(format!("{name}.raw"));
            qimg(&[
                "convert",
                "-l",
                &format!("snapshot.name={name}"),
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            assert_same(&std::fs::read(&out).unwrap(), want, name);
        }
        // Shrinking is refused with snapshots.
        let x = open(&img, CacheMode::None, false);
        assert!(matches!(x.resize(size / 2), Err(Error::Unsupported(_))));
    }
}

#[test]
fn resize_grow_and_shrink() {
    let d = tmp();
    for compat in ["1.1", "0.10"] {
        let img = create(
            d.path(),
            &format!("rs-{compat}.qcow2"),
            (1 << 20) + 1000,
            &format!("cluster_size=512,compat={compat}"),
        );
        let mut data = vec![0u8; (1 << 20) + 1000];
        {
            let x = open(&img, CacheMode::None, false);
            let p = pattern(3, data.len());
            x.write_at(&p, 0).unwrap();
            data.copy_from_slice(&p);
            // Grow past the L1 table (512-byte clusters: one L2 table maps 32 KiB).
            x.resize(64 << 20).unwrap();
            assert_eq!(x.size(), 64 << 20);
            data.resize(64 << 20, 0);
            assert_same(&read_all(&x), &data, "after grow");
            x.write_at(&[7u8; 3000], (40 << 20) + 5).unwrap();
            data[(40 << 20) + 5..(40 << 20) + 3005].fill(7);
            x.close().unwrap();
        }
        check_clean(&img);
        compare_with(&img, &data);
        let info = qimg(&["info", "--output=json", img.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(64 << 20));
        {
            let x = open(&img, CacheMode::WriteBack, false);
            x.resize(300_000).unwrap();
            data.truncate(300_000);
            assert_same(&read_all(&x), &data, "after shrink");
            // Grow again: the stale tail of the last cluster must read as zeroes.
            x.resize(400_000).unwrap();
            data.resize(400_000, 0);
            assert_same(&read_all(&x), &data, "after regrow");
            x.close().unwrap();
        }
        check_clean(&img);
        compare_with(&img, &data);
    }
    // Growing over a larger backing file exposes zeroes, not backing data.
    let base = d.path().join("rb.raw");
    std::fs::write(&base, vec![0x99u8; 4 << 20]).unwrap();
    let ov = d.path().join("rov.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "rb.raw",
        "-F",
        "raw",
        ov.to_str().unwrap(),
        "1M",
    ]);
    {
        let x = open(&ov, CacheMode::None, false);
        x.resize(3 << 20).unwrap();
        let all = read_all(&x);
        assert!(all[..1 << 20].iter().all(|&b| b == 0x99));
        assert!(all[1 << 20..].iter().all(|&b| b == 0));
        x.close().unwrap();
    }
    check_clean(&ov);
}

// ---- concurrency -----------------------------------------------------------------------

#[test]
fn concurrent_writers_and_readers() {
    let d = tmp();
    for (cs, with_backing) in [(65536u64, true), (4096, false), (512, true)] {
        let size = 8u64 << 20;
        let base = d.path().join(format!("cb-{cs}.raw"));
        let base_content = pattern(42, size as usize);
        std::fs::write(&base, &base_content).unwrap();
        let img = d.path().join(format!("cc-{cs}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        let o = format!("cluster_size={cs}");
        args.extend(["-o", &o]);
        if with_backing {
            args.extend([
                "-b",
                base.file_name().unwrap().to_str().unwrap(),
                "-F",
                "raw",
            ]);
        }
        let ps = img.to_str().unwrap().to_string();
        args.push(&ps);
        let ss = size.to_string();
        args.push(&ss);
        qimg(&args);
        let x = open(&img, CacheMode::None, false);
        qcow2(&x).set_cache_limits(4, 4);
        // Thread t owns the 512-byte sectors s with s % 4 == t: the threads write the same
        // clusters (and race to allocate them) without overlapping bytes.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let x = x.clone();
                let init = if with_backing {
                    base_content.clone()
                } else {
                    vec![0u8; size as usize]
                };
                std::thread::spawn(move || {
                    let mut r = StdRng::seed_from_u64(t);
                    let mut mine = init;
                    let sectors = size / 512;
                    for i in 0..400u64 {
                        let s = r.gen_range(0..sectors / 4) * 4 + t;
                        let n = r.gen_range(1..=3u64);
                        for k in 0..n {
                            let sec = s + 4 * k;
                            if sec >= sectors {
                                break;
                            }
                            let buf = [(t * 50 + i % 50) as u8 + 1; 512];
                            x.write_at(&buf, sec * 512).unwrap();
                            mine[(sec * 512) as usize..(sec * 512 + 512) as usize]
                                .copy_from_slice(&buf);
                        }
                        if i % 5 == 0 {
                            let mut got = [0u8; 512];
                            x.read_at(&mut got, s * 512).unwrap();
                            assert_eq!(
                                &got[..],
                                &mine[(s * 512) as usize..(s * 512 + 512) as usize]
                            );
                        }
                        if i % 97 == 0 {
                            x.flush().unwrap();
                        }
                    }
                    mine
                })
            })
            .collect();
        let results: Vec<Vec<u8>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        let mut want = vec![0u8; size as usize];
        for (sec, chunk) in want.chunks_mut(512).enumerate() {
            let t = sec % 4;
            chunk.copy_from_slice(&results[t][sec * 512..sec * 512 + 512]);
        }
        assert_same(&read_all(&x), &want, "concurrent result (xdisk)");
        x.close().unwrap();
        drop(x);
        check_clean(&img);
        compare_with(&img, &want);
    }
}

// ---- fast path -------------------------------------------------------------------------

#[test]
fn map_returns_host_extents_or_slow() {
    let d = tmp();
    let base = d.path().join("mb.raw");
    std::fs::write(&base, pattern(8, 1 << 20)).unwrap();
    let img = d.path().join("m.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mb.raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        "16M",
    ]);
    qio(
        &img,
        &[
            "write -P 0x41 0 64k".to_string(),
            "write -z 64k 8k".to_string(),
        ],
    );
    let want = raw_of(&img);
    let x = open(&img, CacheMode::None, false);
    let mut out = Vec::new();
    // Nothing cached yet: slow.
    assert!(matches!(
        x.map(0, 8192, false, &mut out).unwrap(),
        Mapping::Slow
    ));
    assert!(out.is_empty());
    let mut buf = vec![0u8; 4096];
    x.read_at(&mut buf, 0).unwrap();
    // Now the L2 table is cached: data, zeroes and backing extents.
    let len = 3 << 20;
    let g = x.map(0, len, false, &mut out).unwrap();
    assert!(matches!(g, Mapping::Mapped(_)));
    assert_eq!(out.iter().map(Extent::len).sum::<u64>(), len);
    let mut pos = 0usize;
    for e in &out {
        let n = e.len() as usize;
        match e {
            Extent::Data {
                storage: file,
                offset,
                len,
            } => {
                let mut b = vec![0u8; *len as usize];
                file.read_at(&mut b, *offset).unwrap();
                assert_same(&b, &want[pos..pos + n], "data extent");
            }
            Extent::Zero { .. } => assert!(want[pos..pos + n].iter().all(|&b| b == 0)),
        }
        pos += n;
    }
    assert!(
        matches!(&out[0], Extent::Data { offset, len, .. } if *len >= 65536 && offset % 4096 == 0)
    );
    drop(g);
    // Writes: allocated COPIED clusters map, unallocated ones do not.
    out.clear();
    assert!(matches!(
        x.map(4096, 8192, true, &mut out).unwrap(),
        Mapping::Mapped(_)
    ));
    if let Extent::Data {
        storage: file,
        offset,
        ..
    } = &out[0]
    {
        file.write_at(&[0x77; 8192], *offset).unwrap();
    }
    out.clear();
    assert!(matches!(
        x.map(1 << 20, 4096, true, &mut out).unwrap(),
        Mapping::Slow
    ));
    assert!(out.is_empty());
    let mut b = vec![0u8; 8192];
    x.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&v| v == 0x77));
    // Tiny cache: after touching many L2 tables the first is evicted -> slow.
    qcow2(&x).set_cache_limits(2, 2);
    // (4 KiB clusters: one L2 table maps 2 MiB.)
    for i in 1..6u64 {
        x.write_at(&[1], (i << 21) + 4096 * 300).unwrap();
    }
    out.clear();
    assert!(matches!(
        x.map(0, 4096, false, &mut out).unwrap(),
        Mapping::Slow
    ));
    x.close().unwrap();
    drop(x);
    check_clean(&img);
}

fn host_of(x: &Image, off: u64, cs: u64) -> Option<u64> {
    match x.layer_status(off, cs).unwrap() {
        LayerStatus::Data { offset, .. } => offset,
        _ => None,
    }
}

/// A host cluster freed by discard while a fast-path I/O mapped to it is in flight is not
/// reused until that I/O is done.
#[test]
fn freed_clusters_are_quarantined_while_mapped_io_is_in_flight() {
    let d = tmp();
    let cs = 4096u64;
    let img = create(d.path(), "q.qcow2", 4 << 20, "cluster_size=4096");
    let x = open(&img, CacheMode::None, false);
    x.write_at(&[5u8; 4096], 0).unwrap();
    let h = host_of(&x, 0, cs).unwrap();
    let mut out = Vec::new();
    let guard = match x.map(0, cs, true, &mut out).unwrap() {
        Mapping::Mapped(g) => g,
        Mapping::Slow => panic!("allocated cluster not mapped"),
    };
    assert!(matches!(out[0], Extent::Data { offset, .. } if offset == h));
    x.discard(0, cs).unwrap();
    x.flush().unwrap(); // the free is applied: refcount 0, quarantined
    for i in 1..20u64 {
        x.write_at(&[i as u8; 4096], i * cs).unwrap();
        assert_ne!(
            host_of(&x, i * cs, cs),
            Some(h),
            "quarantined cluster reused"
        );
    }
    // The late write of the mapped I/O lands in a cluster nobody else uses.
    if let Extent::Data {
        storage: file,
        offset,
        ..
    } = &out[0]
    {
        file.write_at(&[0xee; 4096], *offset).unwrap();
    }
    drop(guard);
    x.write_at(&[0x42; 4096], 100 * cs).unwrap();
    assert_eq!(
        host_of(&x, 100 * cs, cs),
        Some(h),
        "released cluster is reused first"
    );
    let mut want = vec![0u8; 4 << 20];
    for i in 1..20usize {
        want[i * 4096..(i + 1) * 4096].fill(i as u8);
    }
    want[100 * 4096..101 * 4096].fill(0x42);
    assert_same(&read_all(&x), &want, "contents");
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    compare_with(&img, &want);
}

/// QEMU's discard and zero semantics, per version and backing file.
#[test]
fn discard_and_zero_semantics() {
    let d = tmp();
    let cs = 65536u64;
    let base = d.path().join("db.raw");
    std::fs::write(&base, vec![0xbbu8; 1 << 20]).unwrap();
    for compat in ["1.1", "0.10"] {
        for backing in [false, true] {
            let img = d.path().join(format!("ds-{compat}-{backing}.qcow2"));
            let o = format!("cluster_size=65536,compat={compat}");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
            if backing {
                args.extend(["-b", "db.raw", "-F", "raw"]);
            }
            let ps = img.to_str().unwrap().to_string();
            args.extend([ps.as_str(), "1M"]);
            qimg(&args);
            let x = open(&img, CacheMode::None, false);
            x.write_at(&vec![1u8; 6 * cs as usize], 0).unwrap();
            let h1 = host_of(&x, cs, cs).unwrap();
            // Discard clusters 1-2 plus half of cluster 0 and 3.
            x.discard(cs / 2, 3 * cs).unwrap();
            let st = x.layer_status(cs, 2 * cs).unwrap();
            let mut got = vec![0u8; 4 * cs as usize];
            x.read_at(&mut got, 0).unwrap();
            if compat == "1.1" {
                let want_st = if backing {
                    LayerStatus::Zero { len: 2 * cs }
                } else {
                    LayerStatus::Unallocated { len: 2 * cs }
                };
                assert_eq!(st, want_st);
                assert!(got[cs as usize / 2..(3 * cs + cs / 2) as usize]
                    .iter()
                    .all(|&b| b == 0));
            } else if backing {
                // v2: the backing file shows through whole clusters; partial ones untouched.
                assert_eq!(st, LayerStatus::Unallocated { len: 2 * cs });
                assert!(got[..cs as usize].iter().all(|&b| b == 1));
                assert!(got[cs as usize..3 * cs as usize].iter().all(|&b| b == 0xbb));
                assert!(got[3 * cs as usize..].iter().all(|&b| b == 1));
            } else {
                assert_eq!(st, LayerStatus::Unallocated { len: 2 * cs });
                assert!(got[cs as usize / 2..(3 * cs + cs / 2) as usize]
                    .iter()
                    .all(|&b| b == 0));
            }
            // write_zeroes without unmap keeps an owned cluster preallocated (v3).
            x.write_zeroes(4 * cs, cs, false).unwrap();
            let st = x.layer_status(4 * cs, cs).unwrap();
            if compat == "1.1" {
                assert_eq!(st, LayerStatus::Zero { len: cs });
            }
            x.write_zeroes(5 * cs, cs, true).unwrap();
            let mut z = vec![1u8; 2 * cs as usize];
            x.read_at(&mut z, 4 * cs).unwrap();
            assert!(z.iter().all(|&b| b == 0));
            x.flush().unwrap();
            // The discarded cluster is free again (after its quarantine): reused.
            x.write_at(&vec![2u8; cs as usize], 8 * cs).unwrap();
            assert_eq!(host_of(&x, 8 * cs, cs), Some(h1), "{compat} {backing}");
            x.close().unwrap();
            drop(x);
            check_clean(&img);
        }
    }
}

// ---- dirty images, corrupt images, refusals --------------------------------------------

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read_bytes(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

#[test]
fn dirty_image_is_repaired_on_open() {
    let d = tmp();
    // 1. By hand: set the dirty bit and wreck the refcounts.
    let img = create(d.path(), "dirty.qcow2", 4 << 20, "cluster_size=65536");
    qio(
        &img,
        &[
            "write -P 0x51 0 1M".to_string(),
            "write -P 0x52 3M 100k".to_string(),
        ],
    );
    qimg(&["snapshot", "-c", "snap", img.to_str().unwrap()]);
    qio(&img, &["write -P 0x53 64k 64k".to_string()]);
    let want = raw_of(&img);
    let reft = be64(&read_bytes(&img, 48, 8));
    let block = be64(&read_bytes(&img, reft, 8));
    patch(&img, block, &vec![0u8; 4096]); // refcounts of the first 2048 clusters: 0
    let mut flags = read_bytes(&img, 72, 8);
    flags[7] |= 1;
    patch(&img, 72, &flags);
    assert_ne!(qcheck(&img).corruptions, 0);
    // no_repair refuses; read-only just reads.
    let e = Image::open(
        &img,
        &OpenOptions {
            no_repair: true,
            ..opts(CacheMode::None, false)
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Corrupt(ref m) if m.contains("dirty")),
        "{e}"
    );
    let x = open(&img, CacheMode::None, true);
    assert_same(&read_all(&x), &want, "dirty, read-only");
    drop(x);
    let x = open(&img, CacheMode::None, false);
    assert!(!qcow2(&x).header().is_dirty());
    assert_same(&read_all(&x), &want, "repaired");
    x.write_at(&[9u8; 70000], 500_000).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    let mut want2 = want.clone();
    want2[500_000..570_000].fill(9);
    compare_with(&img, &want2);

    // A dirty image whose references exceed what refcount_bits=1 can count: refused.
    let img = create(
        d.path(),
        "ovf.qcow2",
        1 << 20,
        "cluster_size=4096,refcount_bits=1",
    );
    qio(&img, &["write -P 0x51 0 8k".to_string()]);
    let l1 = be64(&read_bytes(&img, 40, 8));
    let l2 = be64(&read_bytes(&img, l1, 8)) & 0x00ff_ffff_ffff_fe00;
    let e0 = read_bytes(&img, l2, 8);
    patch(&img, l2 + 8, &e0);
    let mut flags = read_bytes(&img, 72, 8);
    flags[7] |= 1;
    patch(&img, 72, &flags);
    let e = Image::open(&img, &opts(CacheMode::None, false)).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt(ref m) if m.contains("refcount_bits")),
        "{e}"
    );

    // 2. A real crash with lazy refcounts: qemu-io aborts before updating refcounts.
    let img = create(
        d.path(),
        "lazy.qcow2",
        4 << 20,
        "cluster_size=4096,lazy_refcounts=on",
    );
    let (code, _, _) = run_status(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 0 300k",
            "-c",
            "abort",
            img.to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0);
    let x = open(&img, CacheMode::None, true);
    let hdr = qcow2(&x).header();
    drop(x);
    assert!(hdr.is_dirty(), "qemu left the image dirty");
    let x = open(&img, CacheMode::WriteBack, false);
    let mut b = vec![0u8; 300 << 10];
    x.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&v| v == 0x61));
    x.close().unwrap();
    drop(x);
    check_clean(&img);
}

#[test]
fn refusals_corrupt_bit_features_but_images_with_bitmaps_open_writable() {
    let d = tmp();
    // Persistent bitmaps are kept up to date (they used to be refused: see tests/bitmaps.rs).
    let img = create(d.path(), "bm.qcow2", 1 << 20, "");
    qimg(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    let x = open(&img, CacheMode::None, false);
    x.write_at(&[1; 512], 0).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    open(&img, CacheMode::None, true);

    let img = create(d.path(), "cor.qcow2", 1 << 20, "");
    let mut flags = read_bytes(&img, 72, 8);
    flags[7] |= 2;
    patch(&img, 72, &flags);
    assert!(matches!(
        Image::open(&img, &opts(CacheMode::None, false)).unwrap_err(),
        Error::Corrupt(_)
    ));
    open(&img, CacheMode::None, true);

    let img = create(d.path(), "ext.qcow2", 1 << 20, "extended_l2=on");
    assert!(matches!(
        Image::open(&img, &opts(CacheMode::None, true)).unwrap_err(),
        Error::Unsupported(_)
    ));
}

/// Hostile metadata: errors, never panics, never huge allocations.
#[test]
fn hostile_images_fail_cleanly() {
    let d = tmp();
    let cs = 4096u64;
    let base_img = create(d.path(), "h.qcow2", 4 << 20, "cluster_size=4096");
    qio(
        &base_img,
        &[
            "write -P 0x11 0 64k".to_string(),
            "write -P 0x12 2M 8k".to_string(),
        ],
    );
    let l1_off = be64(&read_bytes(&base_img, 40, 8));
    let l1e0 = be64(&read_bytes(&base_img, l1_off, 8)) & 0x00ff_ffff_ffff_fe00;
    let reft = be64(&read_bytes(&base_img, 48, 8));
    let file_len = std::fs::metadata(&base_img)
        .unwrap()
        .len()
        .next_multiple_of(cs);
    let l2e1 = be64(&read_bytes(&base_img, l1e0 + 8, 8)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2e1, 0);

    let variant = |name: &str, off: u64, bytes: Vec<u8>| -> PathBuf {
        let p = d.path().join(name);
        std::fs::copy(&base_img, &p).unwrap();
        patch(&p, off, &bytes);
        p
    };
    let cases = vec![
        variant(
            "l1-reserved",
            l1_off,
            (l1e0 | 1 << 60 | 1 << 63).to_be_bytes().to_vec(),
        ),
        variant("l1-unaligned", l1_off, (l1e0 + 512).to_be_bytes().to_vec()),
        variant(
            "l1-past-eof",
            l1_off,
            ((file_len + cs * 100) | 1 << 63).to_be_bytes().to_vec(),
        ),
        variant("l1-self", l1_off, (l1_off | 1 << 63).to_be_bytes().to_vec()),
        variant(
            "l1-reftable",
            l1_off,
            (reft | 1 << 63).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-compressed-header",
            l1e0,
            (1u64 << 62 | 100).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-to-header",
            l1e0,
            (1u64 << 63 | 0x200).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-to-reftable",
            l1e0,
            (1u64 << 63 | reft).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-to-l1",
            l1e0,
            (1u64 << 63 | l1_off).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-past-eof",
            l1e0,
            (1u64 << 63 | (file_len + cs * 8)).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-reserved",
            l1e0 + 8,
            (1u64 << 63 | 1 << 57 | (cs * 5)).to_be_bytes().to_vec(),
        ),
        // Compressed entry with the largest sector count at a huge offset.
        variant(
            "l2-compressed-huge",
            l1e0,
            (1u64 << 62 | u64::MAX >> 2).to_be_bytes().to_vec(),
        ),
        // Compressed entry pointing at garbage (the L1 table) with a long length.
        variant(
            "l2-compressed-garbage",
            l1e0,
            (1u64 << 62 | 15 << 58 | (l2e1 + 7)).to_be_bytes().to_vec(),
        ),
        variant(
            "l2-compressed-l1",
            l1e0,
            (1u64 << 62 | 15 << 58 | (l1_off + 7))
                .to_be_bytes()
                .to_vec(),
        ),
        variant(
            "reft-past-eof",
            reft,
            (file_len + cs * 50).to_be_bytes().to_vec(),
        ),
        variant(
            "reft-reserved",
            reft,
            (be64(&read_bytes(&base_img, reft, 8)) | 3)
                .to_be_bytes()
                .to_vec(),
        ),
        variant("l1-size-huge", 36, u32::MAX.to_be_bytes().to_vec()),
        variant("reft-clusters-huge", 56, u32::MAX.to_be_bytes().to_vec()),
    ];
    for p in cases {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let x = match Image::open(&p, &opts(CacheMode::WriteBack, false)) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{name}: open: {e}");
                assert!(
                    matches!(e, Error::Corrupt(_) | Error::Unsupported(_)),
                    "{name}: {e}"
                );
                continue;
            }
        };
        let mut buf = vec![0u8; 128 << 10];
        let r = x.read_at(&mut buf, 0);
        let w = x.write_at(&[1u8; 5000], 1000);
        let w2 = x.write_at(&[2u8; 5000], (3 << 20) + 100);
        let z = x.discard(0, 1 << 20);
        let _ = x.layer_status(0, 1 << 20);
        let _ = x.flush();
        eprintln!("{name}: read {r:?} write {w:?} write2 {w2:?} discard {z:?}");
        let any_err = [r.is_err(), w.is_err(), w2.is_err(), z.is_err()]
            .iter()
            .any(|&e| e);
        assert!(any_err, "{name}: hostile image accepted everything");
        for res in [r, w, w2, z] {
            if let Err(e) = res {
                assert!(
                    matches!(e, Error::Corrupt(_) | Error::NoSpace(_)),
                    "{name}: unexpected error kind: {e}"
                );
            }
        }
    }
}

/// Random byte flips in the metadata of a small image must never panic.
#[test]
fn fuzzed_metadata_never_panics() {
    let d = tmp();
    let base_img = create(d.path(), "f.qcow2", 2 << 20, "cluster_size=512");
    qio(
        &base_img,
        &[
            "write -P 0x11 0 100k".to_string(),
            "write -P 0x12 1M 8k".to_string(),
        ],
    );
    qimg(&["snapshot", "-c", "s", base_img.to_str().unwrap()]);
    let orig = std::fs::read(&base_img).unwrap();
    let meta_len = orig.len().min(64 << 10);
    let mut r = StdRng::seed_from_u64(1234);
    for i in 0..150 {
        let mut b = orig.clone();
        for _ in 0..r.gen_range(1..6) {
            let pos = r.gen_range(0..meta_len);
            b[pos] ^= 1 << r.gen_range(0..8);
        }
        let p = d.path().join(format!("fz{i}.qcow2"));
        std::fs::write(&p, &b).unwrap();
        if let Ok(x) = Image::open(&p, &opts(CacheMode::WriteBack, r.gen_bool(0.3))) {
            let mut buf = vec![0u8; 256 << 10];
            let _ = x.read_at(&mut buf, r.gen_range(0..1 << 20));
            let _ = x.write_at(&buf[..3000], r.gen_range(0..1 << 20));
            let _ = x.discard(r.gen_range(0..1 << 20), 70000);
            let _ = x.write_zeroes(r.gen_range(0..1 << 20), 5000, true);
            let _ = x.layer_status(0, x.size());
            let _ = x.flush();
        }
        std::fs::remove_file(&p).unwrap();
    }
}

// ---- crash safety ----------------------------------------------------------------------

const CRASH_ENV: &str = "XDISK_QCOW2_CRASH_CHILD";
const FLUSH_EVERY: u64 = 8;

/// The deterministic operation sequence of the crash test (the child runs it, the parent
/// replays it to know what was flushed).
fn crash_op(r: &mut StdRng, i: u64, size: u64) -> (u8, u64, u64, u8) {
    let kind = r.gen_range(0..10u8);
    let off = r.gen_range(0..size - 1);
    let len = r.gen_range(1..=(200_000u64).min(size - off));
    (kind, off, len, (i % 250) as u8 + 1)
}

/// Child side: runs only when spawned by `kill_9_leaves_consistent_image`.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CRASH_ENV) else {
        return;
    };
    let mut it = spec.split(',');
    let path = PathBuf::from(it.next().unwrap());
    let seed: u64 = it.next().unwrap().parse().unwrap();
    let cache = match it.next().unwrap() {
        "none" => CacheMode::None,
        _ => CacheMode::WriteBack,
    };
    let x = open(&path, cache, false);
    if it.next() == Some("small") {
        qcow2(&x).set_cache_limits(2, 2);
    }
    let size = x.size();
    if it.next() == Some("mt") {
        // Several threads at once: only the consistency of the image is checked.
        let hs: Vec<_> = (0..3u64)
            .map(|t| {
                let x = x.clone();
                std::thread::spawn(move || {
                    let mut r = StdRng::seed_from_u64(seed * 10 + t);
                    for i in 0.. {
                        let (kind, off, len, fill) = crash_op(&mut r, i, size);
                        let len = len.min(40_000);
                        match kind {
                            0..=6 => x.write_at(&vec![fill; len as usize], off).unwrap(),
                            7 => x.discard(off, len).unwrap(),
                            _ => x.write_zeroes(off, len, kind == 8).unwrap(),
                        }
                        if i % 13 == 0 {
                            x.flush().unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
    let mut r = StdRng::seed_from_u64(seed);
    for i in 0.. {
        let (kind, off, len, fill) = crash_op(&mut r, i, size);
        match kind {
            0..=6 => x.write_at(&vec![fill; len as usize], off).unwrap(),
            7 => x.discard(off, len).unwrap(),
            _ => x.write_zeroes(off, len, kind == 8).unwrap(),
        }
        if (i + 1) % FLUSH_EVERY == 0 {
            x.flush().unwrap();
            // Explicitly flushed: stdout may be block-buffered on a pipe.
            let mut so = std::io::stdout().lock();
            writeln!(so, "FLUSHED {}", i + 1).unwrap();
            so.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_leaves_consistent_image() {
    let d = tmp();
    let exe = std::env::current_exe().unwrap();
    let mut r = StdRng::seed_from_u64(2024);
    let rounds: u64 = std::env::var("XDISK_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let first: u64 = std::env::var("XDISK_CRASH_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for round in first..rounds {
        let (cs, compat, backing) = [
            (4096u64, "1.1", false),
            (512, "1.1", true),
            (65536, "0.10", false),
            (4096, "0.10", true),
        ][(round % 4) as usize];
        let size = 4u64 << 20;
        let base = d.path().join(format!("kb{round}.raw"));
        let base_content = pattern(round, size as usize);
        std::fs::write(&base, &base_content).unwrap();
        let img = d.path().join(format!("k{round}.qcow2"));
        let o = format!("cluster_size={cs},compat={compat}");
        let ps = img.to_str().unwrap().to_string();
        let ss = size.to_string();
        let bname = base.file_name().unwrap().to_str().unwrap().to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
        if backing {
            args.extend(["-b", &bname, "-F", "raw"]);
        }
        args.extend([ps.as_str(), ss.as_str()]);
        qimg(&args);
        let cache = if round % 2 == 0 { "none" } else { "writeback" };
        let seed = round * 7 + 1;
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(
                CRASH_ENV,
                format!(
                    "{},{seed},{cache},{},{}",
                    img.display(),
                    if round % 3 == 0 { "small" } else { "normal" },
                    if round % 5 == 4 { "mt" } else { "st" }
                ),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (lo, hi) = match std::env::var("XDISK_CRASH_SLEEP") {
            Ok(v) => {
                let (a, b) = v.split_once('-').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            }
            Err(_) => (100u64, 900u64),
        };
        std::thread::sleep(std::time::Duration::from_millis(r.gen_range(lo..hi)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let mut flushed = 0u64;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            // (The first may share a line with libtest's "test crash_child ... ".)
            if let Some(at) = line.find("FLUSHED ") {
                flushed = line[at + 8..].trim().parse().unwrap();
            }
        }
        check_consistent(&img);
        if round % 5 == 4 {
            let x = open(&img, CacheMode::None, false);
            x.write_at(&[3u8; 10000], 12345).unwrap();
            x.close().unwrap();
            drop(x);
            check_consistent(&img);
            eprintln!("crash round {round}: multi-threaded, consistent");
            continue;
        }
        // Replay: what was flushed must read back; bytes that later (unflushed) operations
        // touched may hold either version.
        let v3 = compat == "1.1";
        let mut m = Model {
            data: if backing {
                base_content.clone()
            } else {
                vec![0u8; size as usize]
            },
            base: backing.then(|| base_content.clone()),
            cs,
            v3,
        };
        let mut uncertain = vec![false; size as usize];
        let mut rr = StdRng::seed_from_u64(seed);
        for i in 0..flushed + FLUSH_EVERY {
            let (kind, off, len, fill) = crash_op(&mut rr, i, size);
            if std::env::var("XDISK_CRASH_DEBUG").is_ok() && i < flushed + FLUSH_EVERY {
                eprintln!("op {i}: kind {kind} off {off:#x} len {len:#x} fill {fill}");
            }
            if i >= flushed {
                // Partial-cluster edges of discards may also touch whole clusters' data.
                let s = (off / cs * cs) as usize;
                let e = ((off + len).next_multiple_of(cs)).min(size) as usize;
                uncertain[s..e].fill(true);
                continue;
            }
            match kind {
                0..=6 => m.write(off, &vec![fill; len as usize]),
                7 => m.discard(off, len),
                _ => m.zero(off, len),
            }
        }
        let got = raw_of(&img);
        for (i, (&g, &w)) in got.iter().zip(&m.data).enumerate() {
            if !uncertain[i] && g != w {
                let keep = PathBuf::from("/var/tmp/xdisk-crash-fail.qcow2");
                let _ = std::fs::copy(&img, &keep);
                let _ = std::fs::copy(&base, keep.with_file_name(base.file_name().unwrap()));
                panic!(
                    "round {round} ({cs} {compat} backing={backing} {cache}): flushed {flushed}, \
                     byte {i:#x} is {g:#x}, want {w:#x}"
                );
            }
        }
        // The engine opens what the crash left and keeps working.
        let x = open(&img, CacheMode::None, false);
        x.write_at(&[3u8; 10000], 12345).unwrap();
        x.close().unwrap();
        drop(x);
        check_consistent(&img);
        eprintln!("crash round {round}: flushed {flushed} ops, consistent");
    }
}

/// Concurrent direct writes of new clusters land in room allocated ahead inside the file
/// (an extending direct write holds ext4's inode lock across its I/O, so appends ran one at
/// a time); the room nobody took is given back on close, so the file ends where QEMU's
/// would, and a crash in between leaves only free room that `qemu-img check` accepts and
/// the next allocations take.
#[test]
fn new_clusters_land_in_room_allocated_ahead_and_close_gives_the_rest_back() {
    let dir = tmp();
    let p = create(dir.path(), "ahead.qcow2", 256 << 20, "cluster_size=65536");
    let len_at_create = std::fs::metadata(&p).unwrap().len();
    let data = pattern(7, 1 << 20);
    let img = open(&p, CacheMode::None, false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (img, data) = (&img, &data);
            s.spawn(move || {
                for i in 0..8u64 {
                    img.write_at(data, (i * 4 + t) << 20).unwrap();
                }
            });
        }
    });
    img.flush().unwrap();
    let during = std::fs::metadata(&p).unwrap().len();
    // A crash here (the image was flushed) leaves the room in the file: consistent.
    let copy = dir.path().join("crashed.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    check_clean(&copy);
    let end_of = |p: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&qimg(&["check", "--output=json", p.to_str().unwrap()])).unwrap();
        v["image-end-offset"].as_u64().unwrap()
    };
    // 32 MiB of data and its tables, and room past them.
    let used = end_of(&copy);
    assert!(
        used > 32 << 20 && during > used,
        "file length while open: {during}, image end {used}"
    );
    {
        let again = open(&copy, CacheMode::None, false);
        again.write_at(&data, 200 << 20).unwrap();
        again.close().unwrap();
    }
    check_clean(&copy);
    // The next allocations took the room the crash left first: 1 MiB more data (and an L2
    // table) grew the file by less than 1 MiB.
    let grown = std::fs::metadata(&copy).unwrap().len() - during;
    assert!(grown < 1 << 20, "the file grew by {grown} bytes");
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    let after = std::fs::metadata(&p).unwrap().len();
    let image_end = end_of(&p);
    assert!(
        after < during && after == image_end.max(len_at_create),
        "file length after close {after}, while open {during}, image end {image_end}"
    );
    let mut want = vec![0u8; 256 << 20];
    for t in 0..4usize {
        for i in 0..8usize {
            let off = (i * 4 + t) << 20;
            want[off..off + data.len()].copy_from_slice(&data);
        }
    }
    compare_with(&p, &want);
}
