//! `xdisk snapshot`, `xdisk commit`, `xdisk stream`, `xdisk mirror`, `xdisk jobs`, `xdisk job`, `xdisk bitmap` and `xdisk backup`: live
//! operations on a running device of `xdisk serve`, over its control socket (issue #14).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};

use xdisk_daemon::control::{self, BitmapAction, BitmapEntry, ControlRequest, DEFAULT_SOCKET};
use xdisk_daemon::jobs::{JobAction, JobInfo, JobState};

use crate::size::parse_size;

#[derive(Args)]
pub struct SnapshotArgs {
    /// The running device, as `xdisk stat` names it: xvda, /dev/xvda, 51712, 5/51712,
    /// qdisk/5/51712 or its backend path.
    device: String,
    /// The new qcow2 overlay (created; its backing file is the device's current top image,
    /// which is read-only from then on).
    #[arg(required_unless_present = "rbd_snap")]
    overlay: Option<PathBuf>,
    /// Use an existing overlay instead of creating one: it must name the device's current
    /// top image as its backing file and have the device's size (`qemu-img create -f qcow2
    /// -b TOP -F FMT NEW.qcow2`).
    #[arg(long)]
    no_create: bool,
    /// For a device served from an RBD image: take the RBD snapshot POOL/IMAGE@NAME
    /// (`rbd snap create`) with the queues paused and the image flushed (crash-consistent),
    /// instead of an overlay; the device goes on serving the image.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["overlay", "no_create"])]
    rbd_snap: Option<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Args)]
pub struct CommitArgs {
    /// The running device (as for `xdisk stat`); its top image must be a qcow2 overlay.
    device: String,
    /// The layer to commit (its path, as `xdisk stat` shows the chain): the top (default;
    /// the device then switches to the base) or a layer under it (the layer above it then
    /// names the base as its backing file).
    #[arg(long, value_name = "IMG")]
    top: Option<PathBuf>,
    /// The layer to commit into (its path; default: the committed layer's backing file;
    /// deeper only for an intermediate commit).
    #[arg(long, value_name = "IMG")]
    base: Option<PathBuf>,
    /// Rate limit of the copy, bytes per second (suffixes k, M, G: 10M); default none.
    #[arg(long, value_name = "BYTES/S")]
    speed: Option<String>,
    /// Wait until the job ends, printing its progress (to stderr); the exit status is
    /// non-zero if it failed or was cancelled.
    #[arg(long)]
    wait: bool,
    /// JSON output (the job as it started, or with --wait as it ended).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Args)]
pub struct StreamArgs {
    /// The running device (as for `xdisk stat`); its top image must be a qcow2 overlay.
    device: String,
    /// The layer of the chain that stays the top's backing file (its path; `xdisk stat`
    /// shows the chain); only the layers above it are copied. Default: all, and the top
    /// keeps no backing file.
    #[arg(long, value_name = "IMG")]
    base: Option<PathBuf>,
    /// Rate limit of the copy, bytes per second (suffixes k, M, G: 10M); default none.
    #[arg(long, value_name = "BYTES/S")]
    speed: Option<String>,
    /// Wait until the job ends, printing its progress (to stderr); the exit status is
    /// non-zero if it failed or was cancelled.
    #[arg(long)]
    wait: bool,
    /// JSON output (the job as it started, or with --wait as it ended).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

/// `xdisk mirror --sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// The whole disk (every layer); the target has no backing file.
    Full,
    /// The top layer only; the target gets the top's backing file.
    Top,
}

/// `xdisk mirror --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetFormat {
    /// qcow2 (default).
    Qcow2,
    /// raw (only with --sync full).
    Raw,
}

#[derive(Args)]
pub struct MirrorArgs {
    /// The running device (as for `xdisk stat`); the guest's writes are tracked in a
    /// temporary bitmap of a qcow2 top, in memory for a raw one.
    device: String,
    /// The target image (created if missing, with the device's size; an existing one is
    /// overwritten where the disk has data, everywhere with --sync full).
    target: PathBuf,
    /// The target's format.
    #[arg(long = "format", short = 'f', value_enum, default_value = "qcow2")]
    format: TargetFormat,
    /// What to copy.
    #[arg(long, value_enum, default_value = "full")]
    sync: SyncMode,
    /// Switch the device to the target as soon as the copy has converged (otherwise the
    /// job stays ready until `xdisk job complete ID`).
    #[arg(long)]
    pivot: bool,
    /// Rate limit of the copy, bytes per second (suffixes k, M, G: 10M); default none.
    #[arg(long, value_name = "BYTES/S")]
    speed: Option<String>,
    /// Wait until the job ends (with --pivot) or is ready, printing its progress (to
    /// stderr); the exit status is non-zero if it failed or was cancelled.
    #[arg(long)]
    wait: bool,
    /// JSON output (the job as it started, or with --wait as it ended or became ready).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Args)]
pub struct JobsArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

/// `xdisk job` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JobVerb {
    /// Stop the job; what it did is left consistent (a commit leaves the device on its top).
    Cancel,
    /// Stop copying (at the next chunk) until resumed.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Switch the device of a ready mirror over to its target.
    Complete,
    /// Change the copy's rate limit to BYTES per second (0: none), from its next chunk on.
    SetSpeed,
}

