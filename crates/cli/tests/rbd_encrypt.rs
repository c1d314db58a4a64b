//! librbd's LUKS encryption of RBD images through every command, on the real throwaway
//! cluster (see `xdisk_rbd::testing`), with QEMU's rbd driver and its `encrypt.*` options
//! (qemu-img/qemu-io 7.2, `--object secret` and `--image-opts`) as the interop oracle both
//! ways, and `rbd export` (the bytes as Ceph stores them) as the proof that no plaintext is
//! stored.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xdisk_rbd::testing::{cluster, rbd_ok, TestImage, POOL};

mod support;
use support::{ok_bounded as ok, run_bounded as run, s, XDISK};

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    support::tmp("xdisk-rbdenc-")
}

/// Runs xdisk expecting a failure; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = run(XDISK, args);
    assert!(!o.status.success(), "xdisk {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn xdisk(args: &[&str]) -> String {
    ok(XDISK, args)
}

/// A key file holding `passphrase` as is (no newline).
fn key_file(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, passphrase).unwrap();
    p
}

/// The rbd: name of `t` with librbd's encryption and the passphrase in `key`.
fn enc_name(t: &TestImage, format: &str, key: &Path) -> String {
    t.name_with(&format!(
        ":encrypt.format={format}:encrypt.key-file={}",
        s(key)
    ))
}

/// QEMU's `--image-opts` for `t` through its rbd driver, decrypting with secret `sec0`.
fn qemu_opts(t: &TestImage, format: &str) -> String {
    format!(
        "driver=rbd,pool={POOL},image={},conf={},encrypt.format={format},encrypt.key-secret=sec0",
        t.image,
        t.conf.display()
    )
}

fn qemu_secret(key: &Path) -> String {
    format!("secret,id=sec0,file={}", s(key))
}

/// A raw file of `size` bytes: data in some MiBs, zeroes in others.
fn source_file(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("src.raw");
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate() {
        if (i as u64 / MIB) % 3 != 1 {
            *b = (i as u8).wrapping_mul(7) ^ (i >> 12) as u8 ^ 0x5a;
        }
    }
    std::fs::write(&p, &data).unwrap();
    p
}

fn stored(conf: &Path, t: &TestImage) -> Vec<u8> {
    rbd_ok(conf, &["export", "--no-progress", &t.spec(), "-"]).stdout
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_image_xdisk_encrypts_is_read_by_qemus_rbd_driver_and_stores_no_plaintext() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let src = source_file(d.path(), 8 * MIB);
    let plain = std::fs::read(&src).unwrap();
    let key = key_file(d.path(), "key", "xdisk and qemu agree");

    // LUKS1, made and filled by convert (qemu-img's -o encrypt.* and --object spelling).
    let t = TestImage::new(conf, "encxq");
    let out = xdisk(&[
        "img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        "--object",
        &format!("secret,id=sec0,file={}", s(&key)),
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&src),
        &t.name(),
    ]);
    assert!(out.is_empty(), "{out}");
    let info = ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &qemu_secret(&key),
            "--image-opts",
            &qemu_opts(&t, "luks"),
        ],
    );
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(8 * MIB), "{info}");
    ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            &qemu_secret(&key),
            "--image-opts",
            &format!("driver=raw,file.driver=file,file.filename={}", s(&src)),
            &qemu_opts(&t, "luks"),
        ],
    );
    // Ceph stores a LUKS header and ciphertext: not one sector of the source.
    let raw = stored(conf, &t);
    assert!(raw.starts_with(b"LUKS\xba\xbe\x00\x01"));
    for at in [0usize, 2 << 20, (6 << 20) + 4096] {
        assert!(
            !contains(&raw, &plain[at..at + 512]),
            "plaintext at {at} is stored"
        );
    }

    // LUKS2 with AES-128, made by create (the passphrase named in the rbd: name), written
    // into by convert -n, then by xdisk img bench; qemu-io reads what xdisk wrote.
    let t2 = TestImage::new(conf, "encxq2");
    let name = format!(
        "{}:encrypt.cipher-alg=aes-128",
        enc_name(&t2, "luks2", &key)
    );
    let out = xdisk(&["img", "create", "-f", "raw", &name, "8M"]);
    assert!(out.starts_with("Formatting 'rbd:"), "{out}");
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
    xdisk(&["img", "compare", s(&src), &name]);
    ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            &qemu_secret(&key),
            "--image-opts",
            &format!("driver=raw,file.driver=file,file.filename={}", s(&src)),
            &qemu_opts(&t2, "luks2"),
        ],
    );
    let raw = stored(conf, &t2);
    assert!(raw.starts_with(b"LUKS\xba\xbe\x00\x02"));
    assert!(!contains(&raw, &plain[..512]), "plaintext is stored");
}

