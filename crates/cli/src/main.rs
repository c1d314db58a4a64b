//! `xdisk`: the command-line tool. `xdisk img ...` is a qemu-img-like image tool; the Xen
//! backend daemon and friends join it as they land.

mod bench;
mod boot;
mod boot_menu;
mod daemon;
mod img;
mod privs;
mod ringbench;
mod size;
mod xen_selftest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xdisk",
    version,
    about = "Userspace Xen disk backend and image tools"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image tools in qemu-img's spelling (create, info, check, convert, map, resize,
    /// compare, bench).
    Img {
        #[command(subcommand)]
        cmd: img::ImgCommand,
    },
    /// The backend daemon: serves every disk found under this domain's backend/<type>
    /// directories in xenstore.
    Serve(daemon::ServeArgs),
    /// Attaches an image to this domain (dom0) through the daemon; prints its /dev/xvdX.
    Attach(daemon::AttachArgs),
    /// Detaches a disk attached with `xdisk attach`.
    Detach(daemon::DetachArgs),
    /// Per-device counters of the running daemon.
    Stat(daemon::StatArgs),
    /// A stand-in for QEMU as libxl starts it for a PV guest's qdisk disks
    /// (device_model_override); serves that domain's disks and answers libxl's QMP.
    QemuShim(daemon::QemuShimArgs),
    /// Checks of the real-Xen platform and xenstore client, for the Xen lab (run in dom0).
    #[command(hide = true)]
    XenSelftest(xen_selftest::SelftestArgs),
    /// pygrub-compatible PV bootloader: extracts the kernel, ramdisk and command line from a
    /// guest's raw or qcow2 disk (also installed as `pygrub`, for libxl's `bootloader=`).
    Boot(boot::BootArgs),
    /// fio-like workloads through the blkif rings: a Rust frontend, the backend and the
    /// image, on the shared-memory Xen simulation (fio's option spelling).
    Bench(Box<ringbench::RingBenchArgs>),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XDISK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs go to files and journald too.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
                    eprintln!("pygrub: {e:#}");
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
            eprintln!("xdisk: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Command::Img { cmd } => img::run(cmd),
        Command::XenSelftest(args) => xen_selftest::run(args),
        Command::Bench(a) => ringbench::run(*a),
        Command::Boot(a) => boot::run(a),
        Command::Serve(a) => daemon::serve(a),
        Command::Attach(a) => daemon::attach(a),
        Command::Detach(a) => daemon::detach(a),
        Command::Stat(a) => daemon::stat(a),
        Command::QemuShim(a) => daemon::qemu_shim(a),
    }
}
