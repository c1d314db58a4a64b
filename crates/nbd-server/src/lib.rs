//! xdisk's NBD server: exports [`Image`]s over NBD (the protocol is `xdisk-nbd`).
//!
//! One connection is one thread (plus, with TLS, the thread that runs the TLS session). After
//! the handshake its socket is non-blocking and the thread loops: it reads what the socket
//! has (many request headers per read, write payloads straight into their buffers), validates
//! each request against what was negotiated ([`Command::from_header`]), submits it to the
//! connection's [`ImageQueue`] (the same per-queue engine as a blkif queue: io_uring,
//! zero-copy into the request's buffer), reaps completions and writes their replies in any
//! order (one `writev` for many; read data from the read's own buffer), and sleeps in poll(2)
//! on the socket and the queue's eventfds when there is nothing to do. Memory is bounded:
//! requests are read only while the bytes unanswered ([`ServerConfig::max_buffered`]) and
//! the replies not yet taken by the client stay under the limit.
//!
//! Replies follow what was negotiated: simple replies, structured replies (reads as one
//! `OFFSET_DATA` chunk, or `OFFSET_HOLE` where the image reads as zeroes; errors as `ERROR`
//! or `ERROR_OFFSET` chunks with a message) or extended headers.
//! `FUA` writes are followed by a flush before their reply. Block status answers the
//! `base:allocation` context from [`Image::block_status`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod server;
pub use server::{Listener, ServeOptions, Server, ServerStats};
/// TLS credentials and sessions (`xdisk-nbd-tls`).
pub use xdisk_nbd_tls as tls;

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xdisk_image::qcow2::bitmap::DirtyBitmap;
use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::Image;
use xdisk_io::sys::{drain_eventfd, poll_rw};
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
    /// Dirty bitmaps offered as QEMU's `qemu:dirty-bitmap:NAME` metadata contexts (QEMU's
    /// docs/interop/nbd.rst: bit 0 of an extent's flags, `NBD_STATE_DIRTY`, set where the
    /// bitmap is dirty), by name: frozen copies (`xdisk backup` exports the bits as of its
    /// instant next to the point-in-time view).
    pub bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
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
    fn contexts(&self, export: &str) -> Vec<String> {
        let mut v = vec![CTX_ALLOCATION.to_owned(), CTX_DEPTH.to_owned()];
        if let Some(e) = self.find(export) {
            v.extend(e.bitmaps.iter().map(|(n, _)| format!("{CTX_BITMAP}{n}")));
        }
        v
    }
}