#[test]
fn an_image_qemu_encrypts_is_read_by_xdisk_and_its_snapshots_too() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let key = key_file(d.path(), "key", "made by qemu");
    for format in ["luks", "luks2"] {
        let t = TestImage::new(conf, "encqx");
        ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "raw",
                "--object",
                &qemu_secret(&key),
                "-o",
                &format!("encrypt.format={format},encrypt.key-secret=sec0"),
                &t.name(),
                "20M",
            ],
        );
        let io = |cmds: &[&str]| {
            let mut args = vec![
                "--object".to_owned(),
                qemu_secret(&key),
                "--image-opts".to_owned(),
                qemu_opts(&t, format),
            ];
            for c in cmds {
                args.push("-c".into());
                args.push((*c).into());
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ok("qemu-io", &a);
            assert!(!out.contains("fail"), "{out}");
        };
        // (QEMU 7.2 formats only images larger than the header: 16 MiB for LUKS2.)
        io(&["write -P 0xa5 1M 1M", "write -P 0x5a 19M 1M"]);
        rbd_ok(conf, &["snap", "create", &format!("{}@s1", t.spec())]);
        io(&["write -P 0x33 1M 4k"]);

        let name = enc_name(&t, format, &key);
        let info: Value =
            serde_json::from_str(&xdisk(&["img", "info", "--output=json", &name])).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(20 * MIB), "{format}");
        assert_eq!(info["encrypted"], Value::Bool(true), "{info}");
        let out = d.path().join(format!("{format}.raw"));
        xdisk(&["img", "convert", "-O", "raw", &name, s(&out)]);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, 20 * MIB);
        let m = MIB as usize;
        assert!(got[m..m + 4096].iter().all(|&b| b == 0x33), "{format}");
        assert!(got[m + 4096..2 * m].iter().all(|&b| b == 0xa5), "{format}");
        assert!(got[19 * m..].iter().all(|&b| b == 0x5a), "{format}");
        // The snapshot, with the key: as it was.
        let snap = t.name_with(&format!(
            "@s1:encrypt.format={format}:encrypt.key-file={}",
            s(&key)
        ));
        let old = d.path().join(format!("{format}-s1.raw"));
        xdisk(&["img", "convert", "-O", "raw", &snap, s(&old)]);
        let old = std::fs::read(&old).unwrap();
        assert!(old[m..2 * m].iter().all(|&b| b == 0xa5), "{format}@s1");
        // And written by xdisk, read by QEMU.
        let pat = d.path().join("pat.raw");
        std::fs::write(&pat, vec![0x77u8; 64 << 10]).unwrap();
        xdisk(&[
            "img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            s(&pat),
            &name,
        ]);
        io(&["read -P 0x77 0 64k", "read -P 0xa5 1052672 4k"]);
    }
}

