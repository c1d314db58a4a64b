//! xdisk's NBD server: exports [`Image`]s over NBD (the protocol is `xdisk-nbd`).
//!
//! One connection is two threads:
//! - a **reader** that reads request headers and write payloads from the socket, validates
//!   each request against what was negotiated ([`Command::from_header`]) and hands it over
//!   (a bounded number of payload bytes may wait, so a client cannot make the server buffer
//!   without end);
//! - the **I/O thread**, which owns the connection's [`ImageQueue`] (the same per-queue
//!   engine as a blkif queue: io_uring, zero-copy into the request's buffer), submits the
//!   requests, and writes each reply as its request completes, in any order.
//!
//! Replies follow what was negotiated: simple replies, structured replies (reads as one
//! `OFFSET_DATA` chunk, errors as `ERROR` chunks with a message) or extended headers.
//! `FUA` writes are followed by a flush before their reply. Block status answers the
//! `base:allocation` context from [`Image::block_status`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod server;
pub use server::{Listener, ServeOptions, Server, ServerStats};
/// TLS credentials and sessions (`xdisk-nbd-tls`).
pub use xdisk_nbd_tls as tls;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::Image;
use xdisk_io::sys::{drain_eventfd, poll_readable, EventFd};
use xdisk_io::AlignedBuf;
use xdisk_nbd::handshake::{
    negotiate, negotiate_in_tls, negotiate_with, ExportInfo, Exports, HandshakeError, Outcome, Tls,
};
use xdisk_nbd::wire::{self, *};

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The image engine failed (not a request's error: those go to the client).
    #[error("image: {0}")]
    Image(#[from] xdisk_image::Error),
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// TLS failed (the handshake, or the client's certificate).
    #[error("TLS: {0}")]
    Tls(String),
}

/// One export.
#[derive(Debug, Clone)]
pub struct Export {
    /// Its name (the first export is also the default one, name "").
    pub name: String,
    /// A description for humans.
    pub description: String,
    /// The image.
    pub image: Arc<Image>,
    /// Export it read-only.
    pub read_only: bool,
}

/// What the server does with `NBD_CMD_TRIM` (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Accept trims and do nothing (qemu-nbd's default).
    #[default]
    Ignore,
    /// Release the space (and let `WRITE_ZEROES` punch holes).
    Unmap,
}

/// Whether writes of zeroes become zero writes (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write what the client sends.
    #[default]
    Off,
    /// A write whose payload is all zeroes is done as a write of zeroes (no data stored
    /// where the format can say "zero": qcow2 zero clusters).
    On,
    /// As `On`, and the range is unmapped when discards are (`DiscardMode::Unmap`).
    Unmap,
}

/// What a server serves and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The exports (at least one).
    pub exports: Vec<Export>,
    /// Each connection's image queue.
    pub queue: QueueConfig,
    /// Bytes of requests read but not yet answered, per connection, at most: payloads of
    /// writes and reads, plus [`REQUEST_COST`] for each request. The reader stops reading
    /// the socket while the budget is spent, so a client that sends without reading replies
    /// holds a bounded amount of memory.
    pub max_buffered: u64,
    /// What trims do.
    pub discard: DiscardMode,
    /// Whether zero payloads are detected.
    pub detect_zeroes: DetectZeroes,
    /// The longest a client may take from connecting to the transmission phase (`None`:
    /// no limit).
    pub handshake_timeout: Option<Duration>,
    /// Advertise `CAN_MULTI_CONN` (it is always true of this server; say it only when the
    /// server takes more than one client, else clients such as nbdcopy open connections
    /// that are refused).
    pub multi_conn: bool,
    /// TLS (`None`: none, `NBD_OPT_STARTTLS` is refused). With TLS the server is TLS-only:
    /// a client must negotiate it before anything else.
    pub tls: Option<Arc<xdisk_nbd_tls::TlsServerConfig>>,
}

impl ServerConfig {
    /// A configuration serving `exports` with the defaults: the default image queue, 64 MiB
    /// in flight per connection, trims ignored, no zero detection, 10 s handshake limit.
    pub fn new(exports: Vec<Export>) -> ServerConfig {
        ServerConfig {
            exports,
            queue: QueueConfig::default(),
            max_buffered: 64 << 20,
            discard: DiscardMode::default(),
            detect_zeroes: DetectZeroes::default(),
            handshake_timeout: Some(Duration::from_secs(10)),
            multi_conn: true,
            tls: None,
        }
    }
}