#[derive(Args)]
pub struct JobArgs {
    /// What to do.
    #[arg(value_enum)]
    action: JobVerb,
    /// The job's ID (`xdisk jobs`).
    id: u64,
    /// set-speed: the new rate limit, bytes per second (suffixes k, M, G: 10M; 0: none).
    #[arg(value_name = "BYTES")]
    speed: Option<String>,
    /// JSON output (the job afterwards).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

/// `xdisk bitmap` actions, as `qemu-img bitmap` spells its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Create NAME (enabled unless --disabled): it records every write acknowledged after
    /// the command returns.
    Add,
    /// Remove NAME.
    Remove,
    /// Clear NAME's bits.
    Clear,
    /// Make NAME record writes from now on.
    Enable,
    /// Make NAME stop recording writes.
    Disable,
    /// Merge the bitmap --source into NAME.
    Merge,
    /// List the bitmaps (NAME not needed).
    List,
}

impl Action {
    fn wire(self) -> BitmapAction {
        match self {
            Action::Add => BitmapAction::Add,
            Action::Remove => BitmapAction::Remove,
            Action::Clear => BitmapAction::Clear,
            Action::Enable => BitmapAction::Enable,
            Action::Disable => BitmapAction::Disable,
            Action::Merge => BitmapAction::Merge,
            Action::List => BitmapAction::List,
        }
    }
}

#[derive(Args)]
pub struct BitmapArgs {
    /// What to do.
    #[arg(value_enum)]
    action: Action,
    /// The running device (as for `xdisk stat`); its top image must be qcow2.
    device: String,
    /// The bitmap.
    name: Option<String>,
    /// add: bytes per bit, a power of two from 512 to 2G (default: the cluster size,
    /// within 4k to 64k).
    #[arg(short = 'g', long)]
    granularity: Option<String>,
    /// add: create it disabled (recording nothing until enabled).
    #[arg(long)]
    disabled: bool,
    /// merge: the bitmap (of the same image) merged into NAME.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// JSON output (the bitmaps afterwards).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Args)]
pub struct BackupArgs {
    /// The running device (as for `xdisk stat`).
    device: String,
    /// Where to export the point-in-time view: `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://HOST:PORT/NAME` (export name default `backup`; a relative socket path is
    /// taken from here).
    #[arg(long, value_name = "URI", required_unless_present = "finish")]
    export: Option<String>,
    /// A persistent dirty bitmap of the top qcow2 image, exported as of now as the
    /// `qemu:dirty-bitmap:NAME` context (what changed since it was added or last cleared).
    /// Without it the backup is a full one (raw tops too).
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// Add this bitmap at the backup's instant (it records every write after it: the next
    /// incremental backup's bitmap).
    #[arg(long, value_name = "NEW")]
    new_bitmap: Option<String>,
    /// Where the scratch file (the old data the guest overwrites while the backup runs,
    /// unlinked at once) goes (default: the socket's directory, else the daemon's $TMPDIR).
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// End the device's backup: the export closes.
    #[arg(long, conflicts_with_all = ["export", "bitmap", "new_bitmap", "scratch"])]
    finish: bool,
    /// With --finish: leave the bitmap holding only the writes made since the backup's
    /// instant (the backup was taken; otherwise it keeps its old bits too).
    #[arg(long, requires = "finish")]
    clear_bitmap: bool,
    /// JSON output (the job as it started, or as it ended).
    #[arg(long)]
    json: bool,
    /// The daemon's control socket.
    #[arg(long = "control", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

/// An absolute path for the daemon (whose working directory is not ours): relative paths
/// are taken from here, the directory resolved (it must exist), the file name kept.
fn absolute(p: &Path) -> Result<PathBuf> {
    let name = p
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", p.display()))?;
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir =
        std::fs::canonicalize(&dir).with_context(|| format!("the directory of {}", p.display()))?;
    Ok(dir.join(name))
}

pub fn snapshot(a: SnapshotArgs) -> Result<i32> {
    if let Some(snap) = &a.rbd_snap {
        let reply = control::request(
            &a.control,
            &ControlRequest::RbdSnap {
                device: a.device.clone(),
                name: snap.clone(),
            },
        )?;
        let r = reply
            .rbd_snap
            .ok_or_else(|| anyhow!("the daemon's reply has no snapshot"))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "{}: RBD snapshot {} taken (the device still serves {}); queues paused {:.1} ms",
                r.device,
                r.snapshot,
                r.image,
                r.paused_us as f64 / 1000.0
            );
        }
        return Ok(0);
    }
    let overlay = a
        .overlay
        .as_ref()
        .ok_or_else(|| anyhow!("OVERLAY is missing"))?;
    let overlay = absolute(overlay)?;
    let overlay = overlay
        .to_str()
        .ok_or_else(|| anyhow!("{}: the path is not UTF-8", overlay.display()))?
        .to_owned();
    let reply = control::request(
        &a.control,
        &ControlRequest::Snapshot {
            device: a.device.clone(),
            overlay,
            no_create: a.no_create,
        },
    )?;
    let r = reply
        .snapshot
        .ok_or_else(|| anyhow!("the daemon's reply has no snapshot"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: now serving {} (backing file {}, {}, read-only); queues paused {:.1} ms",
            r.device,
            r.image,
            r.backing,
            r.backing_format,
            r.paused_us as f64 / 1000.0
        );
    }
    Ok(0)
}