#[test]
fn wrong_and_missing_keys_are_refused_clearly_and_never_show_the_secret() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let key = key_file(d.path(), "key", "the right one");
    let wrong = key_file(d.path(), "wrong", "SECRET-wrong-passphrase");
    let t = TestImage::new(conf, "encbad");
    xdisk(&[
        "img",
        "create",
        "-q",
        "-f",
        "raw",
        &enc_name(&t, "luks", &key),
        "8M",
    ]);

    let e = fails(&["img", "info", &enc_name(&t, "luks", &wrong)]);
    assert!(e.contains("wrong passphrase"), "{e}");
    assert!(!e.contains("SECRET"), "{e}");
    let e = fails(&[
        "img",
        "info",
        "--object",
        "secret,id=s9,data=SECRET-DATA",
        &t.name_with(":encrypt.format=luks:encrypt.key-secret=s9"),
    ]);
    assert!(
        e.contains("wrong passphrase") && !e.contains("SECRET"),
        "{e}"
    );
    // format=base64, as QEMU spells it: the data or the file's content decoded; the same
    // object opens the image in qemu-img too ("the right one" in base64).
    let b64 = "dGhlIHJpZ2h0IG9uZQ==";
    let b64_file = key_file(d.path(), "key.b64", &format!("{b64}\n"));
    for obj in [
        format!("secret,id=s7,data={b64},format=base64"),
        format!("secret,id=s7,file={},format=base64", s(&b64_file)),
    ] {
        let info = xdisk(&[
            "img",
            "info",
            "--object",
            &obj,
            &t.name_with(":encrypt.format=luks:encrypt.key-secret=s7"),
        ]);
        assert!(info.contains("virtual size: 8 MiB"), "{obj}: {info}");
        let qemu_obj = obj.replace("id=s7", "id=sec0");
        ok(
            "qemu-img",
            &[
                "info",
                "--object",
                &qemu_obj,
                "--image-opts",
                &qemu_opts(&t, "luks"),
            ],
        );
    }
    let e = fails(&[
        "img",
        "info",
        "--object",
        "secret,id=s6,data=SECRET*DATA,format=base64",
        &t.name_with(":encrypt.format=luks:encrypt.key-secret=s6"),
    ]);
    assert!(
        e.contains("base64 data that is not valid") && !e.contains("SECRET"),
        "{e}"
    );
    // keyid/iv, as libvirt passes secrets to QEMU: the passphrase encrypted with AES-256-CBC
    // by a 32-byte master key given first (`echo -n "the right one" | openssl enc
    // -aes-256-cbc -K 5a5a..5a -iv 0f0e..00 -base64`); qemu-img takes the same objects.
    let master = key_file(d.path(), "master.key", &"Z".repeat(32));
    let objects = [
        format!("secret,id=m0,file={},format=raw", s(&master)),
        "secret,id=s5,data=E2MPlcSpEx2u0lyj3b05rQ==,keyid=m0,iv=Dw4NDAsKCQgHBgUEAwIBAA==,format=base64"
            .to_owned(),
    ];
    let info = xdisk(&[
        "img",
        "info",
        "--object",
        &objects[0],
        "--object",
        &objects[1],
        &t.name_with(":encrypt.format=luks:encrypt.key-secret=s5"),
    ]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    ok(
        "qemu-img",
        &[
            "info",
            "--object",
            &objects[0],
            "--object",
            &objects[1].replace("id=s5", "id=sec0"),
            "--image-opts",
            &qemu_opts(&t, "luks"),
        ],
    );
    for (bad, why) in [
        ("secret,id=s9,data=SECRET-DATA,keyid=x", "keyid needs iv"),
        (
            "secret,id=s9,data=SECRET-DATA,keyid=x,iv=AAAA",
            "no secret 'x'",
        ),
        (
            "secret,id=s9,data=SECRET-DATA,keyid=m0,iv=AAAA",
            "iv of 3 bytes",
        ),
        ("secret,id=s9,data=SECRET-DATA,iv=AAAA", "iv without keyid"),
        (
            "secret,id=s9,data=SECRET-DATA,loaded=on",
            "'loaded' is not supported",
        ),
    ] {
        let e = fails(&[
            "img",
            "info",
            "--object",
            &objects[0],
            "--object",
            bad,
            &t.name(),
        ]);
        assert!(e.contains(why) && !e.contains("SECRET"), "{bad}: {e}");
    }
    let e = fails(&["img", "info", &enc_name(&t, "luks2", &key)]);
    assert!(
        e.contains("LUKS1 header") && e.contains("encrypt.format=luks)"),
        "{e}"
    );
    let e = fails(&["img", "info", &t.name_with(":encrypt.format=luks")]);
    assert!(e.contains("encrypt.key-file=PATH"), "{e}");

    // Named without the key: refused everywhere, never served as ciphertext.
    for args in [
        vec!["img", "info"],
        vec!["img", "convert", "-O", "raw"],
        vec!["img", "bench", "-c", "10"],
    ] {
        let mut a = args.clone();
        let bare = t.name();
        let out = d.path().join("out.raw");
        a.push(&bare);
        if args[1] == "convert" {
            a.push(s(&out));
        }
        let e = fails(&a);
        assert!(
            e.contains("is encrypted (it starts with a LUKS1 header)")
                && e.contains("encrypt.format=luks:encrypt.key-file=PATH")
                && e.contains("xdisk_luks=raw"),
            "{args:?}: {e}"
        );
    }
    let e = fails(&[
        "bench",
        &format!("--filename={}", t.name()),
        "--format=raw",
        "--size=1M",
        "--number_ios=10",
    ]);
    assert!(e.contains("is encrypted"), "{e}");
    // As stored, when asked: the bytes rbd export reads.
    let out = d.path().join("stored.raw");
    xdisk(&[
        "img",
        "convert",
        "-O",
        "raw",
        &t.name_with(":xdisk_luks=raw"),
        s(&out),
    ]);
    assert!(std::fs::read(&out).unwrap() == stored(conf, &t));

    // qcow2 in an encrypted RBD image: refused (qcow2's own encryption is what -o encrypt.*
    // means with -f qcow2), and nothing is left behind.
    let q = TestImage::new(conf, "encq");
    let e = fails(&[
        "img",
        "create",
        "-f",
        "qcow2",
        "--object",
        &format!("secret,id=sec0,file={}", s(&key)),
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &q.name(),
        "8M",
    ]);
    assert!(e.contains("qcow2's own encryption"), "{e}");
    let e = fails(&[
        "img",
        "create",
        "-f",
        "qcow2",
        &enc_name(&q, "luks", &key),
        "8M",
    ]);
    assert!(e.contains("raw images only"), "{e}");
    assert!(!xdisk_rbd::testing::rbd(conf, &["info", &q.spec()])
        .status
        .success());
    // A missing secret id, a secret for a file that is not on RBD.
    let e = fails(&[
        "img",
        "create",
        "-f",
        "raw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
        &q.name(),
        "8M",
    ]);
    assert!(e.contains("--object secret,id=nosuch"), "{e}");
    assert!(!xdisk_rbd::testing::rbd(conf, &["info", &q.spec()])
        .status
        .success());
    let e = fails(&[
        "img",
        "create",
        "-f",
        "raw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s",
        s(&d.path().join("local.raw")),
        "8M",
    ]);
    assert!(e.contains("images on RBD only"), "{e}");
}