/// What each request counts against [`ServerConfig::max_buffered`] beside its payload.
pub const REQUEST_COST: u64 = 1024;

/// The largest read or write payload (the spec's default maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

impl Exports for ServerConfig {
    fn names(&self) -> Vec<String> {
        self.exports.iter().map(|e| e.name.clone()).collect()
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let e = self.find(name)?;
        let mut f = flags::SEND_FLUSH
            | flags::SEND_FUA
            | flags::SEND_DF
            | flags::SEND_CACHE
            | flags::SEND_TRIM
            | flags::SEND_WRITE_ZEROES
            | flags::SEND_FAST_ZERO;
        // Every connection to an export shares one `Image` (one metadata cache, one file): a
        // flush on any connection writes back the shared metadata and syncs the file, so it
        // covers every write completed on any connection.
        if self.multi_conn {
            f |= flags::CAN_MULTI_CONN;
        }
        if e.read_only || e.image.read_only() {
            f |= flags::READ_ONLY;
            f &= !(flags::SEND_TRIM | flags::SEND_WRITE_ZEROES | flags::SEND_FAST_ZERO);
        }
        Some(ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: e.image.size(),
            flags: f,
            block: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_PAYLOAD,
            },
        })
    }
    fn contexts(&self) -> Vec<String> {
        vec![CTX_ALLOCATION.to_owned(), CTX_DEPTH.to_owned()]
    }
}

/// The `base:allocation` metadata context.
const CTX_ALLOCATION: &str = "base:allocation";
/// QEMU's `qemu:allocation-depth` context: 0 where no layer of the chain allocates a range,
/// 1 where the image itself does, 2 where its backing file does, and so on.
const CTX_DEPTH: &str = "qemu:allocation-depth";

impl ServerConfig {
    fn find(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }
}

/// A connected client's stream: read and write halves that can live on two threads.
pub trait Stream: Read + Write + AsRawFd + Send + 'static {
    /// A second handle on the same connection.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Shuts both directions down (unblocks the reader).
    fn shutdown_both(&self);
    /// Bounds each read and write (`None`: blocking without limit).
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// A stream whose every read and write must end before a deadline (the handshake's): each
/// call is bounded by the time left, so a client trickling a byte at a time cannot stretch
/// it.
struct Deadline<'a, S: Stream> {
    s: &'a mut S,
    /// `None`: no limit.
    end: Option<std::time::Instant>,
}

impl<S: Stream> Deadline<'_, S> {
    fn arm(&self) -> io::Result<()> {
        let Some(end) = self.end else {
            return Ok(());
        };
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake took too long",
            ));
        }
        self.s.set_timeouts(Some(left))
    }
}

impl<S: Stream> Read for Deadline<'_, S> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.read(b)
    }
}

impl<S: Stream> Write for Deadline<'_, S> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// A unix or TCP connection (what a server that listens on either hands out).
#[derive(Debug)]
pub enum AnyStream {
    /// A unix socket connection.
    Unix(std::os::unix::net::UnixStream),
    /// A TCP connection.
    Tcp(std::net::TcpStream),
}

impl Read for AnyStream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            AnyStream::Unix(s) => s.read(b),
            AnyStream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for AnyStream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            AnyStream::Unix(s) => s.write(b),
            AnyStream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            AnyStream::Unix(s) => s.flush(),
            AnyStream::Tcp(s) => s.flush(),
        }
    }
}

impl AsRawFd for AnyStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            AnyStream::Unix(s) => s.as_raw_fd(),
            AnyStream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Stream for AnyStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(match self {
            AnyStream::Unix(s) => AnyStream::Unix(s.try_clone()?),
            AnyStream::Tcp(s) => AnyStream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown_both(&self) {
        match self {
            AnyStream::Unix(s) => s.shutdown_both(),
            AnyStream::Tcp(s) => s.shutdown_both(),
        }
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            AnyStream::Unix(s) => s.set_timeouts(t),
            AnyStream::Tcp(s) => s.set_timeouts(t),
        }
    }
}

