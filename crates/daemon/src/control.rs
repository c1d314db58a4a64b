//! The daemon's control socket: a unix stream socket (default [`DEFAULT_SOCKET`], mode 0600)
//! speaking one JSON request per line and one JSON reply per line.
//!
//! Requests: `{"cmd":"ping"}` → `{"ok":true}`; `{"cmd":"status"}` →
//! `{"ok":true,"status":DaemonStatus}`; live operations on a running device (issue #14):
//! `{"cmd":"snapshot","device":"xvda","overlay":"/abs/new.qcow2","no_create":false}` →
//! `{"ok":true,"snapshot":SnapshotReply}`, `{"cmd":"rbd-snap","device":"xvda","name":"s1"}` →
//! `{"ok":true,"rbd_snap":RbdSnapReply}`, `{"cmd":"commit","device":"xvda","speed":0,"top":null,"base":null}` →
//! `{"ok":true,"job":JobInfo}` (a background job, see [`crate::jobs`]),
//! `{"cmd":"stream","device":"xvda","base":null,"speed":0}` → `{"ok":true,"job":JobInfo}`,
//! `{"cmd":"mirror","device":"xvda","target":"/abs/t.qcow2","format":"qcow2","sync":"full",
//! "pivot":false,"speed":0}` → `{"ok":true,"job":JobInfo}`, `{"cmd":"jobs"}` →
//! `{"ok":true,"jobs":[JobInfo...]}`, `{"cmd":"job","id":1,"action":"cancel"}` (or
//! `pause`, `resume`, `complete`) → `{"ok":true,"job":JobInfo}`,
//! `{"cmd":"job-set-speed","id":1,"speed":10485760}` → `{"ok":true,"job":JobInfo}` and
//! `{"cmd":"bitmap","device":"xvda","action":"add","name":"b0","granularity":65536,
//! "disabled":false,"source":null}` → `{"ok":true,"bitmaps":[BitmapEntry...]}`,
//! `{"cmd":"backup","device":"xvda","export":"nbd+unix:///backup?socket=/run/b.sock",
//! "bitmap":"b0","new_bitmap":null,"scratch":null}` → `{"ok":true,"job":JobInfo}` (a
//! backup job: the export serves until finished) and
//! `{"cmd":"backup-finish","device":"xvda","clear_bitmap":false}` → `{"ok":true,"job":JobInfo}`
//! (the job as it ended). Errors: `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::jobs::{JobAction, JobInfo, JobState};
use crate::status::DaemonStatus;

/// Where `xdisk serve` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/xdisk/control.sock";

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Clients served at once (each on its own thread); more are answered "busy".
const MAX_CLIENTS: usize = 16;