/// An optional path made absolute for the daemon.
fn opt_path(p: &Option<PathBuf>) -> Result<Option<String>> {
    match p {
        Some(b) => Ok(Some(
            absolute(b)?
                .to_str()
                .ok_or_else(|| anyhow!("{}: the path is not UTF-8", b.display()))?
                .to_owned(),
        )),
        None => Ok(None),
    }
}

fn parse_speed(v: &Option<String>) -> Result<u64> {
    match v {
        Some(v) => parse_size(v).map_err(|e| anyhow!("--speed {v}: {e}")),
        None => Ok(0),
    }
}

pub fn commit(a: CommitArgs) -> Result<i32> {
    let speed = parse_speed(&a.speed)?;
    let reply = control::request(
        &a.control,
        &ControlRequest::Commit {
            device: a.device.clone(),
            speed,
            top: opt_path(&a.top)?,
            base: opt_path(&a.base)?,
        },
    )?;
    let j = reply
        .job
        .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
    follow(&a.control, j, a.wait, a.json)
}

pub fn stream(a: StreamArgs) -> Result<i32> {
    let speed = parse_speed(&a.speed)?;
    let base = opt_path(&a.base)?;
    let reply = control::request(
        &a.control,
        &ControlRequest::Stream {
            device: a.device.clone(),
            base,
            speed,
        },
    )?;
    let j = reply
        .job
        .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
    follow(&a.control, j, a.wait, a.json)
}

pub fn mirror(a: MirrorArgs) -> Result<i32> {
    let speed = parse_speed(&a.speed)?;
    let target = absolute(&a.target)?
        .to_str()
        .ok_or_else(|| anyhow!("{}: the path is not UTF-8", a.target.display()))?
        .to_owned();
    let reply = control::request(
        &a.control,
        &ControlRequest::Mirror {
            device: a.device.clone(),
            target,
            format: Some(
                match a.format {
                    TargetFormat::Qcow2 => "qcow2",
                    TargetFormat::Raw => "raw",
                }
                .to_owned(),
            ),
            sync: Some(
                match a.sync {
                    SyncMode::Full => "full",
                    SyncMode::Top => "top",
                }
                .to_owned(),
            ),
            pivot: a.pivot,
            speed,
        },
    )?;
    let j = reply
        .job
        .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
    follow(&a.control, j, a.wait, a.json)
}

