//! `xdisk nbd`: exports images over NBD, spelled like qemu-nbd where they overlap.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use xdisk_image::queue::QueueConfig;
use xdisk_image::{AioKind, CacheMode, Image};
use xdisk_nbd_server::{
    DetectZeroes, DiscardMode, Export, Listener, ServeOptions, Server, ServerConfig,
};

/// Set in the environment of the process that `--fork` starts: it reports readiness on its
/// standard output instead of forking again.
const FORKED_ENV: &str = "XDISK_NBD_FORKED";

/// Options of `xdisk nbd`.
#[derive(Args)]
pub struct NbdArgs {
    /// qemu-nbd's `--object secret,id=ID,file=PATH|data=STRING[,format=raw|base64]`: the
    /// passphrase of an encrypted RBD image named with `:encrypt.key-secret=ID`.
    #[arg(long = "object", value_name = "secret,id=ID,file=PATH")]
    objects: Vec<String>,
    /// Image format (raw or qcow2); probed if not given (a probed image never opens its
    /// backing file).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// The export's name (the first export also answers as the default export, "").
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// A description for clients (NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// One more export, NAME=[FORMAT:]IMAGE (repeatable; FORMAT raw or qcow2, else -f or
    /// probed). With --export, IMAGE may be left out.
    #[arg(long = "export", value_name = "NAME=[FORMAT:]IMAGE")]
    exports: Vec<String>,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// TCP port.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// TCP address to bind.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// Clients served at once; more are closed at once. Above 1, CAN_MULTI_CONN is
    /// advertised (a flush on any connection covers all of them).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects (default: exit then, as qemu-nbd).
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Seconds a client may take to finish its handshake (0: no limit).
    #[arg(long = "handshake-limit", default_value_t = 10)]
    handshake_limit: u64,
    /// Go to the background once the socket listens (the command returns then; its exit
    /// status says whether the server started).
    #[arg(long = "fork")]
    fork: bool,
    /// Write the server's process ID to this file once it listens (removed at exit).
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe).
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// I/O engine (io_uring, native, threads).
    #[arg(long = "aio", default_value = "io_uring")]
    aio: String,
    /// What trims do: ignore (as qemu-nbd) or unmap (release the space).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Writes of zeroes: off, on (stored as zeroes), unmap (holes, with --discard unmap).
    #[arg(long = "detect-zeroes", default_value = "off")]
    detect_zeroes: String,
    /// Refuse backing files outside these directories (comma separated).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
    /// Bytes of requests a client may have unanswered (payloads and 1 KiB per request), and
    /// of replies it has not taken; the server stops reading its socket beyond. At least
    /// 33 MiB.
    #[arg(long = "max-buffered", default_value_t = 64 << 20)]
    max_buffered: u64,
    /// Serve TLS only, with the x509 credentials in this directory (as qemu-nbd's
    /// `tls-creds-x509` object): server-cert.pem, server-key.pem, and ca-cert.pem for
    /// --tls-verify-peer. Clients must negotiate TLS (NBD_OPT_STARTTLS) before anything else.
    #[arg(long = "tls-creds", value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate signed by DIR/ca-cert.pem.
    #[arg(long = "tls-verify-peer", requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Offer the persistent dirty bitmap NAME of the image (qcow2) as the
    /// `qemu:dirty-bitmap:NAME` metadata context of the default export (as qemu-nbd's -B;
    /// repeatable). The export serves the bitmap as it is when the server starts, so an
    /// enabled bitmap needs --read-only (writes through the export would change it).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// The image (the default export).
    image: Option<PathBuf>,
}

/// The bitmaps `names` of `image`, frozen as they are now, for its export's
/// `qemu:dirty-bitmap:` contexts. An enabled bitmap of a writable export is refused: the
/// export's writes would change it after the copy (QEMU serves the live bitmap).
fn export_bitmaps(
    image: &Arc<Image>,
    names: &[String],
    read_only: bool,
) -> Result<Vec<(String, Arc<xdisk_image::qcow2::bitmap::DirtyBitmap>)>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let q = image
        .as_qcow2()
        .ok_or_else(|| anyhow!("--bitmap: only qcow2 images have persistent bitmaps"))?;
    let infos = q.bitmaps();
    let mut out = Vec::new();
    for n in names {
        if out.iter().any(|(o, _)| o == n) {
            bail!("--bitmap {n} given twice");
        }
        let info = infos
            .iter()
            .find(|i| &i.name == n)
            .ok_or_else(|| anyhow!("--bitmap {n}: no such bitmap (xdisk img bitmap lists them)"))?;
        if info.inconsistent {
            bail!("--bitmap {n}: the bitmap is inconsistent (its last writer did not save it); remove it and take a full copy");
        }
        if info.auto && !read_only {
            bail!("--bitmap {n}: the bitmap is enabled and the export writable; use --read-only, or disable it first (xdisk img bitmap --disable)");
        }
        let b = q.bitmap(n).with_context(|| format!("--bitmap {n}"))?;
        out.push((n.clone(), Arc::new(b)));
    }
    Ok(out)
}

/// One export to open: name, image, format.
struct Wanted {
    name: String,
    image: PathBuf,
    format: Option<String>,
}

/// Parses `NAME=[FORMAT:]IMAGE`.
fn parse_export(s: &str) -> Result<Wanted> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--export {s}: expected NAME=[FORMAT:]IMAGE"))?;
    if name.is_empty() || name.len() > 4096 {
        bail!("--export {s}: the name must have 1 to 4096 bytes");
    }
    let (format, image) = match rest.split_once(':') {
        Some((f @ ("raw" | "qcow2"), path)) => (Some(f.to_owned()), path),
        _ => (None, rest),
    };
    if image.is_empty() {
        bail!("--export {s}: no image");
    }
    Ok(Wanted {
        name: name.to_owned(),
        image: image.into(),
        format,
    })
}

