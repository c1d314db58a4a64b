//! The listening side: accepts clients on unix and TCP sockets, serves each on its own
//! connection (two threads, see the crate's documentation), and bounds how many are served
//! at once. Clients over the limit are closed at once, so thousands of idle connections
//! hold no more than the limit's worth of threads and memory, and a client that never ends
//! its handshake is dropped after [`ServerConfig::handshake_timeout`].

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{serve_connection, AnyStream, ServerConfig, Stream};

/// A socket the server accepts clients on.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket, removed when the server ends.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a unix socket at `path` (a stale socket file there is replaced).
    pub fn unix(path: impl Into<PathBuf>) -> std::io::Result<Listener> {
        let path = path.into();
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Listener::Unix(UnixListener::bind(&path)?, path))
    }

    /// Binds a TCP socket.
    pub fn tcp(addr: &str, port: u16) -> std::io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind((addr, port))?))
    }

    fn accept(&self) -> std::io::Result<AnyStream> {
        match self {
            Listener::Unix(l, _) => Ok(AnyStream::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(true);
                Ok(AnyStream::Tcp(s))
            }
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Clients served at once; more are closed at once (qemu-nbd's `--shared`).
    pub max_connections: usize,
    /// Keep serving after the last client leaves (else the server ends then, as qemu-nbd
    /// without `--persistent`).
    pub persistent: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 1,
            persistent: false,
        }
    }
}

/// What a server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Clients served.
    pub served: u64,
    /// Clients closed at once because the limit was reached.
    pub refused: u64,
    /// Connections that ended with an error (protocol, handshake, I/O).
    pub failed: u64,
}

enum Event {
    Conn(AnyStream),
    /// A connection ended (its number, whether with an error).
    Done(u64, bool),
}

/// An NBD server: exports, sockets and options.
pub struct Server {
    cfg: Arc<ServerConfig>,
    listeners: Vec<Listener>,
    opts: ServeOptions,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// A server of `cfg` on `listeners`.
    pub fn new(cfg: Arc<ServerConfig>, listeners: Vec<Listener>, opts: ServeOptions) -> Server {
        Server {
            cfg,
            listeners,
            opts,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag that, once set, makes [`Server::run`] stop accepting, close the connections
    /// being served (their requests in flight complete first) and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Accepts and serves clients until the last one leaves (unless persistent) or the stop
    /// flag is set. Sockets are listening before this is called, so a caller can announce
    /// readiness first.
    pub fn run(mut self) -> std::io::Result<ServerStats> {
        let (tx, rx) = mpsc::channel::<Event>();
        let mut paths = Vec::new();
        for l in std::mem::take(&mut self.listeners) {
            if let Listener::Unix(_, p) = &l {
                paths.push(p.clone());
            }
            let tx = tx.clone();
            let stop = self.stop.clone();
            std::thread::Builder::new()
                .name("xdisk-nbd-accept".into())
                .spawn(move || loop {
                    match l.accept() {
                        Ok(s) => {
                            if stop.load(Ordering::Relaxed) || tx.send(Event::Conn(s)).is_err() {
                                return;
                            }
                        }
                        // Out of fds or memory: wait instead of spinning.
                        Err(e) => {
                            tracing::warn!("accepting an NBD client: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                })?;
        }
        let mut stats = ServerStats::default();
        // A second handle on each connection being served, to close it on stop.
        let mut conns: HashMap<u64, AnyStream> = HashMap::new();
        // Clients that came while the server was full, served if a slot frees within
        // WAIT_GRACE (a client that leaves and comes straight back, as `qemu-img` then
        // `qemu-io`, must not race the clean-up of its first connection).
        let mut waiting: VecDeque<(AnyStream, Instant)> = VecDeque::new();
        let mut closing = false;
        loop {
            let ev = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if self.stop.load(Ordering::Relaxed) {
                for (w, _) in waiting.drain(..) {
                    w.shutdown_both();
                }
                if conns.is_empty() {
                    break;
                }
                if !closing {
                    closing = true;
                    tracing::info!("closing {} NBD connection(s)", conns.len());
                    for c in conns.values() {
                        c.shutdown_both();
                    }
                }
            }
            while waiting
                .front()
                .is_some_and(|(_, t)| t.elapsed() >= WAIT_GRACE)
            {
                if let Some((w, _)) = waiting.pop_front() {
                    self.refuse(w, conns.len(), &mut stats);
                }
            }
            let Some(ev) = ev else { continue };
            match ev {
                Event::Conn(s) => {
                    if self.stop.load(Ordering::Relaxed) {
                        s.shutdown_both();
                    } else if conns.len() < self.opts.max_connections {
                        self.serve(s, &tx, &mut conns, &mut stats);
                    } else if waiting.len() < MAX_WAITING {
                        waiting.push_back((s, Instant::now()));
                    } else {
                        self.refuse(s, conns.len(), &mut stats);
                    }
                }
                Event::Done(id, failed) => {
                    conns.remove(&id);
                    stats.failed += u64::from(failed);
                    if !closing {
                        if let Some((w, _)) = waiting.pop_front() {
                            self.serve(w, &tx, &mut conns, &mut stats);
                        }
                    }
                    if conns.is_empty() && (!self.opts.persistent || closing) {
                        break;
                    }
                }
            }
        }
        for (w, _) in waiting {
            w.shutdown_both();
        }
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
        Ok(stats)
    }

    fn refuse(&self, s: AnyStream, active: usize, stats: &mut ServerStats) {
        stats.refused += 1;
        if stats.refused.is_power_of_two() {
            tracing::warn!(
                "refusing NBD clients: {active} connected (the limit); {} refused so far",
                stats.refused
            );
        }
        s.shutdown_both();
    }

    /// Serves `s` on a thread of its own.
    fn serve(
        &self,
        s: AnyStream,
        tx: &mpsc::Sender<Event>,
        conns: &mut HashMap<u64, AnyStream>,
        stats: &mut ServerStats,
    ) {
        let id = stats.served;
        let handle = match s.try_clone_stream() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("cannot serve an NBD client: {e}");
                return;
            }
        };
        let cfg = self.cfg.clone();
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("xdisk-nbd-conn".into())
            .spawn(move || {
                let r = serve_connection(s, &cfg);
                if let Err(e) = &r {
                    tracing::warn!("NBD client: {e}");
                }
                let _ = tx.send(Event::Done(id, r.is_err()));
            });
        match spawned {
            Ok(_) => {
                stats.served += 1;
                conns.insert(id, handle);
            }
            Err(e) => tracing::warn!("cannot serve an NBD client: {e}"),
        }
    }
}

/// How long a client that finds the server full waits for a slot before it is closed.
const WAIT_GRACE: Duration = Duration::from_millis(300);
/// Clients waiting for a slot at most; more are closed at once.
const MAX_WAITING: usize = 16;