/// Prints a job just started, or waits for its end (`--wait`; a mirror without --pivot:
/// until it is ready) and prints that.
fn follow(sock: &Path, j: JobInfo, wait: bool, json: bool) -> Result<i32> {
    if !wait {
        if json {
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!(
                "{}: {} started as job {} (xdisk jobs; --wait waits)",
                j.device,
                j.kind.as_str(),
                j.id
            );
        }
        return Ok(0);
    }
    let end = control::wait_job(sock, j.id, std::time::Duration::from_millis(250), |j| {
        if !json {
            eprintln!("job {}: {}", j.id, progress(j));
        }
    })?;
    if end.state == JobState::Ready {
        if json {
            println!("{}", serde_json::to_string_pretty(&end)?);
        } else {
            println!(
                "{}: job {} is ready (the target follows the guest's writes); xdisk job complete {} switches over",
                end.device, end.id, end.id
            );
        }
        return Ok(0);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&end)?);
    } else if let Some(r) = &end.commit {
        println!(
            "{}: committed into {} ({}); now serving it; {} bytes copied in {} passes, the last one paused the queues {:.1} ms",
            r.device,
            r.image,
            r.format,
            r.copied_bytes,
            r.passes,
            r.paused_us as f64 / 1000.0
        );
    } else if let Some(r) = &end.mirror {
        println!(
            "{}: mirrored to {} ({}); now serving it; {} bytes copied in {} passes, the last one paused the queues {:.1} ms",
            r.device,
            r.image,
            r.format,
            r.copied_bytes,
            r.passes,
            r.paused_us as f64 / 1000.0
        );
    } else if let Some(r) = &end.stream {
        println!(
            "{}: streamed into {} ({} bytes copied); its backing file is now {}; the switch paused the queues {:.1} ms",
            r.device,
            r.image,
            r.copied_bytes,
            r.backing.as_deref().unwrap_or("none"),
            r.paused_us as f64 / 1000.0
        );
    }
    match end.state {
        JobState::Completed => Ok(0),
        JobState::Cancelled => {
            eprintln!("job {} was cancelled", end.id);
            Ok(1)
        }
        _ => {
            eprintln!(
                "job {} {}: {}",
                end.id,
                end.state.as_str(),
                end.error.as_deref().unwrap_or("no reason given")
            );
            Ok(1)
        }
    }
}

/// `running 12.0/32.0 MiB (37%), 4.0 MiB/s limit, 3.1 s`.
fn progress(j: &JobInfo) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let pct = if j.total_bytes == 0 {
        100.0
    } else {
        j.done_bytes as f64 * 100.0 / j.total_bytes as f64
    };
    let speed = if j.speed == 0 {
        "no speed limit".to_owned()
    } else {
        format!("{:.1} MiB/s limit", mib(j.speed))
    };
    format!(
        "{} {:.1}/{:.1} MiB ({pct:.0}%), {speed}, {:.1} s",
        j.state.as_str(),
        mib(j.done_bytes),
        mib(j.total_bytes),
        j.elapsed_ms as f64 / 1000.0
    )
}

pub fn jobs(a: JobsArgs) -> Result<i32> {
    let list = control::request(&a.control, &ControlRequest::Jobs)?
        .jobs
        .unwrap_or_default();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    if list.is_empty() {
        println!("no jobs");
    }
    for j in &list {
        print!(
            "{:>4}  {:<7} {:<16} {}",
            j.id,
            j.kind.as_str(),
            j.device,
            progress(j)
        );
        match &j.error {
            Some(e) => println!("  ({e})"),
            None => println!(),
        }
    }
    Ok(0)
}

pub fn job(a: JobArgs) -> Result<i32> {
    let action = match a.action {
        JobVerb::Cancel => Some(JobAction::Cancel),
        JobVerb::Pause => Some(JobAction::Pause),
        JobVerb::Resume => Some(JobAction::Resume),
        JobVerb::Complete => Some(JobAction::Complete),
        JobVerb::SetSpeed => None,
    };
    let req = match (action, &a.speed) {
        (Some(action), None) => ControlRequest::Job { id: a.id, action },
        (Some(action), Some(s)) => bail!("job {}: unexpected argument {s:?}", action.as_str()),
        (None, None) => bail!("job set-speed: BYTES is missing (0: no limit)"),
        (None, Some(s)) => ControlRequest::JobSetSpeed {
            id: a.id,
            speed: parse_size(s).map_err(|e| anyhow!("job set-speed {s}: {e}"))?,
        },
    };
    let j = control::request(&a.control, &req)?
        .job
        .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        let what = action.map_or("set-speed", JobAction::as_str);
        println!("job {}: {what} requested; {}", j.id, progress(&j));
    }
    Ok(0)
}