/// The ring (`xdisk bench --verify`), `xdisk nbd` and the daemon (`xdisk attach`) serve an
/// encrypted image decrypted; `xdisk stat` shows its name without the passphrase.
#[test]
fn xdisk_bench_nbd_and_the_daemon_serve_encrypted_rbd_disks() {
    let Some(conf) = cluster() else { return };
    let d = tmp();
    let key = key_file(d.path(), "key", "PASSPHRASE-of-the-disk");
    let t = TestImage::new(conf, "encserve");
    let name = enc_name(&t, "luks", &key);
    xdisk(&["img", "create", "-q", "-f", "raw", &name, "32M"]);
    // The ring with the passphrase as an --object (qemu-img's spelling), as `xdisk nbd` below.
    let object = format!("secret,id=k0,file={}", s(&key));
    let by_secret = t.name_with(":encrypt.format=luks:encrypt.key-secret=k0");
    let out = xdisk(&[
        "bench",
        "--object",
        &object,
        &format!("--filename={by_secret}"),
        "--format=raw",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--number_ios=800",
        "--verify=crc32c",
        "--output-format=json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let x = &v["jobs"][0]["xdisk"];
    assert_eq!(x["verify_mismatches"].as_u64(), Some(0), "{x}");
    assert_eq!(x["backend_errors"].as_u64(), Some(0), "{x}");
    assert!(x["verified_blocks"].as_u64().unwrap() > 0, "{x}");

    // QEMU writes a pattern; xdisk nbd serves the image decrypted; qemu-io reads it over NBD.
    ok(
        "qemu-io",
        &[
            "--object",
            &qemu_secret(&key),
            "--image-opts",
            &qemu_opts(&t, "luks"),
            "-c",
            "write -P 0x6b 20M 1M",
        ],
    );
    let sock = d.path().join("nbd.sock");
    let mut server = Command::new(XDISK)
        .args([
            "nbd",
            "--object",
            &object,
            "-f",
            "raw",
            "-x",
            "disk",
            "-k",
            s(&sock),
        ])
        .arg(&by_secret)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    let r = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 0x6b 20M 1M"],
    );
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    let rout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && !rout.contains("fail"),
        "{rout}{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // A Xen disk on the simulation.
    let ctl = d.path().join("control.sock");
    let serve = Command::new(XDISK)
        .args(["serve", "--platform=sim", "--control", s(&ctl)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ctl.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = run(
        XDISK,
        &[
            "attach",
            "--format",
            "raw",
            &name,
            "--control",
            s(&ctl),
            "--timeout",
            "60",
        ],
    );
    let stat = run(XDISK, &["stat", "xvda", "--json", "--control", s(&ctl)]);
    let detach = run(XDISK, &["detach", "xvda", "--control", s(&ctl)]);
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let served = serve.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && out.contains("Connected"),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let stat = String::from_utf8_lossy(&stat.stdout);
    let v: Value = serde_json::from_str(&stat).unwrap_or_else(|e| panic!("{e}: {stat}"));
    assert_eq!(v[0]["size"].as_u64(), Some(32 * MIB), "{v}");
    assert!(v[0]["counters"]["rd_req"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v[0]["image"]
            .as_str()
            .unwrap()
            .contains("encrypt.format=luks"),
        "{v}"
    );
    assert!(detach.status.success());
    for text in [
        stat.as_ref(),
        out.as_ref(),
        &String::from_utf8_lossy(&served.stderr),
    ] {
        assert!(
            !text.contains("PASSPHRASE"),
            "the passphrase leaked: {text}"
        );
    }
}
