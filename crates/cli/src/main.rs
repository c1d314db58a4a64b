//! `xdisk`: the command-line tool. `xdisk img ...` is a qemu-img-like image tool; the Xen
//! backend daemon and friends join it as they land.
//!
//! What links what: the backend and daemon libraries (`xdisk-backend`, `xdisk-daemon` without
//! features) serve real Xen and contain no simulation. This binary also offers simulation
//! modes (`xdisk serve --platform sim`, `xdisk bench`, the demos), so it links the simulated
//! Xen host (`xdisk-xensim`), the Rust blkfront (`xdisk-blkfront`) and the daemon's `sim`
//! feature; on real Xen none of that code runs.

mod boot;
mod boot_menu;
mod daemon;
mod gen_docs;
mod img;
mod img_bench;
mod img_bitmap;
mod live;
mod logging;
mod nbd;
mod privs;
mod ring_bench;
mod size;
mod xen_selftest;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// `xdisk --version`: the crate version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("XDISK_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "xdisk",
    version = VERSION,
    about = "Userspace Xen disk backend and image tools"
)]
struct Cli {
    /// Log format: auto (journald under systemd, else text), text, json or journald. Also
    /// XDISK_LOG_FORMAT; the level is XDISK_LOG (default warn).
    #[arg(long = "log-format", global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image tools in qemu-img's spelling (create, info, check, convert, map, resize,
    /// compare, bench, bitmap).
    #[command(
        after_long_help = "Examples:\n  xdisk img create -f qcow2 -o cluster_size=64k -b base.raw -F raw disk.qcow2 10G\n  xdisk img info --output=json disk.qcow2\n  xdisk img check -r leaks disk.qcow2\n  xdisk img convert -p -O qcow2 disk.raw disk.qcow2\n  xdisk img convert -c -O qcow2 -o compression_type=zstd disk.raw small.qcow2\n  xdisk img map --output=json disk.qcow2\n  xdisk img resize disk.qcow2 +1G\n  xdisk img compare a.qcow2 b.raw\n  xdisk img bench -t none -i io_uring -c 100000 -d 32 disk.qcow2\n  xdisk img bitmap --add -g 64k disk.qcow2 backup-0"
    )]
    Img {
        /// qemu-img's `--object secret,id=ID,file=PATH` (or `data=STRING`, which other
        /// users of the host can read in /proc; `,format=base64` for base64 content;
        /// `,keyid=MASTER,iv=BASE64` for content encrypted by a 32-byte secret): the
        /// passphrase of librbd's encryption for `-o encrypt.key-secret=ID` (create,
        /// convert) and `rbd:...:encrypt.key-secret=ID`.
        #[arg(long = "object", global = true, value_name = "secret,id=ID,file=PATH")]
        objects: Vec<String>,
        #[command(subcommand)]
        cmd: img::ImgCommand,
    },
    /// The backend daemon: serves every disk found under this domain's backend/<type>
    /// directories in xenstore.
    #[command(
        after_long_help = "Examples:\n  xdisk serve --platform=xen --backend-type qdisk --backend-type xdisk --domain 0 \\\n      --control /run/xdisk/control.sock --foreground   # dom0's disk backend (the systemd unit)\n  xdisk serve --platform=xen --backend-type qdisk        # every domain's qdisk disks\n  xdisk serve --metrics 9555     # Prometheus metrics on http://127.0.0.1:9555/metrics"
    )]
    Serve(daemon::ServeArgs),
    /// Attaches an image to this domain (dom0) through the daemon; prints its /dev/xvdX.
    #[command(
        after_long_help = "Examples:\n  xdisk attach /var/lib/images/tools.qcow2     # prints /dev/xvdX\n  xdisk attach --format raw --direct-io disk.raw\n  xdisk attach --format qcow2 'nbd+unix:///disk?socket=/run/disk.sock'   # an NBD export"
    )]
    Attach(daemon::AttachArgs),
    /// Detaches a disk attached with `xdisk attach`.
    Detach(daemon::DetachArgs),
    /// Per-device counters of the running daemon.
    #[command(
        after_long_help = "Examples:\n  xdisk stat\n  xdisk stat xvda --json\n  xdisk stat xvda --watch        # every second, like iostat -x 1\n  xdisk stat --watch 5 --count 3"
    )]
    Stat(daemon::StatArgs),
    /// Live external snapshot of a running device: its top image becomes the read-only
    /// backing file of a new qcow2 overlay, which the device serves from then on. Requests
    /// in flight complete against the old top first; it is consistent afterwards (every
    /// write acknowledged before is in it, `qemu-img check` clean) while the guest goes on
    /// writing to the overlay. The backend's `params` node is changed to the overlay. A
    /// device served from an RBD image takes an RBD snapshot instead (--rbd-snap).
    #[command(
        after_long_help = "Examples:\n  xdisk snapshot xvda /var/lib/images/vm-snap1.qcow2\n  xdisk snapshot xvdb --rbd-snap before-upgrade   # an RBD disk: rbd snap create\n  qemu-img create -f qcow2 -b /var/lib/images/vm.qcow2 -F qcow2 /srv/o.qcow2\n  xdisk snapshot --no-create qdisk/5/51712 /srv/o.qcow2 --json\n  xdisk stat xvda     # shows the chain"
    )]
    Snapshot(live::SnapshotArgs),
    /// Commits the active layer of a running device: its top qcow2 image is merged into its
    /// backing file while the guest keeps writing (writes made meanwhile are tracked and
    /// copied again), then the device switches to the backing file (the `params` node
    /// with it). The former top is left as it is, no longer used. With --top naming a
    /// layer under the top, that layer is merged into its backing file (or --base) and the
    /// backing link of the layer above it changes instead. Runs as a background job:
    /// prints its ID at once (see `xdisk jobs`, `xdisk job`), or with --wait its progress
    /// until it ends.
    #[command(
        after_long_help = "Examples:\n  xdisk snapshot xvda /var/lib/images/tmp.qcow2   # before a risky change\n  xdisk commit xvda --wait                         # merge it back, serve vm.qcow2 again\n  xdisk commit xvda --speed 50M                    # in the background, at most 50 MiB/s\n  xdisk commit xvda --top /srv/mid.qcow2 --wait    # the layer under the top, into its backing file\n  xdisk jobs\n  xdisk job pause 1; xdisk job resume 1; xdisk job cancel 1"
    )]
    Commit(live::CommitArgs),
    /// Streams a running device's backing data into its top qcow2 image (what the top does
    /// not hold, from the layers above --base, or from all of them), while the guest keeps
    /// writing (its writes win: each chunk is copied with the queues paused), then makes
    /// --base the top's backing file, or leaves it none. A background job, like commit.
    #[command(
        after_long_help = "Examples:\n  xdisk stream xvda --wait                        # the top alone holds the disk\n  xdisk stream xvda --base /var/lib/images/vm.qcow2 --speed 20M\n  xdisk jobs"
    )]
    Stream(live::StreamArgs),
    /// Mirrors a running device's disk to another image (created if missing) while the
    /// guest keeps writing (its writes are tracked and copied again); once the copy has
    /// converged the job is ready, and with --pivot (or `xdisk job complete ID`) the device
    /// switches to the target (the `params` node with it). A background job, like commit;
    /// cancelled before the switch, the device stays on its image.
    #[command(
        after_long_help = "Examples:\n  xdisk mirror xvda /srv/new/vm.qcow2 --pivot --wait     # storage migration\n  xdisk mirror xvda /srv/copy.raw --format raw --speed 100M\n  xdisk mirror xvda /srv/top.qcow2 --sync top            # the top only, same backing file\n  xdisk jobs; xdisk job complete 4"
    )]
    Mirror(live::MirrorArgs),
    /// Lists the daemon's background jobs (running, paused, and the last finished ones):
    /// ID, type, device, state, bytes done/total, speed limit.
    #[command(after_long_help = "Examples:\n  xdisk jobs\n  xdisk jobs --json")]
    Jobs(live::JobsArgs),
    /// Cancels, pauses, resumes or completes a background job, or changes its speed. A
    /// cancelled commit or mirror leaves the device on its image and removes its temporary
    /// bitmap; `complete` switches the device of a ready mirror over to its target;
    /// `set-speed ID BYTES` changes the rate limit (0: none) from the next chunk on.
    #[command(
        after_long_help = "Examples:\n  xdisk job pause 3\n  xdisk job resume 3\n  xdisk job cancel 3 --json\n  xdisk job complete 4   # a ready mirror: switch over\n  xdisk job set-speed 3 100M"
    )]
    Job(live::JobArgs),
    /// Persistent dirty bitmaps of a running device's top qcow2 image (live; offline: `xdisk
    /// img bitmap`). A bitmap added or enabled records every write acknowledged after the
    /// command returns.
    #[command(
        after_long_help = "Examples:\n  xdisk bitmap add xvda backup-0 --granularity 64k\n  xdisk bitmap list xvda --json\n  xdisk bitmap merge xvda backup-all --source backup-0\n  xdisk bitmap disable xvda backup-0\n  xdisk bitmap remove xvda backup-0"
    )]
    Bitmap(live::BitmapArgs),
    /// Live backup of a running device over NBD: exports a point-in-time view of its disk
    /// (as of the command) read-only at --export while the guest keeps writing (the old data
    /// of what it overwrites is saved first: copy-before-write), with --bitmap's bits as of
    /// that instant as the `qemu:dirty-bitmap:NAME` metadata context, so that a backup tool
    /// copies only what changed (`nbdinfo --map=qemu:dirty-bitmap:NAME`, `nbdcopy`,
    /// `qemu-img convert`). `--finish` ends it: the export closes; the bitmap is left as it
    /// is (its old bits and every write since), or with --clear-bitmap holding only the
    /// writes since the backup's instant. Runs as a job (`xdisk jobs`).
    #[command(after_long_help = "Examples:
  xdisk bitmap add xvda b0                                  # start tracking
  xdisk backup xvda --bitmap b0 --export 'nbd+unix:///backup?socket=/run/b.sock'
  qemu-img convert -f raw -O qcow2 'nbd+unix:///backup?socket=/run/b.sock' full.qcow2
  xdisk backup xvda --finish --clear-bitmap                # b0: the writes since the backup
  xdisk backup xvda --bitmap b0 --export 'nbd+unix:///backup?socket=/run/b.sock'
  nbdinfo --map=qemu:dirty-bitmap:b0 'nbd+unix:///backup?socket=/run/b.sock'   # what changed
  xdisk backup xvda --finish --clear-bitmap")]
    Backup(live::BackupArgs),
    /// A stand-in for QEMU as libxl starts it for a PV guest's qdisk disks
    /// (device_model_override); serves that domain's disks and answers libxl's QMP.
    QemuShim(daemon::QemuShimArgs),
    /// Writes the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenDocs(gen_docs::GenDocsArgs),
    /// Checks of the real-Xen platform and xenstore client, for the Xen lab (run in dom0).
    #[command(hide = true)]
    XenSelftest(xen_selftest::SelftestArgs),
    /// pygrub-compatible PV bootloader: extracts the kernel, ramdisk and command line from a
    /// guest's raw or qcow2 disk (also installed as `pygrub`, for libxl's `bootloader=`).
    #[command(
        after_long_help = "Examples:\n  xdisk boot -l disk.qcow2                  # the entries of the config it finds\n  xdisk boot -q -n disk.qcow2               # what it would boot, extracting nothing\n  xdisk boot -q --output-format=simple --output-directory=/tmp/b disk.qcow2\n  xdisk boot --entry=2 --args=single --output-directory=/tmp/b /dev/xvdb\n\nAs libxl's bootloader (a symlink named pygrub to the xdisk binary):\n  bootloader = \"/usr/lib/xdisk/pygrub\""
    )]
    Boot(boot::BootArgs),
    /// fio-like workloads through the blkif rings: a Rust frontend, the backend and the
    /// image, on the shared-memory Xen simulation (fio's option spelling).
    #[command(
        after_long_help = "Examples:\n  xdisk bench --filename=disk.qcow2 --rw=randread --bs=4k --iodepth=32 --runtime=10 --time_based\n  xdisk bench --filename=disk.raw --rw=write --bs=1M --iodepth=8 --verify=crc32c"
    )]
    Bench(Box<ring_bench::RingBenchArgs>),
    /// Exports an image over NBD (qemu-nbd's spelling): for backup and migration tools and
    /// hosts without Xen.
    #[command(
        after_long_help = "Examples:\n  xdisk nbd -f qcow2 -k /run/disk.sock disk.qcow2     # nbd+unix:///?socket=/run/disk.sock\n  xdisk nbd -f raw -r -x backup -p 10809 -t disk.raw  # nbd://host/backup, read-only, persistent\n  nbdcopy nbd+unix:///?socket=/run/disk.sock copy.raw"
    )]
    Nbd(Box<nbd::NbdArgs>),
}