/// How long one client connection may last, whatever it sends.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// A request on the control socket: one JSON object per line, named by its `cmd` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// `{"cmd":"ping"}`: whether a daemon answers; the reply carries nothing else.
    Ping,
    /// `{"cmd":"status"}`: the daemon's [`DaemonStatus`] (what `xdisk stat` shows).
    Status,
    /// A live external snapshot of a running device (`xdisk snapshot`): its top image
    /// becomes the backing file of the qcow2 overlay `overlay`, which it serves from then on.
    Snapshot {
        /// The device, as `xdisk stat` names it (`qdisk/5/51712`, `5/51712`, `xvda`,
        /// `/dev/xvda`, `51712`, the backend path).
        device: String,
        /// The new overlay: an absolute path.
        overlay: String,
        /// Use an existing overlay (it must name the device's top image as its backing
        /// file) instead of creating it.
        #[serde(default)]
        no_create: bool,
    },
    /// A crash-consistent snapshot of a running device served from an RBD image, taken in
    /// Ceph (`xdisk snapshot DEV --rbd-snap NAME`): with the device's queues paused and
    /// everything consumed completed and flushed, `rbd snap create POOL/IMAGE@NAME` on the
    /// open image; the device goes on serving the image.
    RbdSnap {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// The RBD snapshot's name.
        name: String,
    },
    /// Commits the active layer of a running device (`xdisk commit`): the top image is
    /// merged into its backing file while the guest writes, then the device serves the
    /// backing file. A background job: the reply is the job as it started.
    Commit {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// Rate limit of the copy in bytes per second (0 or absent: none).
        #[serde(default)]
        speed: u64,
        /// The layer to commit (its path): the top (default: an active commit) or a
        /// layer under it (an intermediate commit).
        #[serde(default)]
        top: Option<String>,
        /// The layer committed into (its path; default: the committed layer's backing
        /// file).
        #[serde(default)]
        base: Option<String>,
    },
    /// Copies the data of a running device's backing chain (down to `base`, exclusive)
    /// into its top qcow2 image, then makes `base` (or nothing) its backing file
    /// (`xdisk stream`). A background job: the reply is the job as it started.
    Stream {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// A layer of the chain under the top (its path, as `xdisk stat` shows it), which
        /// becomes the top's backing file; absent: all of it is copied, no backing file is
        /// left.
        #[serde(default)]
        base: Option<String>,
        /// Rate limit in bytes per second (0 or absent: none).
        #[serde(default)]
        speed: u64,
    },
    /// Copies a running device's disk to another image while the guest writes, tracking
    /// its writes, until the copy converges (the job is then `ready`); on `pivot` (or
    /// [`crate::jobs::JobAction::Complete`]) the device switches to the target
    /// (`xdisk mirror`). A background job: the reply is the job as it started.
    Mirror {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// The target: an absolute path, created if missing.
        target: String,
        /// The target's format (`raw`, `qcow2`; default: qcow2).
        #[serde(default)]
        format: Option<String>,
        /// `full` (the whole disk, default) or `top` (the top layer only; the target gets
        /// the top's backing file).
        #[serde(default)]
        sync: Option<String>,
        /// Switch over by itself once ready.
        #[serde(default)]
        pivot: bool,
        /// Rate limit in bytes per second (0 or absent: none).
        #[serde(default)]
        speed: u64,
    },
    /// Starts a backup of a running device (`xdisk backup`): a point-in-time view of its
    /// disk as of now, exported read-only over NBD at `export` while the guest goes on
    /// writing (copy-before-write), with the named bitmap's bits as of now as the
    /// `qemu:dirty-bitmap:NAME` metadata context. A job (kind `backup`) until
    /// [`ControlRequest::BackupFinish`].
    Backup {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// Where to serve: `nbd+unix:///NAME?socket=/abs/path` or `nbd://HOST:PORT/NAME`
        /// (export name default `backup`).
        export: String,
        /// A persistent dirty bitmap of the top qcow2 image, exported as of the instant.
        #[serde(default)]
        bitmap: Option<String>,
        /// A bitmap added (enabled) at the instant, recording every write after it (the next
        /// incremental backup's).
        #[serde(default)]
        new_bitmap: Option<String>,
        /// The directory of the scratch file holding the old data the guest overwrites
        /// (default: the socket's directory, or the daemon's temporary directory).
        #[serde(default)]
        scratch: Option<String>,
    },
    /// Ends the backup of a device (`xdisk backup --finish`): the export closes, the view
    /// and its scratch go; with `clear_bitmap` the backup's bitmap is left holding exactly
    /// the writes made since the backup's instant (otherwise it is left as it is: its old
    /// bits and every write since).
    BackupFinish {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// Leave the bitmap with the writes since the instant only.
        #[serde(default)]
        clear_bitmap: bool,
    },
    /// The daemon's jobs, running and finished (`xdisk jobs`).
    Jobs,
    /// Cancels, pauses or resumes a job (`xdisk job cancel|pause|resume ID`).
    Job {
        /// The job's ID.
        id: u64,
        /// What to do.
        action: crate::jobs::JobAction,
    },
    /// Changes a running job's rate limit (`xdisk job set-speed ID BYTES`, QEMU's
    /// `block-job-set-speed`).
    JobSetSpeed {
        /// The job's ID.
        id: u64,
        /// The new limit in bytes per second (0: none).
        speed: u64,
    },
    /// A change of the persistent dirty bitmaps of a running device's top qcow2 image
    /// (`xdisk bitmap`), or their list.
    Bitmap {
        /// The device, as for [`ControlRequest::Snapshot`].
        device: String,
        /// What to do.
        action: BitmapAction,
        /// The bitmap (not needed by `list`).
        #[serde(default)]
        name: Option<String>,
        /// `add`: bytes per bit (default: the cluster size, within 4 KiB to 64 KiB).
        #[serde(default)]
        granularity: Option<u64>,
        /// `add`: create it disabled (not recording writes).
        #[serde(default)]
        disabled: bool,
        /// `merge`: the bitmap of the same image merged into `name`.
        #[serde(default)]
        source: Option<String>,
    },
}

