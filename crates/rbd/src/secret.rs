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