/// A request the reader hands to the I/O thread.
enum Msg {
    /// A valid request (with its payload, for writes).
    Cmd(RequestHeader, Command, Option<AlignedBuf>),
    /// A request refused with an error reply.
    Refused(RequestHeader, u32, String),
    /// The client disconnected (cleanly or not) or broke the protocol.
    End(Option<String>),
}

/// Bytes of requests read and not yet answered (see [`ServerConfig::max_buffered`]). Only
/// the reader takes and only the I/O thread gives, so the fast path is one atomic operation
/// each; the lock and condition variable are used only while the reader waits.
struct Budget {
    used: AtomicU64,
    max: u64,
    /// The reader waits (the I/O thread must notify when it gives).
    waiting: AtomicBool,
    /// The connection is over (the reader must not wait).
    closed: AtomicBool,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Budget {
    fn new(max: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            max,
            waiting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            freed: Condvar::new(),
        }
    }

    /// Whether `n` more bytes fit (one request larger than the budget still goes alone).
    fn fits(&self, n: u64) -> bool {
        let cur = self.used.load(Ordering::SeqCst);
        cur == 0 || cur.saturating_add(n) <= self.max
    }

    /// Takes `n` bytes, waiting while the budget is spent; false once the connection is over.
    fn take(&self, n: u64) -> bool {
        while !self.fits(n) {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.waiting.store(true, Ordering::SeqCst);
            // Checked again after announcing the wait: a give() in between either is seen
            // here or sees `waiting` and notifies (under the lock, so not before we wait).
            if !self.fits(n) && !self.closed.load(Ordering::SeqCst) {
                let _ = self
                    .freed
                    .wait_timeout(g, Duration::from_millis(500))
                    .unwrap_or_else(|e| e.into_inner());
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
        // Only this thread adds: what fitted still fits.
        self.used.fetch_add(n, Ordering::SeqCst);
        !self.closed.load(Ordering::SeqCst)
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.freed.notify_all();
        }
    }

    /// Ends the connection: a reader waiting in `take` returns.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.freed.notify_all();
    }
}

/// How the reader tells the I/O thread that requests wait: an eventfd written only when the
/// I/O thread sleeps or is about to (a busy connection costs no system call per request).
struct Doorbell {
    fd: EventFd,
    /// Messages sent by the reader.
    posted: AtomicU64,
    /// The I/O thread is going to sleep in poll(2).
    sleeping: AtomicBool,
}

impl Doorbell {
    /// After each message sent.
    fn ring(&self) {
        self.posted.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.fd.signal();
        }
    }

    /// Before sleeping, with the number of messages received so far: false if more were
    /// posted (do not sleep). Either this sees the reader's count or the reader sees
    /// `sleeping` and writes the eventfd.
    fn may_sleep(&self, received: u64) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.posted.load(Ordering::SeqCst) != received {
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn woke(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        self.fd.drain();
    }
}

/// What a request counts against the budget: its payload (either way) and [`REQUEST_COST`].
fn cost(c: &Command) -> u64 {
    let payload = match *c {
        Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
        _ => 0,
    };
    payload + REQUEST_COST
}

/// Request buffers of one connection, reused: a fresh buffer of a MiB costs a mapping and
/// hundreds of page faults. Sizes are powers of two (at least 4 KiB); at most
/// [`POOL_BYTES`] stay pooled.
struct BufPool {
    bufs: Mutex<Vec<AlignedBuf>>,
    align: usize,
}

/// The most bytes of buffers a connection keeps for reuse.
const POOL_BYTES: usize = 64 << 20;

impl BufPool {
    fn get(&self, len: usize) -> AlignedBuf {
        let cap = len.next_power_of_two().max(4096);
        let found = {
            let mut v = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
            v.iter()
                .position(|b| b.capacity() == cap)
                .map(|i| v.swap_remove(i))
        };
        let mut b = found.unwrap_or_else(|| AlignedBuf::new(cap, self.align));
        b.set_len(len);
        b
    }

    fn put(&self, b: AlignedBuf) {
        let mut v = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = v.iter().map(AlignedBuf::capacity).sum();
        if held + b.capacity() <= POOL_BYTES {
            v.push(b);
        }
    }
}