fn parse_discard(s: &str) -> Result<DiscardMode> {
    match s {
        "ignore" | "off" => Ok(DiscardMode::Ignore),
        "unmap" | "on" => Ok(DiscardMode::Unmap),
        _ => bail!("--discard {s}: expected ignore or unmap"),
    }
}

fn parse_detect_zeroes(s: &str) -> Result<DetectZeroes> {
    match s {
        "off" => Ok(DetectZeroes::Off),
        "on" => Ok(DetectZeroes::On),
        "unmap" => Ok(DetectZeroes::Unmap),
        _ => bail!("--detect-zeroes {s}: expected off, on or unmap"),
    }
}

/// `--fork`: starts this command again in the background (without `--fork`, in a process
/// group of its own) and returns when it says it listens, with its failure if it does not.
/// A re-executed child rather than fork(2): the process is multi-threaded by then. Until it
/// is ready the child's messages are passed on to our stderr; then we exit and the child's
/// stderr leads nowhere (as qemu-nbd's after `--fork`): run it under systemd, in the
/// foreground, for logs.
fn fork_to_background() -> Result<i32> {
    let exe = std::env::current_exe().context("finding xdisk's executable")?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .env(FORKED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting the background server")?;
    let out = child.stdout.take().context("no pipe to the server")?;
    if let Some(mut err) = child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    }
    let mut line = String::new();
    let _ = std::io::BufReader::new(out).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(0);
    }
    let st = child.wait()?;
    // Let the relay pass on the child's last words.
    std::thread::sleep(Duration::from_millis(50));
    bail!("the NBD server did not start ({st})")
}

/// Runs `xdisk nbd`.
pub fn run(a: NbdArgs) -> Result<i32> {
    let forked = std::env::var_os(FORKED_ENV).is_some();
    if a.fork && !forked {
        return fork_to_background();
    }
    crate::img::register_objects(&a.objects)?;
    let cache: CacheMode = a.cache.parse().map_err(|e| anyhow!("{e}"))?;
    let aio: AioKind = a.aio.parse().map_err(|e| anyhow!("{e}"))?;
    if a.shared == 0 {
        bail!("--shared must be at least 1");
    }
    let mut wanted = Vec::new();
    if let Some(image) = &a.image {
        wanted.push(Wanted {
            name: a.export_name.clone(),
            image: image.clone(),
            format: a.format.clone(),
        });
    }
    for e in &a.exports {
        let mut w = parse_export(e)?;
        w.format = w.format.or_else(|| a.format.clone());
        wanted.push(w);
    }
    if wanted.is_empty() {
        bail!("nothing to export: give an IMAGE or --export NAME=IMAGE");
    }
    for (i, w) in wanted.iter().enumerate() {
        if wanted[..i].iter().any(|o| o.name == w.name) {
            bail!("two exports are named {:?}", w.name);
        }
    }
    let mut exports = Vec::new();
    for w in &wanted {
        let image = crate::img::open_in(
            &w.image,
            w.format.as_deref(),
            a.read_only,
            cache,
            &a.backing_dirs,
        )?;
        // -B belongs to the default export (the IMAGE argument), as in qemu-nbd.
        let bitmaps = if exports.is_empty() && a.image.is_some() {
            export_bitmaps(&image, &a.bitmaps, a.read_only)
                .with_context(|| format!("{}", w.image.display()))?
        } else {
            Vec::new()
        };
        exports.push(Export {
            name: w.name.clone(),
            description: a.description.clone(),
            image,
            read_only: a.read_only,
            bitmaps,
        });
    }
    if !a.bitmaps.is_empty() && a.image.is_none() {
        bail!("--bitmap needs the IMAGE argument (it applies to the default export)");
    }
    let images: Vec<Arc<Image>> = exports.iter().map(|e| e.image.clone()).collect();
    let mut cfg = ServerConfig::new(exports);
    cfg.queue = QueueConfig {
        aio,
        ..QueueConfig::default()
    };
    cfg.max_buffered = a.max_buffered;
    cfg.multi_conn = a.shared > 1;
    cfg.discard = parse_discard(&a.discard)?;
    cfg.detect_zeroes = parse_detect_zeroes(&a.detect_zeroes)?;
    cfg.handshake_timeout = (a.handshake_limit > 0).then(|| Duration::from_secs(a.handshake_limit));
    if let Some(dir) = &a.tls_creds {
        let tls = xdisk_nbd_server::tls::server_config(dir, a.tls_verify_peer)
            .with_context(|| format!("TLS credentials in {}", dir.display()))?;
        cfg.tls = Some(tls);
    }
    let listener = match &a.socket {
        Some(p) => {
            Listener::unix(p).with_context(|| format!("cannot listen on {}", p.display()))?
        }
        None => Listener::tcp(&a.bind, a.port)
            .with_context(|| format!("cannot listen on {}:{}", a.bind, a.port))?,
    };
    let server = Server::new(
        Arc::new(cfg),
        vec![listener],
        ServeOptions {
            max_connections: a.shared,
            persistent: a.persistent,
        },
    );
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    // SIGTERM, SIGINT, SIGHUP: close the clients, flush and close the images, exit 0.
    let stop = server.stop_flag();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    crate::daemon::sd_notify("READY=1");
    if forked {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready").and_then(|()| out.flush());
    }
    tracing::info!(exports = wanted.len(), "serving over NBD");
    let r = server.run();
    let mut result = r.map(|_| 0).context("serving");
    for img in images {
        if let Err(e) = img.flush().and_then(|()| img.close()) {
            result = Err(anyhow!(e).context("closing an image"));
        }
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result
}