/// `xdisk img map ... | head`: once the reader is gone, std's print macros panic ("failed
/// printing to stdout: Broken pipe"), since Rust ignores SIGPIPE (which is right for the
/// daemon's, NBD's and the control sockets: a peer that goes away is an error to report
/// there). Output nobody reads any more is simply not wanted: end quietly with the status of
/// a C tool killed by SIGPIPE (128 + 13), as qemu-img does.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(128 + libc::SIGPIPE);
        }
        default(info);
    }));
}

fn main() {
    quiet_on_closed_stdout();
    // --log-format is read before clap parses the rest (logging must be up first).
    let args: Vec<String> = std::env::args().skip(1).take_while(|a| a != "--").collect();
    let asked = args.iter().enumerate().find_map(|(i, a)| {
        let v = match a.strip_prefix("--log-format=") {
            Some(v) => v,
            None if a == "--log-format" => args.get(i + 1)?.as_str(),
            None => return None,
        };
        <logging::LogFormat as clap::ValueEnum>::from_str(v, true).ok()
    });
    logging::init(logging::resolve(asked));
    // Installed under pygrub's name (libxl's `bootloader=` runs it with pygrub's options).
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == "pygrub")
    {
        let code = match <boot::PygrubCli as clap::Parser>::try_parse() {
            Ok(cli) => match boot::run(cli.args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("pygrub: {}", error_text(&e));
                    1
                }
            },
            Err(e) => {
                // pygrub exits 1 on a usage error (clap's default is 2).
                let _ = e.print();
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) {
                    0
                } else {
                    1
                }
            }
        };
        std::process::exit(code);
    }
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xdisk: {}", error_text(&e));
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Command::Img { objects, cmd } => {
            img::register_objects(&objects)?;
            img::run(cmd)
        }
        Command::XenSelftest(args) => xen_selftest::run(args),
        Command::Bench(a) => ring_bench::run(*a),
        Command::Nbd(a) => nbd::run(*a),
        Command::Boot(a) => boot::run(a),
        Command::GenDocs(a) => gen_docs::run::<Cli>(a),
        Command::Serve(a) => daemon::serve(a),
        Command::Attach(a) => daemon::attach(a),
        Command::Detach(a) => daemon::detach(a),
        Command::Snapshot(a) => live::snapshot(a),
        Command::Commit(a) => live::commit(a),
        Command::Stream(a) => live::stream(a),
        Command::Mirror(a) => live::mirror(a),
        Command::Jobs(a) => live::jobs(a),
        Command::Job(a) => live::job(a),
        Command::Bitmap(a) => live::bitmap(a),
        Command::Backup(a) => live::backup(a),
        Command::Stat(a) => daemon::stat(a),
        Command::QemuShim(a) => daemon::qemu_shim(a),
    }
}

/// An error and its causes on one line, as `{:#}` prints them, without repeating a cause
/// that an outer error's message already ends with (many error types print their source
/// in their own message and also return it as `source()`: "No such file or directory (os
/// error 2): No such file or directory (os error 2)").
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.ends_with(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

#[cfg(test)]
mod error_text_tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open x: {source}")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn error_text_does_not_repeat_a_cause_already_in_the_message() {
        let e = anyhow::Error::new(Outer {
            source: std::io::Error::from_raw_os_error(2),
        })
        .context("could not open 'x'");
        assert_eq!(
            error_text(&e),
            "could not open 'x': cannot open x: No such file or directory (os error 2)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&e), "outer: inner");
    }
}