/// Serves one client on `stream` until it disconnects. With [`ServerConfig::tls`], the
/// client must negotiate TLS first, and the connection then goes through a TLS pump
/// ([`xdisk_nbd_tls::pump`]); the handshake deadline covers the TLS handshake too.
pub fn serve_connection<S: Stream>(mut stream: S, cfg: &ServerConfig) -> Result<(), Error> {
    let end = cfg.handshake_timeout.map(|t| std::time::Instant::now() + t);
    let Some(tls) = &cfg.tls else {
        let outcome = negotiate(
            &mut Deadline {
                s: &mut stream,
                end,
            },
            cfg,
        )?;
        let Some((info, n, contexts)) = transmission(outcome) else {
            return Ok(());
        };
        // Transmission: a client may stay idle as long as it likes.
        stream.set_timeouts(None)?;
        return transmit(stream, cfg, info, n, contexts);
    };
    let mut conn =
        xdisk_nbd_tls::ServerConnection::new(tls.clone()).map_err(|e| Error::Tls(e.to_string()))?;
    let outcome = {
        let mut d = Deadline {
            s: &mut stream,
            end,
        };
        let no_zeroes = match negotiate_with(&mut d, cfg, Tls::Required)? {
            Outcome::StartTls { no_zeroes } => no_zeroes,
            _ => return Ok(()),
        };
        d.flush()?;
        xdisk_nbd_tls::handshake(&mut conn, &mut d)
            .map_err(|e| Error::Tls(format!("TLS handshake: {e}")))?;
        negotiate_in_tls(&mut rustls_stream(&mut conn, &mut d), cfg, no_zeroes)?
    };
    let Some((info, n, contexts)) = transmission(outcome) else {
        return Ok(());
    };
    stream.set_timeouts(None)?;
    let plain = xdisk_nbd_tls::pump(conn, stream)?;
    transmit(plain, cfg, info, n, contexts)
}

/// A blocking stream over a TLS session.
fn rustls_stream<'a, S: Read + Write>(
    conn: &'a mut xdisk_nbd_tls::ServerConnection,
    s: &'a mut S,
) -> xdisk_nbd_tls::TlsStream<'a, xdisk_nbd_tls::ServerConnection, S> {
    xdisk_nbd_tls::TlsStream::new(conn, s)
}

/// What the transmission phase starts with: the export, what was negotiated, the selected
/// metadata contexts.
type Start = (ExportInfo, Negotiated, Vec<(u32, String)>);

/// The transmission phase's start, if the handshake got there.
fn transmission(o: Outcome) -> Option<Start> {
    match o {
        Outcome::Transmission {
            export,
            negotiated,
            contexts,
        } => Some((export, negotiated, contexts)),
        Outcome::Closed | Outcome::StartTls { .. } => None,
    }
}

/// The transmission phase on `stream` (a client's socket, or the plain end of its TLS
/// pump).
fn transmit<S: Stream>(
    stream: S,
    cfg: &ServerConfig,
    info: ExportInfo,
    n: Negotiated,
    contexts: Vec<(u32, String)>,
) -> Result<(), Error> {
    let export = cfg
        .find(&info.name)
        .ok_or_else(|| Error::Protocol("export vanished".into()))?
        .clone();
    let reader_stream = stream.try_clone_stream()?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let wake = Arc::new(Doorbell {
        fd: EventFd::new()?,
        posted: AtomicU64::new(0),
        sleeping: AtomicBool::new(false),
    });
    let budget = Arc::new(Budget::new(
        cfg.max_buffered.max(u64::from(MAX_PAYLOAD) + REQUEST_COST),
    ));
    let pool = Arc::new(BufPool {
        bufs: Mutex::new(Vec::new()),
        align: export.image.storage().alignment().buffer_align(),
    });
    let reader = {
        let wake = wake.clone();
        let budget = budget.clone();
        let pool = pool.clone();
        std::thread::Builder::new()
            .name("xdisk-nbd-read".into())
            .spawn(move || {
                // Headers are small: one read(2) per many of them.
                let r = io::BufReader::with_capacity(256 << 10, reader_stream);
                read_requests(r, n, tx, &wake, &budget, &pool)
            })?
    };
    // Replies are gathered and sent once per loop (flushed before the loop sleeps).
    let mut writer = io::BufWriter::with_capacity(256 << 10, stream.try_clone_stream()?);
    let context = |name: &str| contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id);
    let queue = ImageQueue::new(export.image.clone(), &cfg.queue);
    let r = match queue {
        Ok(queue) => Connection {
            image: export.image.clone(),
            queue,
            n,
            base_allocation: context(CTX_ALLOCATION),
            allocation_depth: context(CTX_DEPTH),
            discard: cfg.discard,
            detect_zeroes: cfg.detect_zeroes,
            pending: HashMap::new(),
            next: 0,
            budget: budget.clone(),
            pool,
        }
        .run(&mut writer, &rx, &wake),
        Err(e) => Err(e.into()),
    };
    let _ = writer.flush();
    budget.close();
    stream.shutdown_both();
    let _ = reader.join();
    r
}

