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

impl Passphrase {
    /// The passphrase that `input` holds encrypted (QEMU's `secret` objects with
    /// `keyid=MASTER,iv=IV`, as libvirt passes them): AES-256-CBC with `master`'s 32 bytes
    /// as the key and the 16 bytes that `iv_base64` encodes as the IV, over `input` (itself
    /// base64 with `base64`, else the ciphertext as is); the padding is taken off as QEMU
    /// does (the last byte counts it, at most 16). Messages never show the data.
    pub fn decrypt(
        master: &Passphrase,
        iv_base64: &str,
        mut input: Vec<u8>,
        base64: bool,
    ) -> Result<Passphrase, String> {
        use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, KeyIvInit};
        let key: &[u8; 32] = master.0.as_slice().try_into().map_err(|_| {
            format!(
                "a master key of {} bytes (AES-256 needs 32)",
                master.0.len()
            )
        })?;
        let iv = decode_base64(iv_base64.as_bytes())
            .map_err(|why| format!("an iv that is not valid base64: {why}"))?;
        let iv: [u8; 16] = iv
            .as_slice()
            .try_into()
            .map_err(|_| format!("an iv of {} bytes (it must be 16)", iv.len()))?;
        let mut data = if base64 {
            let d = decode_base64(&input);
            input.fill(0);
            d.map_err(|why| format!("base64 data that is not valid: {why}"))?
        } else {
            std::mem::take(&mut input)
        };
        let r = cbc::Decryptor::<aes::Aes256>::new(key.into(), &iv.into())
            .decrypt_padded_mut::<NoPadding>(&mut data)
            .map(<[u8]>::len)
            .map_err(|_| {
                format!(
                    "encrypted data of {} bytes (AES-CBC needs a multiple of 16)",
                    data.len()
                )
            });
        let plain = match r {
            Ok(n) if n > 0 => {
                let pad = usize::from(data[n - 1]);
                if pad > 16 || pad > n {
                    Err(format!(
                        "{pad} padding bytes after decryption (a wrong key or iv?)"
                    ))
                } else {
                    Ok(data[..n - pad].to_vec())
                }
            }
            Ok(_) => Err("no encrypted data".to_owned()),
            Err(e) => Err(e),
        };
        data.fill(0);
        std::hint::black_box(&data);
        Passphrase::new(plain?)
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

    /// Vectors made with `openssl enc -aes-256-cbc -K <hex key> -iv <hex iv> -base64`.
    #[test]
    fn secrets_encrypted_with_a_master_key_decrypt_as_qemus() {
        let master = Passphrase::new(vec![0x42; 32]).unwrap();
        let iv = "AAECAwQFBgcICQoLDA0ODw==";
        // echo -n hunter2 | openssl enc -aes-256-cbc -K 4242..42 -iv 000102..0f -base64
        const VECTOR_HUNTER2: &str = "vLILpoMIzE6EH6rTD4UYfQ==";
        let dec = |ct: &str, b64: bool| {
            Passphrase::decrypt(&master, iv, ct.as_bytes().to_vec(), b64).map(|p| p.0.clone())
        };
        assert_eq!(dec(VECTOR_HUNTER2, true).unwrap(), b"hunter2");
        let e = dec(VECTOR_HUNTER2, false).unwrap_err();
        assert!(e.contains("multiple of 16"), "{e}");
        let short = Passphrase::new(vec![1; 16]).unwrap();
        let e = Passphrase::decrypt(&short, iv, b"x".to_vec(), false).unwrap_err();
        assert!(e.contains("32"), "{e}");
        let e = Passphrase::decrypt(&master, "AAEC", b"x".to_vec(), false).unwrap_err();
        assert!(e.contains("iv of 3 bytes"), "{e}");
        let other = Passphrase::new(vec![0x43; 32]).unwrap();
        if let Err(e) = Passphrase::decrypt(&other, iv, VECTOR_HUNTER2.as_bytes().to_vec(), true) {
            assert!(e.contains("padding") && !e.contains("hunter2"), "{e}");
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
