//! `xdisk nbd`: exports an image over NBD, spelled like qemu-nbd where they overlap.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use xdisk_image::queue::QueueConfig;
use xdisk_image::{AioKind, CacheMode};
use xdisk_nbd_server::{serve_connection, AnyStream, Export, ServerConfig, Stream};

/// Options of `xdisk nbd`.
#[derive(Args)]
pub struct NbdArgs {
    /// Image format (raw or qcow2); probed if not given (a probed image never opens its
    /// backing file).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// The export's name (the default export, "", always answers too).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// A description for clients (NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// TCP port.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// TCP address to bind.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// Clients served at once; more are refused.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects (default: exit then, as qemu-nbd).
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe).
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// I/O engine (io_uring, native, threads).
    #[arg(long = "aio", default_value = "io_uring")]
    aio: String,
    /// The image.
    image: PathBuf,
}

enum Event {
    Conn(AnyStream),
    Done,
}

/// Runs `xdisk nbd`.
pub fn run(a: NbdArgs) -> Result<i32> {
    let cache: CacheMode = a.cache.parse().map_err(|e| anyhow!("{e}"))?;
    let aio: AioKind = a.aio.parse().map_err(|e| anyhow!("{e}"))?;
    let image = crate::img::open(&a.image, a.format.as_deref(), a.read_only, cache)?;
    let cfg = Arc::new(ServerConfig {
        exports: vec![Export {
            name: a.export_name.clone(),
            description: a.description.clone(),
            image: image.clone(),
            read_only: a.read_only,
        }],
        queue: QueueConfig {
            aio,
            ..QueueConfig::default()
        },
        max_buffered: 64 << 20,
    });
    if a.shared == 0 {
        bail!("--shared must be at least 1");
    }
    let (tx, rx) = mpsc::channel::<Event>();
    match &a.socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p)
                .with_context(|| format!("cannot listen on {}", p.display()))?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    if tx.send(Event::Conn(AnyStream::Unix(s))).is_err() {
                        return;
                    }
                }
            });
        }
        None => {
            let l = TcpListener::bind((a.bind.as_str(), a.port))
                .with_context(|| format!("cannot listen on {}:{}", a.bind, a.port))?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let _ = s.set_nodelay(true);
                    if tx.send(Event::Conn(AnyStream::Tcp(s))).is_err() {
                        return;
                    }
                }
            });
        }
    }
    crate::daemon::sd_notify("READY=1");
    tracing::info!(image = %a.image.display(), "serving over NBD");
    let mut active = 0usize;
    let mut served = 0usize;
    while let Ok(ev) = rx.recv() {
        match ev {
            Event::Conn(s) => {
                if active >= a.shared {
                    tracing::warn!("refusing a client: {active} already connected (--shared)");
                    s.shutdown_both();
                    continue;
                }
                active += 1;
                served += 1;
                let cfg = cfg.clone();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(s, &cfg) {
                        tracing::warn!("NBD client: {e}");
                    }
                    let _ = tx.send(Event::Done);
                });
            }
            Event::Done => {
                active -= 1;
                if active == 0 && served > 0 && !a.persistent {
                    break;
                }
            }
        }
    }
    image.flush().context("flushing the image")?;
    image.close().context("closing the image")?;
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(0)
}