/// Reads requests until the client disconnects or breaks the protocol.
fn read_requests<S: Read>(
    mut s: S,
    n: Negotiated,
    tx: mpsc::Sender<Msg>,
    wake: &Doorbell,
    budget: &Budget,
    pool: &BufPool,
) {
    let send = |m: Msg| {
        let ok = tx.send(m).is_ok();
        wake.ring();
        ok
    };
    loop {
        let h = if n.extended {
            let mut b = [0u8; EXTENDED_REQUEST_LEN];
            if s.read_exact(&mut b).is_err() {
                send(Msg::End(None));
                return;
            }
            RequestHeader::parse_extended(&b)
        } else {
            let mut b = [0u8; REQUEST_LEN];
            if s.read_exact(&mut b).is_err() {
                send(Msg::End(None));
                return;
            }
            RequestHeader::parse_compact(&b)
        };
        let h = match h {
            Ok(h) => h,
            Err(e) => {
                send(Msg::End(Some(e.to_string())));
                return;
            }
        };
        let payload = h.payload_len();
        let msg = match Command::from_header(&h, &n) {
            Ok(Command::Disconnect) => {
                send(Msg::End(None));
                return;
            }
            Ok(c) => {
                // Wait here (not reading the socket) while too much is unanswered.
                if !budget.take(cost(&c)) {
                    return;
                }
                let buf = match c {
                    Command::Write { len, .. } => {
                        let mut buf = pool.get(len as usize);
                        if s.read_exact(&mut buf).is_err() {
                            send(Msg::End(Some(
                                "connection closed in a write payload".into(),
                            )));
                            return;
                        }
                        Some(buf)
                    }
                    _ => None,
                };
                Msg::Cmd(h, c, buf)
            }
            Err(RequestError::Reply { errno, message }) => {
                // Skip the payload (bounded by from_header: at most the maximum).
                if payload > 0
                    && io::copy(&mut (&mut s).take(payload), &mut io::sink()).ok() != Some(payload)
                {
                    send(Msg::End(None));
                    return;
                }
                if !budget.take(REQUEST_COST) {
                    return;
                }
                Msg::Refused(h, errno, message)
            }
            Err(RequestError::Fatal(m)) => {
                send(Msg::End(Some(m)));
                return;
            }
        };
        if !send(msg) {
            return;
        }
    }
}

/// A request submitted to the queue.
struct Pending {
    h: RequestHeader,
    cmd: Command,
    /// A FUA write whose data is done and whose flush is now running.
    flushing: bool,
}

struct Connection {
    image: Arc<Image>,
    queue: ImageQueue<AlignedBuf>,
    n: Negotiated,
    base_allocation: Option<u32>,
    allocation_depth: Option<u32>,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
    pending: HashMap<u64, Pending>,
    next: u64,
    budget: Arc<Budget>,
    pool: Arc<BufPool>,
}

/// Reads at least this long are answered with `OFFSET_HOLE` chunks where the image reads as
/// zeroes (when the client allows fragmented replies). Smaller reads are not looked up: the
/// lookup would cost more than the bytes it saves.
const SPARSE_READ_MIN: u32 = 64 << 10;

