//! `xdisk backup`: a point-in-time view of a running device's disk, exported over NBD while
//! the guest goes on writing (issue #14).
//!
//! Start (one pause of the device's queues, like a snapshot): the named bitmap's bits are
//! copied as they are (the export's `qemu:dirty-bitmap:NAME` context), a temporary
//! persistent bitmap `xdisk-backup-<pid>-<n>` is added to record the writes from the instant
//! on (so that `--finish --clear-bitmap` can leave NAME holding exactly those), the optional
//! `--new-bitmap` is added, and the copy-before-write observer
//! ([`xdisk_image::cbw::CopyBeforeWrite`]) is installed on the top image; the queues resume
//! and an NBD server serves the view ([`xdisk_image::cbw::BackupView`] as a raw image,
//! read-only) on its own threads. The scratch file holding the old data the guest overwrites
//! is unlinked as soon as it is created: nothing is left of it whatever happens to the
//! daemon.
//!
//! Finish (`--finish`, `xdisk job complete`, `xdisk job cancel`, the device or the daemon
//! stopping): the NBD server stops first (no reader sees the image without the observer),
//! then, with the queues paused, the observer is removed and the bitmaps settled: NAME kept
//! as it is (its old bits and every write since: nothing lost if the backup is not used), or
//! with `--clear-bitmap` cleared and merged from the temporary bitmap; the temporary bitmap
//! goes. A daemon killed meanwhile leaves the temporary bitmap `in_use` in the image: a
//! daemon opening the image removes it (as the other jobs' bitmaps), NAME still holds every
//! write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xdisk_image::cbw::CopyBeforeWrite;
use xdisk_image::{CacheMode, Format, Image, OpenOptions};
use xdisk_nbd_server::{Export, Listener, ServeOptions, Server, ServerConfig};

use super::{is_job_bitmap, lock, Entry, Supervisor};
use crate::control::{BackupReply, BackupRequest};
use crate::error::{Error, Result};
use crate::jobs::{Job, JobInfo, JobKind, Outcome};

/// Names of the temporary bitmaps of backups (`xdisk-backup-<pid>-<n>`), reserved and
/// cleaned up as [`super::JOB_BITMAP_PREFIX`]'s.
pub const BACKUP_BITMAP_PREFIX: &str = "xdisk-backup-";

/// The copy-before-write granule: 64 KiB, QEMU's default cluster of its backup job (a write
/// to a granule not saved yet waits for one 64 KiB read and write).
const GRANULARITY: u64 = 64 << 10;

/// NBD clients of the export served at once.
const MAX_CLIENTS: usize = 8;

/// A running backup, as its device's entry holds it (for `--finish`).
pub(super) struct BackupCtl {
    job: Arc<Job>,
    clear: AtomicBool,
}

/// Where the export listens, from its URI.
fn listener_of(uri: &str) -> Result<(Listener, String, Option<PathBuf>)> {
    use xdisk_nbd_client::{NbdUri, Transport};
    let u = NbdUri::parse(uri).map_err(|e| Error::Invalid(format!("--export {uri:?}: {e}")))?;
    if u.tls.is_some() {
        return Err(Error::Unsupported(format!(
            "--export {uri:?}: TLS exports (nbds://) are not supported by xdisk backup yet"
        )));
    }
    let name = if u.export.is_empty() {
        "backup".to_owned()
    } else {
        u.export.clone()
    };
    match &u.transport {
        Transport::Unix { path } => {
            if !path.is_absolute() {
                return Err(Error::Invalid(format!(
                    "--export {uri:?}: the socket path must be absolute"
                )));
            }
            crate::control::check_socket_path(path)?;
            let l = Listener::unix(path.clone())
                .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
            Ok((l, name, Some(path.clone())))
        }
        Transport::Tcp { host, port } => {
            let l = Listener::tcp(host, *port)
                .map_err(|e| Error::io(format!("cannot listen on {host}:{port}"), e))?;
            Ok((l, name, None))
        }
    }
}

/// The scratch file in `dir`: created (a new file, mode 0600: it holds guest data), opened
/// without O_DIRECT, unlinked at once (its space goes when the backup ends, or with the
/// process).
fn scratch_in(dir: &Path, size: u64) -> Result<xdisk_image::StorageRef> {
    use std::os::unix::fs::OpenOptionsExt;
    static N: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        ".xdisk-backup-{}-{}.scratch",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            Error::io(
                format!("cannot create the scratch file {}", path.display()),
                e,
            )
        })?;
    let f = xdisk_image::ImageFile::open(&path, false, CacheMode::WriteBack);
    let _ = std::fs::remove_file(&path);
    let f = f.map_err(|e| Error::Invalid(format!("scratch file {}: {e}", path.display())))?;
    f.set_len(size).map_err(|e| {
        Error::io(
            format!("cannot size the scratch file {}", path.display()),
            e,
        )
    })?;
    Ok(Arc::new(f))
}

