//! librbd's LUKS encryption (`encrypt.format=luks|luks2` with `encrypt.key-file=PATH` in an
//! `rbd:` name) through RbdStorage on the real (throwaway) cluster, with `rbd export` (the
//! bytes as stored) and `rbd info` as the oracles. QEMU's driver reading what xdisk wrote,
//! and the reverse, is in `crates/cli/tests/rbd_encrypt.rs`.

use std::path::{Path, PathBuf};

use xdisk_io::{Allocation, CacheMode, Storage};
use xdisk_rbd::testing::{cluster, rbd_ok, unique, TestImage};
use xdisk_rbd::{Error, RbdName, RbdStorage};

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ (i >> 9) as u8)
        .collect()
}

/// A key file that removes itself.
struct KeyFile(PathBuf);

impl KeyFile {
    fn new(passphrase: &[u8]) -> KeyFile {
        let p = std::env::temp_dir().join(unique("xdisk-rbd-key"));
        std::fs::write(&p, passphrase).unwrap();
        KeyFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn encrypted(t: &TestImage, format: &str, key: &KeyFile) -> RbdName {
    RbdName::parse(&t.name_with(&format!(
        ":encrypt.format={format}:encrypt.key-file={}",
        key.path()
    )))
    .unwrap()
}

fn export(conf: &Path, spec: &str) -> Vec<u8> {
    rbd_ok(conf, &["export", "--no-progress", spec, "-"]).stdout
}

fn rbd_size(conf: &Path, spec: &str) -> u64 {
    let out = rbd_ok(conf, &["info", "--format=json", spec]).stdout;
    let s = String::from_utf8_lossy(&out);
    let at = s.find("\"size\":").unwrap() + 7;
    s[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn luks_images_hold_the_size_asked_read_back_plaintext_and_store_ciphertext() {
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"correct horse battery staple");
    for (format, cipher, size) in [
        ("luks", "", 3 * MIB),
        ("luks2", ":encrypt.cipher-alg=aes-128", 20 * MIB + 512),
    ] {
        let t = TestImage::new(conf, "enc");
        let mut n = encrypted(&t, format, &key);
        if !cipher.is_empty() {
            n = RbdName::parse(&format!("{}{cipher}", n.to_spec())).unwrap();
        }
        RbdStorage::create(&n, size).unwrap();
        // The stored image is larger by its LUKS header; the plaintext is the size asked.
        let stored = rbd_size(conf, &t.spec());
        assert!(stored > size, "{format}: stored {stored}");
        let data = pattern(0x3c, MIB as usize);
        {
            let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
            assert_eq!(s.size().unwrap(), size, "{format}");
            s.write_at(&data, MIB).unwrap();
            s.write_at(b"the end", size - 7).unwrap();
            s.write_zeroes(MIB, 4096).unwrap();
            s.flush().unwrap();
        }
        // Opened again (a new librbd handle): the plaintext.
        let s = RbdStorage::open(&n, true, CacheMode::WriteBack).unwrap();
        assert_eq!(s.size().unwrap(), size);
        let mut back = vec![0u8; MIB as usize];
        s.read_at(&mut back, MIB).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "{format}: zeroed");
        assert!(back[4096..] == data[4096..], "{format}: plaintext differs");
        let mut tail = [0u8; 7];
        s.read_at(&mut tail, size - 7).unwrap();
        assert_eq!(&tail, b"the end");
        // Never written, in an object never written (LUKS2: MiB 12-16 of the plaintext are
        // the stored image's 8th object): zeroes, as in a plain image. (Unwritten parts of
        // written objects read as decrypted zeroes, i.e. noise, in librbd 16.)
        if size > 16 * MIB {
            let mut hole = vec![0xffu8; 4096];
            s.read_at(&mut hole, 12 * MIB).unwrap();
            assert!(
                hole.iter().all(|&b| b == 0),
                "{format}: unwritten reads zeroes"
            );
        }
        // What Ceph stores: a LUKS header, and no plaintext anywhere.
        let raw = export(conf, &t.spec());
        assert_eq!(raw.len() as u64, stored);
        assert!(raw.starts_with(b"LUKS\xba\xbe"), "{format}");
        assert!(
            !contains(&raw, &data[4096..4096 + 512]),
            "{format}: plaintext stored"
        );
        assert!(!contains(&raw, b"the end"), "{format}: plaintext stored");
    }
}

#[test]
fn a_wrong_passphrase_the_wrong_luks_version_and_a_plain_image_are_refused_clearly() {
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"right");
    let wrong = KeyFile::new(b"wrong-SECRET-passphrase");
    let t = TestImage::new(conf, "encbad");
    RbdStorage::create(&encrypted(&t, "luks", &key), 4 * MIB).unwrap();

    let e = RbdStorage::open(&encrypted(&t, "luks", &wrong), true, CacheMode::WriteBack)
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong passphrase"), "{e}");
    assert!(!e.contains("SECRET"), "{e}");
    let e = RbdStorage::open(&encrypted(&t, "luks2", &key), true, CacheMode::WriteBack)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("LUKS1 header") && e.contains("encrypt.format=luks)"),
        "{e}"
    );
    let missing = RbdName::parse(
        &t.name_with(":encrypt.format=luks:encrypt.key-file=/nonexistent/xdisk-key"),
    )
    .unwrap();
    let e = RbdStorage::open(&missing, true, CacheMode::WriteBack).unwrap_err();
    assert!(matches!(e, Error::Encryption { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/xdisk-key"), "{e}");
    let secret =
        RbdName::parse(&t.name_with(":encrypt.format=luks:encrypt.key-secret=nosuch")).unwrap();
    let e = RbdStorage::open(&secret, true, CacheMode::WriteBack)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--object secret,id=nosuch"), "{e}");

    // An image that is not encrypted.
    let plain = TestImage::new(conf, "encplain");
    RbdStorage::create(&RbdName::parse(&plain.name()).unwrap(), 4 * MIB).unwrap();
    let e = RbdStorage::open(&encrypted(&plain, "luks", &key), true, CacheMode::WriteBack)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no LUKS header"), "{e}");
    // Creating on a snapshot name is refused before anything is made.
    let snap = RbdName::parse(&plain.name_with(&format!(
        "@s:encrypt.format=luks:encrypt.key-file={}",
        key.path()
    )))
    .unwrap();
    assert!(RbdStorage::create(&snap, 4 * MIB).is_err());
}

#[test]
fn an_encrypted_image_opened_without_its_key_is_refused_unless_xdisk_luks_raw() {
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"pw");
    for format in ["luks", "luks2"] {
        let t = TestImage::new(conf, "encnokey");
        RbdStorage::create(&encrypted(&t, format, &key), 4 * MIB).unwrap();
        let bare = RbdName::parse(&t.name()).unwrap();
        for read_only in [true, false] {
            let e = RbdStorage::open(&bare, read_only, CacheMode::WriteBack).unwrap_err();
            assert!(matches!(e, Error::Encrypted { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("is encrypted")
                    && msg.contains(&format!("encrypt.format={format}:encrypt.key-file=PATH"))
                    && msg.contains("xdisk_luks=raw"),
                "{msg}"
            );
        }
        // As stored: the LUKS header and ciphertext (a guest's own LUKS volume reads so).
        let raw = RbdName::parse(&t.name_with(":xdisk_luks=raw")).unwrap();
        let s = RbdStorage::open(&raw, true, CacheMode::WriteBack).unwrap();
        assert_eq!(s.size().unwrap(), rbd_size(conf, &t.spec()));
        let mut head = [0u8; 6];
        s.read_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"LUKS\xba\xbe");
    }
}

#[test]
fn resizing_an_encrypted_image_sets_its_plaintext_size() {
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"pw");
    let t = TestImage::new(conf, "encresize");
    let n = encrypted(&t, "luks", &key);
    RbdStorage::create(&n, 8 * MIB).unwrap();
    let header = rbd_size(conf, &t.spec()) - 8 * MIB;
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    s.set_size(12 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 12 * MIB);
    assert_eq!(rbd_size(conf, &t.spec()), 12 * MIB + header);
    // A write past the end grows it (as QEMU's driver does), to the plaintext's end.
    s.write_at(b"grown", 13 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 13 * MIB + 5);
    s.set_size(5 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 5 * MIB);
    assert_eq!(rbd_size(conf, &t.spec()), 5 * MIB + header);
    drop(s);
    let s = RbdStorage::open(&n, true, CacheMode::WriteBack).unwrap();
    assert_eq!(s.size().unwrap(), 5 * MIB);
}

#[test]
fn snapshots_of_encrypted_images_read_their_plaintext() {
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"pw");
    let t = TestImage::new(conf, "encsnap");
    let n = encrypted(&t, "luks2", &key);
    RbdStorage::create(&n, 4 * MIB).unwrap();
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    s.write_at(b"before", 0).unwrap();
    s.flush().unwrap();
    s.create_snapshot("s1").unwrap();
    s.write_at(b"after!", 0).unwrap();
    s.flush().unwrap();
    let at = RbdName::parse(&t.name_with(&format!(
        "@s1:encrypt.format=luks2:encrypt.key-file={}",
        key.path()
    )))
    .unwrap();
    assert!(matches!(
        RbdStorage::open(&at, false, CacheMode::WriteBack),
        Err(Error::SnapshotReadOnly(_))
    ));
    let snap = RbdStorage::open(&at, true, CacheMode::WriteBack).unwrap();
    assert_eq!(snap.size().unwrap(), 4 * MIB);
    let mut b = [0u8; 6];
    snap.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"before");
    // Without the key, the snapshot is refused like the image.
    let bare = RbdName::parse(&t.name_with("@s1")).unwrap();
    assert!(matches!(
        RbdStorage::open(&bare, true, CacheMode::WriteBack),
        Err(Error::Encrypted { .. })
    ));
}

#[test]
fn block_status_of_an_encrypted_image_is_all_data() {
    // librbd 16's diff reports the stored image's objects (the header first), not the
    // plaintext's: trusting it would map data written at 8M as a hole.
    let Some(conf) = cluster() else { return };
    let key = KeyFile::new(b"pw");
    let t = TestImage::new(conf, "encmap");
    let n = encrypted(&t, "luks2", &key);
    RbdStorage::create(&n, 32 * MIB).unwrap();
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    s.write_at(&pattern(1, 65536), 8 * MIB).unwrap();
    s.flush().unwrap();
    assert_eq!(
        s.allocation(0, 32 * MIB),
        Allocation::Data { len: 32 * MIB }
    );
    assert_eq!(s.allocation(8 * MIB, 4096), Allocation::Data { len: 4096 });
}