impl Connection {
    fn run<W: Write>(
        &mut self,
        w: &mut W,
        rx: &mpsc::Receiver<Msg>,
        wake: &Doorbell,
    ) -> Result<(), Error> {
        let mut done: Vec<IoDone<AlignedBuf>> = Vec::new();
        let mut ending: Option<Option<String>> = None;
        let mut received = 0u64;
        loop {
            while ending.is_none() {
                let m = rx.try_recv();
                if m.is_ok() {
                    received += 1;
                }
                match m {
                    Ok(Msg::Cmd(h, c, buf)) => self.start(w, h, c, buf)?,
                    Ok(Msg::Refused(h, errno, msg)) => {
                        self.error_reply(w, &h, errno, &msg)?;
                        self.budget.give(REQUEST_COST);
                    }
                    Ok(Msg::End(why)) => ending = Some(why),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => ending = Some(None),
                }
            }
            self.queue.commit()?;
            done.clear();
            self.queue.reap(&mut done, 0, Some(Duration::ZERO))?;
            for d in done.drain(..) {
                self.completed(w, d)?;
            }
            w.flush()?;
            if let Some(why) = &ending {
                if self.pending.is_empty() {
                    return match why {
                        None => Ok(()),
                        Some(m) => Err(Error::Protocol(m.clone())),
                    };
                }
            }
            if !wake.may_sleep(received) {
                continue;
            }
            let [a, b] = self.queue.event_fds();
            // The queue's fds wake us for its completions; the timeout only bounds a missed
            // wake-up while requests are in flight.
            let timeout_ms = if self.pending.is_empty() { -1 } else { 100 };
            let ready = poll_readable(&[wake.fd.fd(), a, b], timeout_ms);
            wake.woke();
            // The queue's eventfds are cleared before the next reap (a completion arriving
            // meanwhile wakes the next poll); left readable they would make every poll
            // return at once and the thread spin.
            for (fd, r) in [a, b].into_iter().zip(ready?.into_iter().skip(1)) {
                if r {
                    drain_eventfd(fd);
                }
            }
        }
    }

    fn submit(&mut self, kind: IoKind, offset: u64, buf: Option<AlignedBuf>, p: Pending) {
        let id = self.next;
        self.next += 1;
        self.pending.insert(id, p);
        self.queue.submit(IoRequest {
            kind,
            offset,
            buf,
            user_data: id,
        });
    }

