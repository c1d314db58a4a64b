//! Passphrases of librbd's LUKS encryption: read from a file (`encrypt.key-file=PATH` in an
//! `rbd:` name) or registered by the command line (`xdisk img --object secret,id=ID,...`,
//! named by `encrypt.key-secret=ID`). Never printed (their `Debug` hides them), zeroed when
//! dropped.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};

/// The longest passphrase read (cryptsetup's own limit for key files is 8 MiB; a LUKS
/// passphrase is a few dozen bytes).
pub const MAX_PASSPHRASE: usize = 64 << 10;

/// A passphrase, as bytes (the whole file, a trailing newline included, as QEMU's `secret`
/// objects and cryptsetup's `--key-file` read one).
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    /// A passphrase of these bytes; empty ones are refused.
    pub fn new(bytes: Vec<u8>) -> Result<Passphrase, String> {
        if bytes.is_empty() {
            return Err("an empty passphrase".into());
        }
        if bytes.len() > MAX_PASSPHRASE {
            return Err(format!("a passphrase longer than {MAX_PASSPHRASE} bytes"));
        }
        Ok(Passphrase(bytes))
    }

    /// The whole content of the file at `path`.
    pub fn from_file(path: &str) -> Result<Passphrase, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let why = |e: std::io::Error| format!("cannot read the passphrase file {path}: {e}");
        // Non-blocking, and a regular file only: a FIFO or a device named here must not hang
        // the open of a disk (the rule backing files follow too).
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(why)?;
        if !f.metadata().map_err(why)?.is_file() {
            return Err(format!("the passphrase file {path} is not a regular file"));
        }
        let mut bytes = Vec::new();
        f.take(MAX_PASSPHRASE as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(why)?;
        Passphrase::new(bytes).map_err(|e| format!("the passphrase file {path} holds {e}"))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The passphrase that `text` encodes in base64 (QEMU's `secret` objects with
    /// `format=base64`): the standard alphabet, `=` padding at the end only, newlines
    /// ignored (QEMU accepts those characters and no others). The text is consumed and
    /// zeroed; messages never show it.
    pub fn from_base64(mut text: Vec<u8>) -> Result<Passphrase, String> {
        let r = decode_base64(&text);
        text.fill(0);
        std::hint::black_box(&text);
        let bytes = r.map_err(|why| format!("base64 data that is not valid: {why}"))?;
        Passphrase::new(bytes)
    }
}

/// Standard base64 (RFC 4648 section 4) with `\n` ignored; the last group may be padded
/// with `=` or left short (as glib's decoder, which QEMU uses, accepts).
fn decode_base64(text: &[u8]) -> Result<Vec<u8>, &'static str> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
    let (mut acc, mut n, mut pad) = (0u32, 0u32, 0u32);
    for &c in text {
        match c {
            b'\n' => continue,
            b'=' => pad += 1,
            _ if pad > 0 => return Err("characters after the '=' padding"),
            _ => {
                let v = value(c).ok_or("a character outside the base64 alphabet")?;
                acc = (acc << 6) | v;
                n += 1;
                if n == 4 {
                    out.extend_from_slice(&acc.to_be_bytes()[1..]);
                    acc = 0;
                    n = 0;
                }
            }
        }
    }
    // What is left: 0, 2 or 3 characters (1 cannot encode a byte), padded to 4 or not.
    match (n, pad) {
        (0, 0) => {}
        (2, 0 | 2) => out.push((acc >> 4) as u8),
        (3, 0 | 1) => out.extend_from_slice(&((acc >> 2) as u16).to_be_bytes()),
        _ => return Err("a length or padding that is not base64's"),
    }
    Ok(out)
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keep the zeroing from being optimised away as a dead store.
        std::hint::black_box(&self.0);
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<hidden>)")
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Passphrase>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<Passphrase>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers the passphrase of secret `id` for this process (`--object secret,id=ID,...`),
/// for names that say `encrypt.key-secret=ID`. A second registration of an id replaces the
/// first.
pub fn register_secret(id: &str, passphrase: Passphrase) {
    crate::storage::lock(registry()).insert(id.to_owned(), Arc::new(passphrase));
}

/// The passphrase registered as `id`.
pub fn secret(id: &str) -> Option<Arc<Passphrase>> {
    crate::storage::lock(registry()).get(id).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_device_as_passphrase_file_is_refused_without_hanging() {
        let dir = std::env::temp_dir().join(format!("xdisk-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("key.fifo");
        let _ = std::fs::remove_file(&fifo);
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let e = Passphrase::from_file(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Passphrase::from_file("/dev/zero").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let key = dir.join("key");
        std::fs::write(&key, b"pw\n").unwrap();
        let p = Passphrase::from_file(key.to_str().unwrap()).unwrap();
        assert_eq!(p.as_bytes(), b"pw\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn base64_secrets_decode_as_qemus_and_bad_ones_say_why_without_showing_them() {
        let ok = |t: &str| Passphrase::from_base64(t.as_bytes().to_vec()).map(|p| p.0.clone());
        assert_eq!(ok("aHVudGVyMg==").unwrap(), b"hunter2");
        assert_eq!(
            ok("aHVudGVyMg").unwrap(),
            b"hunter2",
            "padding may be left out"
        );
        assert_eq!(
            ok("aHVu\ndGVy\nMg==\n").unwrap(),
            b"hunter2",
            "newlines are ignored"
        );
        assert_eq!(ok("aHVudA==").unwrap(), b"hunt");
        assert_eq!(ok("aHVudGU=").unwrap(), b"hunte");
        assert_eq!(ok("aHVudGVy").unwrap(), b"hunter");
        assert_eq!(ok("/+/+").unwrap(), [0xff, 0xef, 0xfe]);
        for bad in [
            "aHVu dGVy",
            "aHVudGVyMg=x",
            "aHVudGVyM",
            "a===",
            "aHVu-A==",
            "",
        ] {
            let e = ok(bad).unwrap_err();
            assert!(e.contains("base64") || e.contains("empty"), "{bad:?}: {e}");
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        // Every byte string round-trips through an encoder written the obvious way.
        let enc = |b: &[u8]| {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for c in b.chunks(3) {
                let v = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |a, (i, &x)| a | u32::from(x) << (16 - 8 * i));
                for i in 0..=c.len() {
                    s.push(A[(v >> (18 - 6 * i) & 63) as usize] as char);
                }
                s.push_str(&"=="[..3 - c.len()]);
            }
            s
        };
        for len in 1..40usize {
            let b: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            assert_eq!(ok(&enc(&b)).unwrap(), b, "{len}");
        }
    }

    #[test]
    fn passphrases_are_never_shown_and_files_are_read_whole() {
        let p = Passphrase::new(b"hunter2".to_vec()).unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(Passphrase::new(Vec::new()).is_err());
        let dir = std::env::temp_dir().join(format!("xdisk-pass-{}", std::process::id()));
        std::fs::write(&dir, b"pw\n").unwrap();
        let f = Passphrase::from_file(dir.to_str().unwrap()).unwrap();
        assert_eq!(f.as_bytes(), b"pw\n");
        std::fs::write(&dir, b"").unwrap();
        let e = Passphrase::from_file(dir.to_str().unwrap()).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        std::fs::remove_file(&dir).unwrap();
        let e = Passphrase::from_file("/nonexistent/xdisk-key").unwrap_err();
        assert!(e.contains("/nonexistent/xdisk-key"), "{e}");
        register_secret("t0", p.clone());
        assert_eq!(secret("t0").as_deref(), Some(&p));
        assert!(secret("t1").is_none());
    }
}