impl Supervisor {
    /// Starts a backup of a running device (see [`crate::control::ControlRequest::Backup`]
    /// and the module's documentation).
    pub fn backup(&self, query: &str, req: &BackupRequest) -> Result<JobInfo> {
        for n in [&req.bitmap, &req.new_bitmap].into_iter().flatten() {
            if n.is_empty() || is_job_bitmap(n) {
                return Err(Error::Invalid(format!(
                    "bitmap {n:?}: empty, or a name reserved for the jobs' temporary bitmaps"
                )));
            }
        }
        if req.bitmap.is_some() && req.bitmap == req.new_bitmap {
            return Err(Error::Invalid(
                "--new-bitmap must differ from --bitmap".into(),
            ));
        }
        let entry = self.find(query)?;
        let one = lock(&entry.live);
        Self::no_job(&entry)?;
        let (handle, spec, _) = Self::running(&entry)?;
        let name = entry.key.name();
        let top = handle.image();
        let size = top.size();
        let writable = !spec.read_only && !top.read_only();
        // Bitmaps need a qcow2 top holding them.
        let mut gran = None;
        if req.bitmap.is_some() || req.new_bitmap.is_some() {
            let q = top.as_qcow2().ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name}: its image is {}: --bitmap and --new-bitmap need a qcow2 top \
                     (a backup without --bitmap is a full one)",
                    top.format()
                ))
            })?;
            let list = q.bitmaps();
            if let Some(b) = &req.bitmap {
                let info = list.iter().find(|i| &i.name == b).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{name}: no bitmap {b:?} in its top image (xdisk bitmap list {name})"
                    ))
                })?;
                if info.inconsistent {
                    return Err(Error::Invalid(format!(
                        "{name}: bitmap {b:?} is inconsistent (its last writer did not store \
                         it): it cannot say what changed; remove it and take a full backup"
                    )));
                }
                gran = Some(info.granularity);
            }
            if let Some(b) = &req.new_bitmap {
                if list.iter().any(|i| &i.name == b) {
                    return Err(Error::Invalid(format!(
                        "{name}: a bitmap {b:?} exists already"
                    )));
                }
                if !writable {
                    return Err(Error::Invalid(format!(
                        "{name} is served read-only: no bitmap can be added"
                    )));
                }
            }
        }
        let scratch_dir = match (&req.scratch, listener_path_of(&req.export)) {
            (Some(d), _) => PathBuf::from(d),
            (None, Some(sock)) => sock
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir),
            (None, None) => std::env::temp_dir(),
        };
        if !scratch_dir.is_absolute() {
            return Err(Error::Invalid(format!(
                "--scratch {}: an absolute directory, please",
                scratch_dir.display()
            )));
        }
        let scratch = scratch_in(&scratch_dir, size)?;
        let cbw = CopyBeforeWrite::new(size, GRANULARITY, scratch)
            .map_err(|e| Error::Device(format!("backup of {name}: {e}")))?;
        let view = Image::open_on(
            cbw.view(top.clone()),
            &OpenOptions {
                format: Some(Format::Raw),
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| Error::Device(format!("backup of {name}: {e}")))?;
        let (listener, export_name, sock) = listener_of(&req.export)?;
        let remove_sock = |sock: &Option<PathBuf>| {
            if let Some(p) = sock {
                let _ = std::fs::remove_file(p);
            }
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let temp = (writable && req.bitmap.is_some()).then(|| {
            format!(
                "{BACKUP_BITMAP_PREFIX}{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )
        });
        // The instant: with the queues paused, the bitmap's bits, the temporary and new
        // bitmaps, the observer.
        let frozen = Arc::new(Mutex::new(None));
        let started = std::time::Instant::now();
        {
            let (frozen, bitmap, temp, new_bitmap, cbw) = (
                frozen.clone(),
                req.bitmap.clone(),
                temp.clone(),
                req.new_bitmap.clone(),
                cbw.clone(),
            );
            let op: xdisk_backend::QuiesceFn = Box::new(move |img: &Arc<Image>| {
                if let Some(b) = &bitmap {
                    let q = img.as_qcow2().ok_or_else(|| {
                        xdisk_backend::Error::Live("the top image changed".into())
                    })?;
                    *lock(&frozen) = Some(q.bitmap(b)?);
                }
                let mut added: Vec<String> = Vec::new();
                let mut add = |n: &str| -> xdisk_backend::Result<()> {
                    let q = img.as_qcow2().ok_or_else(|| {
                        xdisk_backend::Error::Live("the top image changed".into())
                    })?;
                    q.add_bitmap(n, gran, true)?;
                    added.push(n.to_owned());
                    Ok(())
                };
                let r = temp
                    .iter()
                    .chain(new_bitmap.iter())
                    .try_for_each(|n| add(n));
                if let Err(e) = r {
                    if let Some(q) = img.as_qcow2() {
                        for n in &added {
                            let _ = q.remove_bitmap(n);
                        }
                    }
                    return Err(e);
                }
                img.set_write_observer(Some(cbw));
                Ok(None)
            });
            if let Err(e) = handle.quiesce(op) {
                drop(listener);
                remove_sock(&sock);
                return Err(Error::Device(format!("backup of {name}: {e}")));
            }
        }
        let paused_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let frozen = lock(&frozen).take();
        let dirty_bytes = frozen.as_ref().map(|b| b.dirty_bytes());
        let mut cfg = ServerConfig::new(vec![Export {
            name: export_name,
            description: format!("xdisk backup of {name}"),
            image: view,
            read_only: true,
            bitmaps: match (&req.bitmap, frozen) {
                (Some(n), Some(b)) => vec![(n.clone(), Arc::new(b))],
                _ => Vec::new(),
            },
        }]);
        // Reads go to the slow path (the view has no fd): enough workers per connection
        // for a client's parallel reads.
        cfg.queue.slow_threads = 4;
        let server = Server::new(
            Arc::new(cfg),
            vec![listener],
            ServeOptions {
                max_connections: MAX_CLIENTS,
                persistent: true,
            },
        );
        let stop = server.stop_flag();
        let report = BackupReply {
            device: name.clone(),
            export: req.export.clone(),
            bitmap: req.bitmap.clone(),
            dirty_bytes,
            new_bitmap: req.new_bitmap.clone(),
            granularity: GRANULARITY,
            saved_bytes: 0,
            paused_us,
            broken: None,
            cleared: false,
        };
        let job = self.inner.jobs.create(JobKind::Backup, &name, 0, size);
        job.set_progress(0, Some(report.clone()));
        let served = std::thread::Builder::new()
            .name("xdisk-backup-nbd".into())
            .spawn(move || match server.run() {
                Ok(st) => tracing::info!(
                    served = st.served,
                    refused = st.refused,
                    failed = st.failed,
                    "backup export closed"
                ),
                Err(e) => tracing::warn!("backup export: {e}"),
            });
        let run = BackupRun {
            job: job.clone(),
            entry: entry.clone(),
            handle,
            top,
            cbw,
            temp,
            stop,
            server: Mutex::new(served.ok()),
            report,
        };
        let ctl = Arc::new(BackupCtl {
            job: job.clone(),
            clear: AtomicBool::new(false),
        });
        *lock(&entry.job) = Some(job.id());
        *lock(&entry.backup) = Some(ctl);
        drop(one);
        let run = Arc::new(run);
        let r2 = run.clone();
        if let Err(e) = self.inner.jobs.spawn(&job, move || r2.run()) {
            // Undo: the export and the observer go, NAME as it was plus the writes since.
            if let Err(e2) = run.end(false) {
                tracing::warn!(device = %name, "undoing the backup: {e2}");
            }
            *lock(&entry.backup) = None;
            *lock(&entry.job) = None;
            job.finish(Err(e.to_string()));
            return Err(e);
        }
        tracing::info!(device = %name, job = job.id(), export = %req.export, bitmap = ?req.bitmap, paused_us, "backup started");
        Ok(job.info())
    }

    /// Ends the backup of a device (see [`crate::control::ControlRequest::BackupFinish`]);
    /// returns the job as it ended.
    pub fn backup_finish(&self, query: &str, clear_bitmap: bool) -> Result<JobInfo> {
        let entry = self.find(query)?;
        let ctl = lock(&entry.backup)
            .clone()
            .ok_or_else(|| Error::Invalid(format!("{}: no backup runs on it", entry.key.name())))?;
        ctl.clear.store(clear_bitmap, Ordering::SeqCst);
        ctl.job.request_complete();
        let deadline = std::time::Instant::now() + crate::control::LIVE_TIMEOUT;
        loop {
            let info = ctl.job.info();
            if info.state.finished() {
                return Ok(info);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "{}: the backup does not end",
                    entry.key.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The socket path of an `nbd+unix` URI, if it is one.
fn listener_path_of(uri: &str) -> Option<PathBuf> {
    match xdisk_nbd_client::NbdUri::parse(uri).ok()?.transport {
        xdisk_nbd_client::Transport::Unix { path } => Some(path),
        xdisk_nbd_client::Transport::Tcp { .. } => None,
    }
}

/// A backup job's thread (see [`Supervisor::backup`]): waits for its end, then ends it.
struct BackupRun {
    job: Arc<Job>,
    entry: Arc<Entry>,
    handle: xdisk_backend::DeviceHandle,
    top: Arc<Image>,
    cbw: Arc<CopyBeforeWrite>,
    temp: Option<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    server: Mutex<Option<JoinHandle<()>>>,
    report: BackupReply,
}

impl BackupRun {
    fn progress(&self) -> BackupReply {
        BackupReply {
            saved_bytes: self.cbw.saved_bytes(),
            broken: self.cbw.broken(),
            ..self.report.clone()
        }
    }

    fn run(self: Arc<Self>) {
        let name = self.entry.key.name();
        let finish = loop {
            match self.job.wait_complete(Duration::from_millis(200)) {
                Ok(true) => break true,
                Ok(false) => {
                    let p = self.progress();
                    self.job.set_progress(p.saved_bytes, Some(p));
                }
                Err(_) => break false,
            }
        };
        let clear = finish
            && lock(&self.entry.backup)
                .as_ref()
                .is_some_and(|c| c.clear.load(Ordering::SeqCst));
        let r = self.end(clear);
        let mut rep = self.progress();
        rep.cleared = clear && r.is_ok();
        self.job.set_progress(rep.saved_bytes, Some(rep.clone()));
        *lock(&self.entry.backup) = None;
        *lock(&self.entry.job) = None;
        match r {
            Ok(()) if finish => {
                tracing::info!(device = %name, job = self.job.id(), saved = rep.saved_bytes, cleared = clear, "backup finished");
                self.job.finish(Ok(Outcome::Backup(rep)));
            }
            Ok(()) => {
                tracing::info!(device = %name, job = self.job.id(), "backup cancelled");
                self.job.finish(Err("cancelled".into()));
            }
            Err(e) => {
                tracing::warn!(device = %name, job = self.job.id(), "backup finished with: {e}");
                self.job.finish(Err(format!("backup of {name}: {e}")));
            }
        }
    }

    /// Stops the export, then (queues paused) removes the observer and settles the
    /// bitmaps. Errors are the bitmaps' (the export and the observer go whatever happens).
    fn end(&self, clear: bool) -> std::result::Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&self.server).take() {
            let _ = t.join();
        }
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let (errs, temp, bitmap) = (
            errors.clone(),
            self.temp.clone(),
            self.report.bitmap.clone(),
        );
        let op: xdisk_backend::QuiesceFn = Box::new(move |img: &Arc<Image>| {
            img.set_write_observer(None);
            if let (Some(q), Some(temp)) = (img.as_qcow2(), &temp) {
                if clear {
                    if let Some(b) = &bitmap {
                        let r = q
                            .clear_bitmap(b)
                            .and_then(|()| q.bitmap(temp))
                            .and_then(|bits| q.merge_bitmap(b, &bits));
                        if let Err(e) = r {
                            lock(&errs).push(format!("--clear-bitmap on {b}: {e}"));
                        }
                    }
                }
                if let Err(e) = q.remove_bitmap(temp) {
                    lock(&errs).push(format!("removing the bitmap {temp}: {e}"));
                }
            }
            Ok(None)
        });
        let paused = {
            let _one = lock(&self.entry.live);
            self.handle.quiesce(op)
        };
        if let Err(e) = paused {
            // The device stopped: no more writes come; a daemon opening the image removes
            // the temporary bitmap.
            self.top.set_write_observer(None);
            if clear {
                lock(&errors).push(format!("--clear-bitmap: the device is gone ({e})"));
            }
            tracing::info!(device = %self.entry.key.name(), "backup ended on a stopped device: {e}");
        }
        let errors = lock(&errors).clone();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}