    /// Answers a request that needs no I/O and returns its budget.
    fn answered<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        cmd: &Command,
        error: Option<(u32, &str)>,
    ) -> Result<(), Error> {
        let r = match error {
            Some((errno, msg)) => self.error_reply(w, h, errno, msg),
            None => self.ok_reply(w, h),
        };
        self.budget.give(cost(cmd));
        r
    }

    fn start<W: Write>(
        &mut self,
        w: &mut W,
        h: RequestHeader,
        cmd: Command,
        buf: Option<AlignedBuf>,
    ) -> Result<(), Error> {
        let p = Pending {
            h,
            cmd,
            flushing: false,
        };
        match cmd {
            Command::Read { offset, len, df } => {
                if self.n.structured && !df && len >= SPARSE_READ_MIN && self.hole(offset, len) {
                    let r = self.hole_reply(w, &h, offset, len);
                    self.budget.give(cost(&cmd));
                    return r;
                }
                let b = self.pool.get(len as usize);
                self.submit(IoKind::Read, offset, Some(b), p);
            }
            Command::Write { offset, len, .. } => {
                let zero =
                    self.detect_zeroes != DetectZeroes::Off && buf.as_deref().is_some_and(is_zero);
                if zero {
                    if let Some(b) = buf {
                        self.pool.put(b);
                    }
                    let unmap = self.detect_zeroes == DetectZeroes::Unmap
                        && self.discard == DiscardMode::Unmap;
                    self.submit(
                        IoKind::WriteZeroes {
                            len: len.into(),
                            unmap,
                        },
                        offset,
                        None,
                        p,
                    )
                } else {
                    self.submit(IoKind::Write, offset, buf, p)
                }
            }
            Command::Flush => self.submit(IoKind::Flush, 0, None, p),
            Command::Trim { offset, len, fua } => match self.discard {
                DiscardMode::Unmap => self.submit(IoKind::Discard { len }, offset, None, p),
                // Trims are advisory: ignored, they succeed (with FUA, as a flush would have
                // nothing of theirs to make durable).
                DiscardMode::Ignore if fua => {
                    let p = Pending {
                        flushing: true,
                        ..p
                    };
                    self.submit(IoKind::Flush, 0, None, p)
                }
                DiscardMode::Ignore => self.answered(w, &h, &cmd, None)?,
            },
            Command::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                ..
            } => {
                if fast && !self.fast_zero(offset, len) {
                    // The client would rather write the zeroes itself than wait for us to.
                    return self.answered(
                        w,
                        &h,
                        &cmd,
                        Some((
                            errno::ENOTSUP,
                            "zeroing this range is not faster than writing",
                        )),
                    );
                }
                self.submit(
                    IoKind::WriteZeroes {
                        len,
                        unmap: !no_hole && self.discard == DiscardMode::Unmap,
                    },
                    offset,
                    None,
                    p,
                )
            }
            Command::Cache { .. } => self.answered(w, &h, &cmd, None)?,
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let r = self.block_status(w, &h, offset, len, req_one);
                self.budget.give(cost(&cmd));
                r?
            }
            Command::Disconnect => {}
        }
        Ok(())
    }

    /// Whether zeroing `[offset, offset + len)` is a metadata update (`NBD_CMD_FLAG_FAST_ZERO`):
    /// whole clusters of a qcow2 v3 image (zero clusters). Raw images answer no: whether the
    /// storage zeroes a range without writing it (fallocate) cannot be known in advance.
    fn fast_zero(&self, offset: u64, len: u64) -> bool {
        self.image.as_qcow2().is_some_and(|q| {
            let h = q.header();
            let cluster = 1u64 << h.cluster_bits;
            h.version >= 3 && offset.is_multiple_of(cluster) && len.is_multiple_of(cluster)
        })
    }

    /// Whether `[offset, offset + len)` reads as zeroes, by the image's metadata.
    fn hole(&self, offset: u64, len: u32) -> bool {
        matches!(self.image.block_status(offset, len.into()),
            Ok(st) if st.zero && st.len >= u64::from(len))
    }

    fn completed<W: Write>(&mut self, w: &mut W, d: IoDone<AlignedBuf>) -> Result<(), Error> {
        let Some(mut p) = self.pending.remove(&d.user_data) else {
            return Ok(());
        };
        let buf = d.buf;
        if let Err(e) = d.result {
            if let Some(b) = buf {
                self.pool.put(b);
            }
            let errno = match &e {
                xdisk_image::Error::Io { source, .. } => {
                    source.raw_os_error().map_or(errno::EIO, errno::from_errno)
                }
                xdisk_image::Error::OutOfRange { .. } => errno::EINVAL,
                xdisk_image::Error::ReadOnly => errno::EPERM,
                xdisk_image::Error::NoSpace(_) => errno::ENOSPC,
                _ => errno::EIO,
            };
            if let (Command::Read { offset, .. }, true) = (p.cmd, self.n.structured) {
                // A failed read says where (the spec's ERROR_OFFSET): at its start, as the
                // engine reports the request, not the byte, that failed.
                let r = self.error_offset_reply(w, &p.h, errno, &e.to_string(), offset);
                self.budget.give(cost(&p.cmd));
                return r;
            }
            return self.answered(w, &p.h, &p.cmd, Some((errno, &e.to_string())));
        }
        let fua = matches!(
            p.cmd,
            Command::Write { fua: true, .. }
                | Command::Trim { fua: true, .. }
                | Command::WriteZeroes { fua: true, .. }
        );
        if fua && !p.flushing {
            if let Some(b) = buf {
                self.pool.put(b);
            }
            p.flushing = true;
            self.submit(IoKind::Flush, 0, None, p);
            return Ok(());
        }
        let r = match (p.cmd, &buf) {
            (Command::Read { offset, .. }, Some(b)) => self.read_reply(w, &p.h, offset, b),
            _ => self.ok_reply(w, &p.h),
        };
        if let Some(b) = buf {
            self.pool.put(b);
        }
        self.budget.give(cost(&p.cmd));
        r
    }

    fn read_reply<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        if self.n.structured {
            let hdr = chunk_header(
                self.n.extended,
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                h.cookie,
                h.offset,
                8 + data.len() as u64,
            );
            w.write_all(&hdr)?;
            w.write_all(&offset.to_be_bytes())?;
        } else {
            w.write_all(&simple_reply(h.cookie, 0))?;
        }
        w.write_all(data)?;
        Ok(())
    }

    /// A read of a range that reads as zeroes: one `OFFSET_HOLE` chunk.
    fn hole_reply<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        offset: u64,
        len: u32,
    ) -> Result<(), Error> {
        w.write_all(&chunk_header(
            self.n.extended,
            reply::FLAG_DONE,
            reply::OFFSET_HOLE,
            h.cookie,
            h.offset,
            12,
        ))?;
        w.write_all(&offset.to_be_bytes())?;
        w.write_all(&len.to_be_bytes())?;
        Ok(())
    }

    fn ok_reply<W: Write>(&self, w: &mut W, h: &RequestHeader) -> Result<(), Error> {
        if self.n.extended {
            w.write_all(&chunk_header(
                true,
                reply::FLAG_DONE,
                reply::NONE,
                h.cookie,
                h.offset,
                0,
            ))?;
        } else {
            w.write_all(&simple_reply(h.cookie, 0))?;
        }
        Ok(())
    }

    fn error_offset_reply<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        errno: u32,
        msg: &str,
        offset: u64,
    ) -> Result<(), Error> {
        let p = error_payload(errno, msg, Some(offset));
        w.write_all(&chunk_header(
            self.n.extended,
            reply::FLAG_DONE,
            reply::ERROR_OFFSET,
            h.cookie,
            h.offset,
            p.len() as u64,
        ))?;
        w.write_all(&p)?;
        Ok(())
    }

    fn error_reply<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        errno: u32,
        msg: &str,
    ) -> Result<(), Error> {
        if self.n.structured {
            let p = error_payload(errno, msg, None);
            w.write_all(&chunk_header(
                self.n.extended,
                reply::FLAG_DONE,
                reply::ERROR,
                h.cookie,
                h.offset,
                p.len() as u64,
            ))?;
            w.write_all(&p)?;
        } else {
            // A simple reply to a failed read carries no data.
            w.write_all(&simple_reply(h.cookie, errno))?;
        }
        Ok(())
    }

    /// Block status of `[offset, offset + len)` from the image's block status, one chunk per
    /// selected context (`base:allocation`, `qemu:allocation-depth`), at most 2^20 extents
    /// each, as the spec asks.
    fn block_status<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<(), Error> {
        let wanted: Vec<(u32, bool)> = [
            self.base_allocation.map(|id| (id, false)),
            self.allocation_depth.map(|id| (id, true)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if wanted.is_empty() {
            return self.error_reply(w, h, errno::EINVAL, "no context selected");
        }
        const MAX_EXTENTS: usize = 1 << 20;
        let mut alloc: Vec<Extent> = Vec::new();
        let mut depth: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end && alloc.len() < MAX_EXTENTS && depth.len() < MAX_EXTENTS {
            let st = match self.image.block_status(pos, end - pos) {
                Ok(s) => s,
                Err(e) => return self.error_reply(w, h, errno::EIO, &e.to_string()),
            };
            let step = st.len.clamp(1, end - pos);
            let mut f = 0;
            if st.zero {
                f |= wire::allocation::ZERO;
            }
            // As QEMU's server: a hole wherever no host data answers.
            if !st.data {
                f |= wire::allocation::HOLE;
            }
            let d = if st.present { st.depth + 1 } else { 0 };
            for (v, flags) in [(&mut alloc, f), (&mut depth, d)] {
                // Runs with the same value merge (the two contexts change at other places).
                match v.last_mut() {
                    Some(e) if e.flags == flags && !req_one => e.len += step,
                    _ => v.push(Extent { len: step, flags }),
                }
            }
            pos += step;
            if req_one {
                break;
            }
        }
        let kind = if self.n.extended {
            reply::BLOCK_STATUS_EXT
        } else {
            reply::BLOCK_STATUS
        };
        for (i, (id, is_depth)) in wanted.iter().enumerate() {
            let extents = if *is_depth { &depth } else { &alloc };
            let payload = block_status_payload(self.n.extended, *id, extents);
            let flags = if i + 1 == wanted.len() {
                reply::FLAG_DONE
            } else {
                0
            };
            w.write_all(&chunk_header(
                self.n.extended,
                flags,
                kind,
                h.cookie,
                h.offset,
                payload.len() as u64,
            ))?;
            w.write_all(&payload)?;
        }
        Ok(())
    }
}

/// Whether a buffer holds only zeroes.
fn is_zero(b: &[u8]) -> bool {
    // Eight bytes at a time, then the tail.
    let mut words = b.chunks_exact(8);
    words.all(|c| c == [0u8; 8]) && words.remainder().iter().all(|&x| x == 0)
}