/// What [`ControlRequest::Bitmap`] does, as `qemu-img bitmap` spells its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapAction {
    /// Creates the bitmap (enabled unless `disabled`): it records every write acknowledged
    /// after the request returns.
    Add,
    /// Removes it.
    Remove,
    /// Clears its bits.
    Clear,
    /// Makes it record writes from now on.
    Enable,
    /// Makes it stop recording writes.
    Disable,
    /// Merges `source` into it.
    Merge,
    /// Lists the bitmaps (nothing changes).
    List,
}

impl BitmapAction {
    /// The action's name, as in the JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapAction::Add => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge => "merge",
            BitmapAction::List => "list",
        }
    }
}

/// The answer to [`ControlRequest::Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The overlay the device serves now.
    pub image: String,
    /// Its backing file: the device's former top, now read-only.
    pub backing: String,
    /// The former top's format.
    pub backing_format: String,
    /// How long the device's queues were paused, in microseconds.
    pub paused_us: u64,
}

/// What a completed commit job did ([`crate::jobs::JobInfo::commit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The image the device serves now: the former top's backing file.
    pub image: String,
    /// Its format.
    pub format: String,
    /// Bytes copied from the top into it, all passes together.
    pub copied_bytes: u64,
    /// Copy passes (the last one with the queues paused).
    pub passes: u32,
    /// How long the last pass paused the queues, in microseconds.
    pub paused_us: u64,
}

/// What a completed stream job did ([`crate::jobs::JobInfo::stream`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The top image, which the device still serves.
    pub image: String,
    /// Its backing file now (the `--base`), or none.
    pub backing: Option<String>,
    /// Bytes copied up into it.
    pub copied_bytes: u64,
    /// How long the switch of the backing link paused the queues, in microseconds.
    pub paused_us: u64,
}

/// What a completed mirror job did ([`crate::jobs::JobInfo::mirror`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The image the device serves now: the target.
    pub image: String,
    /// Its format.
    pub format: String,
    /// Bytes copied, all passes together.
    pub copied_bytes: u64,
    /// Copy passes (the last one with the queues paused).
    pub passes: u32,
    /// How long the last pass and the switch paused the queues, in microseconds.
    pub paused_us: u64,
}

/// What a backup exports ([`crate::jobs::JobInfo::backup`]): while it runs, and as it
/// ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The NBD URI it serves on.
    pub export: String,
    /// The bitmap exported as `qemu:dirty-bitmap:NAME`, if any.
    #[serde(default)]
    pub bitmap: Option<String>,
    /// Bytes the exported bitmap marks dirty (what an incremental backup copies).
    #[serde(default)]
    pub dirty_bytes: Option<u64>,
    /// The bitmap added at the instant, if any.
    #[serde(default)]
    pub new_bitmap: Option<String>,
    /// The copy-before-write granule, in bytes.
    pub granularity: u64,
    /// Bytes of old data saved so far (granules the guest overwrote).
    pub saved_bytes: u64,
    /// How long the start paused the queues, in microseconds.
    pub paused_us: u64,
    /// Why the view broke (a failed copy; reads of the export then fail), if it did.
    #[serde(default)]
    pub broken: Option<String>,
    /// Finished with `clear_bitmap`: the bitmap holds the writes since the instant only.
    #[serde(default)]
    pub cleared: bool,
}

/// The parameters of [`ControlRequest::Backup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRequest {
    /// The NBD URI to serve on.
    pub export: String,
    /// The bitmap to export.
    pub bitmap: Option<String>,
    /// A bitmap to add at the instant.
    pub new_bitmap: Option<String>,
    /// The scratch file's directory.
    pub scratch: Option<String>,
}

/// One persistent dirty bitmap, in the answer to [`ControlRequest::Bitmap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapEntry {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether it records writes (qcow2.txt "Bitmap directory": the `auto` flag).
    pub enabled: bool,
    /// Whether its `in_use` flag is set on disk now (a tracked bitmap of a running image).
    pub in_use: bool,
    /// Found `in_use` when the image was opened: not trustworthy, can only be removed.
    pub inconsistent: bool,
}

/// The answer to [`ControlRequest::RbdSnap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdSnapReply {
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// The RBD image it serves (secrets hidden).
    pub image: String,
    /// The snapshot, as an image name (`rbd:POOL/IMAGE@NAME`, read-only).
    pub snapshot: String,
    /// How long the device's queues were paused, in microseconds.
    pub paused_us: u64,
}