/// `nbd+unix:///X?socket=rel/path` with the socket path made absolute (the daemon's
/// working directory is not ours); other URIs unchanged.
fn absolute_export(uri: &str) -> Result<String> {
    let Some((before, query)) = uri.split_once('?') else {
        return Ok(uri.to_owned());
    };
    if !before.starts_with("nbd+unix://") {
        return Ok(uri.to_owned());
    }
    let mut params = Vec::new();
    for p in query.split('&') {
        match p.strip_prefix("socket=") {
            Some(s) if !s.starts_with('/') && !s.is_empty() => {
                let abs = absolute(Path::new(s))?;
                let abs = abs
                    .to_str()
                    .ok_or_else(|| anyhow!("{}: the path is not UTF-8", abs.display()))?;
                params.push(format!("socket={abs}"));
            }
            _ => params.push(p.to_owned()),
        }
    }
    Ok(format!("{before}?{}", params.join("&")))
}

pub fn backup(a: BackupArgs) -> Result<i32> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    if a.finish {
        let reply = control::request(
            &a.control,
            &ControlRequest::BackupFinish {
                device: a.device.clone(),
                clear_bitmap: a.clear_bitmap,
            },
        )?;
        let j = reply
            .job
            .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else if let Some(b) = &j.backup {
            let bitmap = match (&b.bitmap, b.cleared) {
                (Some(n), true) => format!("; bitmap {n} now holds the writes since the backup"),
                (Some(n), false) => {
                    format!("; bitmap {n} kept (its old bits and the writes since)")
                }
                (None, _) => String::new(),
            };
            println!(
                "{}: backup job {} {}; the export is closed; {:.1} MiB of old data were saved{bitmap}",
                b.device,
                j.id,
                j.state.as_str(),
                mib(b.saved_bytes)
            );
        }
        return match j.state {
            JobState::Completed => Ok(0),
            _ => {
                eprintln!(
                    "job {} {}: {}",
                    j.id,
                    j.state.as_str(),
                    j.error.as_deref().unwrap_or("no reason given")
                );
                Ok(1)
            }
        };
    }
    let export = a
        .export
        .as_deref()
        .ok_or_else(|| anyhow!("--export URI is missing"))?;
    let export = absolute_export(export)?;
    let reply = control::request(
        &a.control,
        &ControlRequest::Backup {
            device: a.device.clone(),
            export,
            bitmap: a.bitmap.clone(),
            new_bitmap: a.new_bitmap.clone(),
            scratch: opt_path(&a.scratch)?,
        },
    )?;
    let j = reply
        .job
        .ok_or_else(|| anyhow!("the daemon's reply has no job"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(0);
    }
    let b = j
        .backup
        .as_ref()
        .ok_or_else(|| anyhow!("the daemon's reply has no backup"))?;
    let bitmap = match (&b.bitmap, b.dirty_bytes) {
        (Some(n), Some(d)) => format!(" with qemu:dirty-bitmap:{n} ({:.1} MiB dirty)", mib(d)),
        _ => String::new(),
    };
    println!(
        "{}: backup job {} exports the disk as of now on {}{bitmap} (queues paused {:.1} ms); \
         xdisk backup {} --finish ends it",
        b.device,
        j.id,
        b.export,
        b.paused_us as f64 / 1000.0,
        a.device
    );
    Ok(0)
}

pub fn bitmap(a: BitmapArgs) -> Result<i32> {
    if a.action != Action::List && a.name.is_none() {
        bail!("bitmap {:?}: NAME is missing", a.action);
    }
    if a.action == Action::Merge && a.source.is_none() {
        bail!("bitmap merge: --source SOURCE is missing");
    }
    let granularity = match &a.granularity {
        Some(g) => Some(parse_size(g).map_err(|e| anyhow!("--granularity {g}: {e}"))?),
        None => None,
    };
    let reply = control::request(
        &a.control,
        &ControlRequest::Bitmap {
            device: a.device.clone(),
            action: a.action.wire(),
            name: a.name.clone(),
            granularity,
            disabled: a.disabled,
            source: a.source.clone(),
        },
    )?;
    let list = reply.bitmaps.unwrap_or_default();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if a.action == Action::List {
        print!("{}", render(&list));
    }
    Ok(0)
}

fn render(list: &[BitmapEntry]) -> String {
    let mut s = String::new();
    for b in list {
        let mut flags = Vec::new();
        if b.enabled {
            flags.push("enabled");
        } else {
            flags.push("disabled");
        }
        if b.in_use {
            flags.push("in-use");
        }
        if b.inconsistent {
            flags.push("inconsistent");
        }
        s += &format!(
            "{}: granularity {} ({})\n",
            b.name,
            b.granularity,
            flags.join(", ")
        );
    }
    s
}