/// The `base:allocation` metadata context.
const CTX_ALLOCATION: &str = "base:allocation";
/// QEMU's `qemu:allocation-depth` context: 0 where no layer of the chain allocates a range,
/// 1 where the image itself does, 2 where its backing file does, and so on.
const CTX_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of QEMU's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
const CTX_BITMAP: &str = "qemu:dirty-bitmap:";

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
    /// Makes reads and writes non-blocking (the transmission phase).
    fn set_nonblocking_stream(&self, on: bool) -> io::Result<()>;
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
    fn set_nonblocking_stream(&self, on: bool) -> io::Result<()> {
        self.set_nonblocking(on)
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
    fn set_nonblocking_stream(&self, on: bool) -> io::Result<()> {
        self.set_nonblocking(on)
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
    // Without this, `write_vectored` falls back to writing the first slice only: every reply
    // took a send(2) for its header and another for its data, one reply at a time.
    fn write_vectored(&mut self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            AnyStream::Unix(s) => s.write_vectored(b),
            AnyStream::Tcp(s) => s.write_vectored(b),
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
    fn set_nonblocking_stream(&self, on: bool) -> io::Result<()> {
        match self {
            AnyStream::Unix(s) => s.set_nonblocking(on),
            AnyStream::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

/// Bytes of requests read and not yet answered (see [`ServerConfig::max_buffered`]).
struct Budget {
    used: Cell<u64>,
    max: u64,
}

impl Budget {
    /// Whether `n` more bytes fit (one request larger than the budget still goes alone).
    fn fits(&self, n: u64) -> bool {
        let cur = self.used.get();
        cur == 0 || cur.saturating_add(n) <= self.max
    }
    fn take(&self, n: u64) {
        self.used.set(self.used.get().saturating_add(n));
    }
    fn give(&self, n: u64) {
        self.used.set(self.used.get().saturating_sub(n));
    }
}

/// Replies not yet written to the socket: small byte runs (headers, errors, block status)
/// and read buffers sent as they are (one `writev` for many), which go back to the pool once
/// written.
struct Out {
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    front_off: usize,
    /// Bytes queued.
    bytes: usize,
    pool: Arc<BufPool>,
}

enum Seg {
    Bytes(Vec<u8>),
    Buf(AlignedBuf),
}

impl Seg {
    fn as_slice(&self) -> &[u8] {
        match self {
            Seg::Bytes(v) => v,
            Seg::Buf(b) => b,
        }
    }
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.bytes += b.len();
        match self.segs.back_mut() {
            Some(Seg::Bytes(v)) if v.len() < 64 << 10 => v.extend_from_slice(b),
            _ => self.segs.push_back(Seg::Bytes(b.to_vec())),
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Out {
    fn push_buf(&mut self, b: AlignedBuf) {
        self.bytes += b.len();
        self.segs.push_back(Seg::Buf(b));
    }

    /// Writes what the socket takes; true once everything is written.
    fn send<S: Write>(&mut self, s: &mut S) -> io::Result<bool> {
        while !self.segs.is_empty() {
            let n = {
                let mut v: Vec<io::IoSlice<'_>> = Vec::with_capacity(16);
                for (i, seg) in self.segs.iter().take(16).enumerate() {
                    let b = seg.as_slice();
                    v.push(io::IoSlice::new(if i == 0 {
                        &b[self.front_off..]
                    } else {
                        b
                    }));
                }
                match s.write_vectored(&v) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            self.advance(n);
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.segs.front() else {
                return;
            };
            let left = front.as_slice().len() - self.front_off;
            if n < left {
                self.front_off += n;
                return;
            }
            n -= left;
            self.front_off = 0;
            if let Some(Seg::Buf(b)) = self.segs.pop_front() {
                self.pool.put(b);
            }
        }
    }
}

/// Requests read from the socket and not yet started: a buffer of bytes, a write whose
/// payload is still coming, payload bytes of a refused write still to skip.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    partial: Option<(RequestHeader, Command, AlignedBuf, usize)>,
    skip: u64,
    eof: bool,
    /// The next request waits for budget.
    blocked: bool,
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
/// [`POOL_BYTES`] of memory stay pooled (counted as [`AlignedBuf::footprint`]: a 1 MiB
/// buffer in a huge page counts 2 MiB).
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
        // From 1 MiB in huge pages: a request's data reaches the disk in few segments
        // (`AlignedBuf::large`; a 1 MiB buffer takes a whole 2 MiB page, counted in `put`).
        let mut b = found.unwrap_or_else(|| AlignedBuf::large(cap, self.align));
        b.set_len(len);
        b
    }

    fn put(&self, b: AlignedBuf) {
        let mut v = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = v.iter().map(AlignedBuf::footprint).sum();
        if held + b.footprint() <= POOL_BYTES {
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
    mut stream: S,
    cfg: &ServerConfig,
    info: ExportInfo,
    n: Negotiated,
    contexts: Vec<(u32, String)>,
) -> Result<(), Error> {
    let export = cfg
        .find(&info.name)
        .ok_or_else(|| Error::Protocol("export vanished".into()))?
        .clone();
    let pool = Arc::new(BufPool {
        bufs: Mutex::new(Vec::new()),
        align: export.image.storage().alignment().buffer_align(),
    });
    let context = |name: &str| contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id);
    let max = cfg.max_buffered.max(u64::from(MAX_PAYLOAD) + REQUEST_COST);
    stream.set_nonblocking_stream(true)?;
    let mut out = Out {
        segs: VecDeque::new(),
        front_off: 0,
        bytes: 0,
        pool: pool.clone(),
    };
    let r = match ImageQueue::new(export.image.clone(), &cfg.queue) {
        Ok(queue) => Connection {
            image: export.image.clone(),
            queue,
            n,
            base_allocation: context(CTX_ALLOCATION),
            allocation_depth: context(CTX_DEPTH),
            bitmaps: export
                .bitmaps
                .iter()
                .filter_map(|(name, b)| Some((context(&format!("{CTX_BITMAP}{name}"))?, b.clone())))
                .collect(),
            discard: cfg.discard,
            detect_zeroes: cfg.detect_zeroes,
            pending: HashMap::new(),
            next: 0,
            budget: Budget {
                used: Cell::new(0),
                max,
            },
            out_max: max as usize,
            pool,
        }
        .run(&mut stream, &mut out),
        Err(e) => Err(e.into()),
    };
    stream.shutdown_both();
    r
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
    /// Selected `qemu:dirty-bitmap:` contexts: (ID, the bitmap).
    bitmaps: Vec<(u32, Arc<DirtyBitmap>)>,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
    pending: HashMap<u64, Pending>,
    next: u64,
    budget: Budget,
    /// Reply bytes waiting for the client beyond which no more requests are read.
    out_max: usize,
    pool: Arc<BufPool>,
}

/// Reads at least this long are answered with `OFFSET_HOLE` chunks where the image reads as
/// zeroes (when the client allows fragmented replies). Smaller reads are not looked up: the
/// lookup would cost more than the bytes it saves.
const SPARSE_READ_MIN: u32 = 64 << 10;

/// Bytes read from the socket at a time (many request headers per read).
const INPUT_BUF: usize = 256 << 10;

impl Connection {
    /// Serves requests on `s` (non-blocking) until the client leaves: one thread reads
    /// requests, submits them, reaps completions and writes replies, sleeping in poll(2) on
    /// the socket and the queue's eventfds when there is nothing to do.
    fn run<S: Stream>(&mut self, s: &mut S, out: &mut Out) -> Result<(), Error> {
        let mut inp = Input {
            buf: vec![0u8; INPUT_BUF],
            start: 0,
            end: 0,
            partial: None,
            skip: 0,
            eof: false,
            blocked: false,
        };
        let mut done: Vec<IoDone<AlignedBuf>> = Vec::new();
        let mut ending: Option<Option<String>> = None;
        let fd = s.as_raw_fd();
        loop {
            let mut progress = false;
            if ending.is_none() && out.bytes < self.out_max {
                progress |= self.take_input(s, &mut inp, out, &mut ending)?;
            }
            self.queue.commit()?;
            done.clear();
            self.queue.reap(&mut done, 0, Some(Duration::ZERO))?;
            progress |= !done.is_empty();
            for d in done.drain(..) {
                self.completed(out, d)?;
            }
            let sent = out.send(s)?;
            if let Some(why) = &ending {
                if self.pending.is_empty() && sent {
                    return match why {
                        None => Ok(()),
                        Some(m) => Err(Error::Protocol(m.clone())),
                    };
                }
            }
            if progress {
                continue;
            }
            let want_read =
                ending.is_none() && !inp.blocked && !inp.eof && out.bytes < self.out_max;
            let [a, b] = self.queue.event_fds();
            // The queue's fds wake us for its completions; the timeout only bounds a missed
            // wake-up while requests are in flight.
            let timeout_ms = if self.pending.is_empty() { -1 } else { 100 };
            let ready = poll_rw(
                &[(fd, want_read, !sent), (a, true, false), (b, true, false)],
                timeout_ms,
            )?;
            // The queue's eventfds are cleared before the next reap (a completion arriving
            // meanwhile wakes the next poll); left readable they would make every poll
            // return at once and the thread spin.
            for (fd, r) in [a, b].into_iter().zip(ready.into_iter().skip(1)) {
                if r.0 {
                    drain_eventfd(fd);
                }
            }
        }
    }

    /// Reads what the socket has and starts the requests in it, as far as the budget
    /// allows; sets `ending` when the client leaves or breaks the protocol. True if
    /// anything was read or started.
    fn take_input<S: Stream>(
        &mut self,
        s: &mut S,
        inp: &mut Input,
        out: &mut Out,
        ending: &mut Option<Option<String>>,
    ) -> Result<bool, Error> {
        let mut progress = false;
        inp.blocked = false;
        let hlen = if self.n.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        loop {
            // A write's payload: from the buffer, then straight from the socket.
            if let Some((_, _, buf, filled)) = &mut inp.partial {
                let n = (inp.end - inp.start).min(buf.len() - *filled);
                buf[*filled..*filled + n].copy_from_slice(&inp.buf[inp.start..inp.start + n]);
                inp.start += n;
                *filled += n;
                if *filled < buf.len() {
                    match s.read(&mut buf[*filled..]) {
                        Ok(0) => {
                            *ending = Some(Some("connection closed in a write payload".into()));
                            inp.eof = true;
                            return Ok(true);
                        }
                        Ok(n) => {
                            *filled += n;
                            progress = true;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            *ending = Some(Some("connection failed in a write payload".into()));
                            inp.eof = true;
                            return Ok(true);
                        }
                    }
                }
                if let Some((h, c, buf, _)) = inp.partial.take() {
                    self.start(out, h, c, Some(buf))?;
                }
                progress = true;
                continue;
            }
            // The payload of a refused write (bounded by the maximum payload).
            if inp.skip > 0 {
                let n = ((inp.end - inp.start) as u64).min(inp.skip);
                inp.start += n as usize;
                inp.skip -= n;
            }
            if inp.skip == 0 && inp.end - inp.start >= hlen {
                let raw = &inp.buf[inp.start..inp.start + hlen];
                let h = if self.n.extended {
                    let mut b = [0u8; EXTENDED_REQUEST_LEN];
                    b.copy_from_slice(raw);
                    RequestHeader::parse_extended(&b)
                } else {
                    let mut b = [0u8; REQUEST_LEN];
                    b.copy_from_slice(raw);
                    RequestHeader::parse_compact(&b)
                };
                let h = match h {
                    Ok(h) => h,
                    Err(e) => {
                        *ending = Some(Some(e.to_string()));
                        return Ok(true);
                    }
                };
                match Command::from_header(&h, &self.n) {
                    Ok(Command::Disconnect) => {
                        inp.start += hlen;
                        *ending = Some(None);
                        return Ok(true);
                    }
                    Ok(c) => {
                        // Wait here (not reading the socket) while too much is unanswered.
                        if !self.budget.fits(cost(&c)) {
                            inp.blocked = true;
                            return Ok(progress);
                        }
                        inp.start += hlen;
                        self.budget.take(cost(&c));
                        if let Command::Write { len, .. } = c {
                            inp.partial = Some((h, c, self.pool.get(len as usize), 0));
                        } else {
                            self.start(out, h, c, None)?;
                        }
                    }
                    Err(RequestError::Reply { errno, message }) => {
                        inp.start += hlen;
                        inp.skip = h.payload_len();
                        self.error_reply(out, &h, errno, &message)?;
                    }
                    Err(RequestError::Fatal(m)) => {
                        *ending = Some(Some(m));
                        return Ok(true);
                    }
                }
                progress = true;
                continue;
            }
            // More bytes needed.
            if inp.eof {
                *ending = Some(if inp.start == inp.end && inp.skip == 0 {
                    None
                } else {
                    Some("connection closed in a request".into())
                });
                return Ok(true);
            }
            if out.bytes >= self.out_max {
                return Ok(progress);
            }
            if inp.start > 0 {
                inp.buf.copy_within(inp.start..inp.end, 0);
                inp.end -= inp.start;
                inp.start = 0;
            }
            match s.read(&mut inp.buf[inp.end..]) {
                Ok(0) => inp.eof = true,
                Ok(n) => {
                    inp.end += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Reset by the peer: as if it had left.
                Err(_) => inp.eof = true,
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

    fn start(
        &mut self,
        w: &mut Out,
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
                let zero = self.detect_zeroes != DetectZeroes::Off
                    && buf.as_deref().is_some_and(xdisk_io::is_zero);
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

    fn completed(&mut self, w: &mut Out, d: IoDone<AlignedBuf>) -> Result<(), Error> {
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
        let r = match (p.cmd, buf) {
            (Command::Read { offset, .. }, Some(b)) => self.read_reply(w, &p.h, offset, b),
            (_, b) => {
                if let Some(b) = b {
                    self.pool.put(b);
                }
                self.ok_reply(w, &p.h)
            }
        };
        self.budget.give(cost(&p.cmd));
        r
    }

    fn read_reply(
        &self,
        w: &mut Out,
        h: &RequestHeader,
        offset: u64,
        data: AlignedBuf,
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
        // Sent from the read's own buffer (back to the pool once written).
        w.push_buf(data);
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

    /// Block status of `[offset, offset + len)`, one chunk per selected context
    /// (`base:allocation` and `qemu:allocation-depth` from the image's block status,
    /// `qemu:dirty-bitmap:NAME` from the bitmap), at most 2^20 extents each, as the spec
    /// asks.
    fn block_status<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<(), Error> {
        if self.base_allocation.is_none()
            && self.allocation_depth.is_none()
            && self.bitmaps.is_empty()
        {
            return self.error_reply(w, h, errno::EINVAL, "no context selected");
        }
        const MAX_EXTENTS: usize = 1 << 20;
        let end = offset.saturating_add(len);
        let push = |v: &mut Vec<Extent>, step: u64, flags: u32| {
            // Runs with the same value merge (the contexts change at other places).
            match v.last_mut() {
                Some(e) if e.flags == flags && !req_one => e.len += step,
                _ => v.push(Extent { len: step, flags }),
            }
        };
        let mut alloc: Vec<Extent> = Vec::new();
        let mut depth: Vec<Extent> = Vec::new();
        if self.base_allocation.is_some() || self.allocation_depth.is_some() {
            let mut pos = offset;
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
                push(&mut alloc, step, f);
                push(&mut depth, step, d);
                pos += step;
                if req_one {
                    break;
                }
            }
        }
        let mut dirty: Vec<Vec<Extent>> = Vec::with_capacity(self.bitmaps.len());
        for (_, b) in &self.bitmaps {
            let mut v = Vec::new();
            let mut pos = offset;
            while pos < end && v.len() < MAX_EXTENTS {
                let (is_dirty, n) = b.run_at(pos, end - pos);
                // Past the bitmap's size (it has the export's): clean.
                let step = if n == 0 { end - pos } else { n };
                push(&mut v, step, u32::from(is_dirty));
                pos += step;
                if req_one {
                    break;
                }
            }
            dirty.push(v);
        }
        let mut wanted: Vec<(u32, &[Extent])> = Vec::new();
        if let Some(id) = self.base_allocation {
            wanted.push((id, &alloc));
        }
        if let Some(id) = self.allocation_depth {
            wanted.push((id, &depth));
        }
        for ((id, _), v) in self.bitmaps.iter().zip(&dirty) {
            wanted.push((*id, v));
        }
        let kind = if self.n.extended {
            reply::BLOCK_STATUS_EXT
        } else {
            reply::BLOCK_STATUS
        };
        for (i, (id, extents)) in wanted.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies go out with one `writev` for many segments: `AnyStream` must pass vectored
    /// writes on (the default `write_vectored` writes the first slice only, which cost a
    /// send(2) per header and per read buffer and capped 4k random reads at ~40k IOPS).
    #[test]
    fn any_stream_writes_every_slice_of_a_vectored_write() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let mut a = AnyStream::Unix(a);
        let parts: [&[u8]; 3] = [b"header..", &[7u8; 4096], b"next reply"];
        let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let n = a.write_vectored(&slices).expect("writev");
        assert_eq!(n, parts.iter().map(|p| p.len()).sum::<usize>());
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, parts.concat());
    }
}