/// What the server does for the live requests (the daemon's [`crate::Supervisor`]).
pub trait LiveOps: Send + Sync {
    /// Serves [`ControlRequest::Snapshot`].
    fn snapshot(&self, device: &str, overlay: &Path, no_create: bool) -> Result<SnapshotReply>;
    /// Serves [`ControlRequest::RbdSnap`].
    fn rbd_snap(&self, device: &str, name: &str) -> Result<RbdSnapReply>;
    /// Serves [`ControlRequest::Commit`]: starts the job.
    fn commit(
        &self,
        device: &str,
        speed: u64,
        top: Option<&str>,
        base: Option<&str>,
    ) -> Result<JobInfo>;
    /// Serves [`ControlRequest::Stream`]: starts the job.
    fn stream(&self, device: &str, base: Option<&str>, speed: u64) -> Result<JobInfo>;
    /// Serves [`ControlRequest::Mirror`]: starts the job.
    fn mirror(&self, device: &str, req: &MirrorRequest) -> Result<JobInfo>;
    /// Serves [`ControlRequest::Jobs`].
    fn jobs(&self) -> Vec<JobInfo>;
    /// Serves [`ControlRequest::Job`].
    fn job(&self, id: u64, action: JobAction) -> Result<JobInfo>;
    /// Serves [`ControlRequest::Bitmap`]; returns the bitmaps as they are afterwards.
    fn bitmap(&self, device: &str, req: &BitmapRequest) -> Result<Vec<BitmapEntry>>;
    /// Serves [`ControlRequest::Backup`]: starts the backup job.
    fn backup(&self, device: &str, req: &BackupRequest) -> Result<JobInfo>;
    /// Serves [`ControlRequest::BackupFinish`]: ends it; returns the job as it ended.
    fn backup_finish(&self, device: &str, clear_bitmap: bool) -> Result<JobInfo>;
    /// Serves [`ControlRequest::JobSetSpeed`]; returns the job afterwards.
    fn job_set_speed(&self, id: u64, speed: u64) -> Result<JobInfo> {
        let _ = (id, speed);
        Err(Error::Invalid(
            "this server does not change job speeds".into(),
        ))
    }
}

/// The parameters of [`ControlRequest::Mirror`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    /// The target (absolute path).
    pub target: String,
    /// Its format.
    pub format: Option<String>,
    /// `full` or `top`.
    pub sync: Option<String>,
    /// Switch over once ready.
    pub pivot: bool,
    /// Rate limit, bytes per second.
    pub speed: u64,
}

/// The parameters of [`ControlRequest::Bitmap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRequest {
    /// What to do.
    pub action: BitmapAction,
    /// The bitmap.
    pub name: Option<String>,
    /// `add`: bytes per bit.
    pub granularity: Option<u64>,
    /// `add`: created disabled.
    pub disabled: bool,
    /// `merge`: the source bitmap.
    pub source: Option<String>,
}

/// The reply to a [`ControlRequest`], one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Whether the request was served. After a reply with `ok` false the daemon closes the
    /// connection.
    pub ok: bool,
    /// Why not, when `ok` is false (a request that does not parse, or `busy: too many
    /// clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer to [`ControlRequest::Status`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    /// The answer to [`ControlRequest::Snapshot`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReply>,
    /// The answer to [`ControlRequest::RbdSnap`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd_snap: Option<RbdSnapReply>,
    /// The answer to [`ControlRequest::Bitmap`]: the bitmaps afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapEntry>>,
    /// The answer to [`ControlRequest::Commit`] and [`ControlRequest::Job`]: the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobInfo>,
    /// The answer to [`ControlRequest::Jobs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<JobInfo>>,
}

impl ControlReply {
    fn ok() -> ControlReply {
        ControlReply {
            ok: true,
            error: None,
            status: None,
            snapshot: None,
            rbd_snap: None,
            bitmaps: None,
            job: None,
            jobs: None,
        }
    }

    fn err(e: impl std::fmt::Display) -> ControlReply {
        ControlReply {
            ok: false,
            error: Some(e.to_string()),
            ..ControlReply::ok()
        }
    }
}

/// What the server asks its owner.
pub type StatusFn = Arc<dyn Fn() -> DaemonStatus + Send + Sync>;

