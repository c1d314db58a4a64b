//! `xdisk snapshot`, `xdisk commit` and `xdisk bitmap`: live operations on a running device of `xdisk serve`,
//! over its control socket (issue #14).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};

use xdisk_daemon::control::{self, BitmapAction, BitmapEntry, ControlRequest, DEFAULT_SOCKET};

use crate::size::parse_size;

#[derive(Args)]
pub struct SnapshotArgs {
    /// The running device, as `xdisk stat` names it: xvda, /dev/xvda, 51712, 5/51712,
    /// qdisk/5/51712 or its backend path.
    device: String,
    /// The new qcow2 overlay (created; its backing file is the device's current top image,
    /// which is read-only from then on).
    overlay: PathBuf,
    /// Use an existing overlay instead of creating one: it must name the device's current
    /// top image as its backing file and have the device's size (`qemu-img create -f qcow2
    /// -b TOP -F FMT NEW.qcow2`).
    #[arg(long)]
    no_create: bool,
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
    /// JSON output.
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
    let overlay = absolute(&a.overlay)?;
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

pub fn commit(a: CommitArgs) -> Result<i32> {
    let reply = control::request(
        &a.control,
        &ControlRequest::Commit {
            device: a.device.clone(),
        },
    )?;
    let r = reply
        .commit
        .ok_or_else(|| anyhow!("the daemon's reply has no commit"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: committed into {} ({}); now serving it; {} bytes copied in {} passes, the last one paused the queues {:.1} ms",
            r.device,
            r.image,
            r.format,
            r.copied_bytes,
            r.passes,
            r.paused_us as f64 / 1000.0
        );
    }
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