/// A running control socket server. Dropping it closes the socket and removes its file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlServer {
    /// Listens on `path` (its directory is created with mode 0700 if missing). A stale
    /// socket file is replaced; a socket where another daemon answers is an error.
    pub fn start(path: &Path, status: StatusFn) -> Result<ControlServer> {
        Self::start_with(path, status, None)
    }

    /// [`ControlServer::start`], also serving the live requests ([`ControlRequest::Snapshot`],
    /// [`ControlRequest::Bitmap`]) with `live`.
    pub fn start_with(
        path: &Path,
        status: StatusFn,
        live: Option<Arc<dyn LiveOps>>,
    ) -> Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            }
        }
        if check_socket_path(path)? && UnixStream::connect(path).is_ok() {
            return Err(Error::Invalid(format!(
                "another xdisk daemon already listens on {}",
                path.display()
            )));
        }
        // A stale socket is replaced by the rename in bind_private.
        let listener = bind_private(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("xdisk-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(s) => spawn_client(s, &status, &live, &clients),
                        Err(e) => tracing::warn!("control socket accept: {e}"),
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the control thread", e))?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; if the socket file was removed under us, nothing can, and
        // the thread ends with the process.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a socket exists at `path`; an error if something else does (it is never
/// replaced).
pub(crate) fn check_socket_path(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(true),
        Ok(_) => Err(Error::Invalid(format!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("cannot inspect {}", path.display()), e)),
    }
}

/// Binds the socket at `path` without a moment where others could connect: it is bound in
/// a fresh directory of mode 0700 next to `path`, restricted to 0600 there, and renamed into
/// place (the daemon cannot change its umask: no `unsafe` here, and it is process-wide).
pub(crate) fn bind_private(path: &Path) -> Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a socket path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let inner = tmp.join("s");
    let r = (|| {
        let l = UnixListener::bind(&inner)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("cannot restrict {}", path.display()), e))?;
        std::fs::rename(&inner, path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    r
}

/// Serves one client on its own thread (at most [`MAX_CLIENTS`] at once), so that a client
/// that trickles bytes or never sends its request holds up nobody else.
fn spawn_client(
    s: UnixStream,
    status: &StatusFn,
    live: &Option<Arc<dyn LiveOps>>,
    clients: &Arc<AtomicUsize>,
) {
    if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        clients.fetch_sub(1, Ordering::SeqCst);
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = (&s).write_all(b"{\"ok\":false,\"error\":\"busy: too many clients\"}\n");
        return;
    }
    let status = status.clone();
    let live = live.clone();
    let count = clients.clone();
    let spawned = std::thread::Builder::new()
        .name("xdisk-control-client".into())
        .spawn(move || {
            if let Err(e) = serve_one(s, &status, live.as_deref()) {
                tracing::debug!("control connection: {e}");
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        clients.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("cannot start a control client thread: {e}");
    }
}

fn serve_one(
    stream: UnixStream,
    status: &StatusFn,
    live: Option<&dyn LiveOps>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let mut reader = BufReader::new(std::io::Read::take(stream.try_clone()?, MAX_REQUEST));
    let mut w = stream;
    let mut line = String::new();
    // One connection may carry several requests.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || Instant::now() >= deadline {
            return Ok(());
        }
        let reply = match serde_json::from_str::<ControlRequest>(line.trim()) {
            Ok(ControlRequest::Ping) => ControlReply::ok(),
            Ok(ControlRequest::Status) => ControlReply {
                status: Some(status()),
                ..ControlReply::ok()
            },
            Ok(req) => serve_live(live, req),
            Err(e) => ControlReply::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out)?;
        if !reply.ok {
            return Ok(());
        }
    }
}

/// Serves a live request (the others are answered by `serve_one`).
fn serve_live(live: Option<&dyn LiveOps>, req: ControlRequest) -> ControlReply {
    let Some(live) = live else {
        return ControlReply::err("this server does not serve live operations");
    };
    match req {
        ControlRequest::Snapshot {
            device,
            overlay,
            no_create,
        } => match live.snapshot(&device, Path::new(&overlay), no_create) {
            Ok(r) => ControlReply {
                snapshot: Some(r),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::RbdSnap { device, name } => match live.rbd_snap(&device, &name) {
            Ok(r) => ControlReply {
                rbd_snap: Some(r),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::Commit {
            device,
            speed,
            top,
            base,
        } => match live.commit(&device, speed, top.as_deref(), base.as_deref()) {
            Ok(j) => ControlReply {
                job: Some(j),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::Stream {
            device,
            base,
            speed,
        } => match live.stream(&device, base.as_deref(), speed) {
            Ok(j) => ControlReply {
                job: Some(j),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::Mirror {
            device,
            target,
            format,
            sync,
            pivot,
            speed,
        } => {
            let req = MirrorRequest {
                target,
                format,
                sync,
                pivot,
                speed,
            };
            match live.mirror(&device, &req) {
                Ok(j) => ControlReply {
                    job: Some(j),
                    ..ControlReply::ok()
                },
                Err(e) => ControlReply::err(e),
            }
        }
        ControlRequest::Backup {
            device,
            export,
            bitmap,
            new_bitmap,
            scratch,
        } => {
            let req = BackupRequest {
                export,
                bitmap,
                new_bitmap,
                scratch,
            };
            match live.backup(&device, &req) {
                Ok(j) => ControlReply {
                    job: Some(j),
                    ..ControlReply::ok()
                },
                Err(e) => ControlReply::err(e),
            }
        }
        ControlRequest::BackupFinish {
            device,
            clear_bitmap,
        } => match live.backup_finish(&device, clear_bitmap) {
            Ok(j) => ControlReply {
                job: Some(j),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::Jobs => ControlReply {
            jobs: Some(live.jobs()),
            ..ControlReply::ok()
        },
        ControlRequest::Job { id, action } => match live.job(id, action) {
            Ok(j) => ControlReply {
                job: Some(j),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::JobSetSpeed { id, speed } => match live.job_set_speed(id, speed) {
            Ok(j) => ControlReply {
                job: Some(j),
                ..ControlReply::ok()
            },
            Err(e) => ControlReply::err(e),
        },
        ControlRequest::Bitmap {
            device,
            action,
            name,
            granularity,
            disabled,
            source,
        } => {
            let req = BitmapRequest {
                action,
                name,
                granularity,
                disabled,
                source,
            };
            match live.bitmap(&device, &req) {
                Ok(b) => ControlReply {
                    bitmaps: Some(b),
                    ..ControlReply::ok()
                },
                Err(e) => ControlReply::err(e),
            }
        }
        ControlRequest::Ping | ControlRequest::Status => ControlReply::ok(),
    }
}

/// How long [`request`] waits for the answer of a live request (a snapshot waits for the
/// device's requests in flight and writes the old top's metadata back).
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request to the daemon at `path`.
pub fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply> {
    let timeout = match req {
        ControlRequest::Ping | ControlRequest::Status | ControlRequest::Jobs => {
            Duration::from_secs(10)
        }
        _ => LIVE_TIMEOUT,
    };
    request_with_timeout(path, req, timeout)
}

/// [`request`], waiting at most `timeout` for the answer.
pub fn request_with_timeout(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply> {
    let stream = UnixStream::connect(path).map_err(|error| Error::NotRunning {
        path: path.to_owned(),
        error,
    })?;
    let ctl = |e: std::io::Error| Error::Control(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(ctl)?;
    let mut w = stream.try_clone().map_err(ctl)?;
    let mut line = serde_json::to_string(req).map_err(|e| Error::Control(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes()).map_err(ctl)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(ctl)?;
    let r: ControlReply = serde_json::from_str(reply.trim())
        .map_err(|e| Error::Control(format!("bad reply: {e}")))?;
    if !r.ok {
        return Err(Error::Control(r.error.unwrap_or_else(|| "error".into())));
    }
    Ok(r)
}

/// The job `id` as the daemon at `path` reports it now.
pub fn job(path: &Path, id: u64) -> Result<JobInfo> {
    request(path, &ControlRequest::Jobs)?
        .jobs
        .unwrap_or_default()
        .into_iter()
        .find(|j| j.id == id)
        .ok_or_else(|| Error::Control(format!("the daemon knows no job {id}")))
}

/// Polls the job `id` every `every` until it has finished (or is a mirror waiting to be
/// completed: ready and not asked to pivot), calling `progress` with each report; returns
/// the last one.
pub fn wait_job(
    path: &Path,
    id: u64,
    every: Duration,
    mut progress: impl FnMut(&JobInfo),
) -> Result<JobInfo> {
    loop {
        let j = job(path, id)?;
        progress(&j);
        if j.state.finished() || (j.state == JobState::Ready && j.pivot != Some(true)) {
            return Ok(j);
        }
        std::thread::sleep(every);
    }
}

/// The daemon's status (fails clearly when it is not running).
pub fn status(path: &Path) -> Result<DaemonStatus> {
    request(path, &ControlRequest::Status)?
        .status
        .ok_or_else(|| Error::Control("reply without status".into()))
}
