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

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::Image;
use xdisk_io::sys::{poll_readable, EventFd};
use xdisk_io::AlignedBuf;
use xdisk_nbd::handshake::{negotiate, ExportInfo, Exports, HandshakeError, Outcome};
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

/// What a server serves and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The exports (at least one).
    pub exports: Vec<Export>,
    /// Each connection's image queue.
    pub queue: QueueConfig,
    /// Payload bytes of requests read but not yet done, per connection, at most.
    pub max_buffered: u64,
}

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
            | flags::SEND_WRITE_ZEROES;
        if e.read_only || e.image.read_only() {
            f |= flags::READ_ONLY;
            f &= !(flags::SEND_TRIM | flags::SEND_WRITE_ZEROES);
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
}

impl ServerConfig {
    fn find(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }
}

/// A connected client's stream: read and write halves that can live on two threads.
pub trait Stream: Read + Write + Send + 'static {
    /// A second handle on the same connection.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Shuts both directions down (unblocks the reader).
    fn shutdown_both(&self);
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Stream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
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

/// Payload bytes buffered between the reader and the I/O thread.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
    max: u64,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // One request larger than the budget still goes alone.
        while *u > 0 && *u + n > self.max {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        *u += n;
    }
    fn give(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *u = u.saturating_sub(n);
        self.freed.notify_all();
    }
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

/// Serves one client on `stream` until it disconnects.
pub fn serve_connection<S: Stream>(mut stream: S, cfg: &ServerConfig) -> Result<(), Error> {
    let (info, n, contexts) = match negotiate(&mut stream, cfg)? {
        Outcome::Closed => return Ok(()),
        Outcome::Transmission {
            export,
            negotiated,
            contexts,
        } => (export, negotiated, contexts),
    };
    let export = cfg
        .find(&info.name)
        .ok_or_else(|| Error::Protocol("export vanished".into()))?
        .clone();
    let reader_stream = stream.try_clone_stream()?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let wake = Arc::new(EventFd::new()?);
    let budget = Arc::new(Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
        max: cfg.max_buffered.max(u64::from(MAX_PAYLOAD)),
    });
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
    let r = Connection {
        image: export.image.clone(),
        queue: ImageQueue::new(export.image.clone(), &cfg.queue)?,
        n,
        base_allocation: contexts
            .iter()
            .find(|(_, name)| name == "base:allocation")
            .map(|(id, _)| *id),
        pending: HashMap::new(),
        next: 0,
        budget: budget.clone(),
        pool,
    }
    .run(&mut writer, &rx, &wake);
    let _ = writer.flush();
    stream.shutdown_both();
    let _ = reader.join();
    r
}

/// Reads requests until the client disconnects or breaks the protocol.
fn read_requests<S: Read>(
    mut s: S,
    n: Negotiated,
    tx: mpsc::Sender<Msg>,
    wake: &EventFd,
    budget: &Budget,
    pool: &BufPool,
) {
    let send = |m: Msg| {
        let ok = tx.send(m).is_ok();
        wake.signal();
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
        match Command::from_header(&h, &n) {
            Ok(Command::Disconnect) => {
                send(Msg::End(None));
                return;
            }
            Ok(c @ Command::Write { len, .. }) => {
                budget.take(len.into());
                let mut buf = pool.get(len as usize);
                if s.read_exact(&mut buf).is_err() {
                    budget.give(len.into());
                    send(Msg::End(Some(
                        "connection closed in a write payload".into(),
                    )));
                    return;
                }
                if !send(Msg::Cmd(h, c, Some(buf))) {
                    return;
                }
            }
            Ok(c) => {
                if !send(Msg::Cmd(h, c, None)) {
                    return;
                }
            }
            Err(RequestError::Reply { errno, message }) => {
                // Skip the payload (bounded by from_header: at most the maximum).
                if payload > 0
                    && io::copy(&mut (&mut s).take(payload), &mut io::sink()).ok() != Some(payload)
                {
                    send(Msg::End(None));
                    return;
                }
                if !send(Msg::Refused(h, errno, message)) {
                    return;
                }
            }
            Err(RequestError::Fatal(m)) => {
                send(Msg::End(Some(m)));
                return;
            }
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
    pending: HashMap<u64, Pending>,
    next: u64,
    budget: Arc<Budget>,
    pool: Arc<BufPool>,
}

impl Connection {
    fn run<W: Write>(
        &mut self,
        w: &mut W,
        rx: &mpsc::Receiver<Msg>,
        wake: &EventFd,
    ) -> Result<(), Error> {
        let mut done: Vec<IoDone<AlignedBuf>> = Vec::new();
        let mut ending: Option<Option<String>> = None;
        loop {
            wake.drain();
            while ending.is_none() {
                match rx.try_recv() {
                    Ok(Msg::Cmd(h, c, buf)) => self.start(w, h, c, buf)?,
                    Ok(Msg::Refused(h, errno, msg)) => self.error_reply(w, &h, errno, &msg)?,
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
            let [a, b] = self.queue.event_fds();
            // The queue's fds wake us for its completions; the timeout only bounds a missed
            // wake-up while requests are in flight.
            let timeout_ms = if self.pending.is_empty() { -1 } else { 100 };
            poll_readable(&[wake.fd(), a, b], timeout_ms)?;
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
            Command::Read { offset, len, .. } => {
                let b = self.pool.get(len as usize);
                self.submit(IoKind::Read, offset, Some(b), p);
            }
            Command::Write { offset, .. } => self.submit(IoKind::Write, offset, buf, p),
            Command::Flush => self.submit(IoKind::Flush, 0, None, p),
            Command::Trim { offset, len, .. } => {
                self.submit(IoKind::Discard { len }, offset, None, p)
            }
            Command::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                ..
            } => {
                if fast {
                    // We cannot promise it is faster than writing.
                    return self.error_reply(w, &h, errno::ENOTSUP, "fast zeroing not offered");
                }
                self.submit(
                    IoKind::WriteZeroes {
                        len,
                        unmap: !no_hole,
                    },
                    offset,
                    None,
                    p,
                )
            }
            Command::Cache { .. } => self.ok_reply(w, &h)?,
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => self.block_status(w, &h, offset, len, req_one)?,
            Command::Disconnect => {}
        }
        Ok(())
    }

    fn completed<W: Write>(&mut self, w: &mut W, d: IoDone<AlignedBuf>) -> Result<(), Error> {
        let Some(mut p) = self.pending.remove(&d.user_data) else {
            return Ok(());
        };
        if let Command::Write { len, .. } = p.cmd {
            if !p.flushing {
                self.budget.give(len.into());
            }
        }
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
            return self.error_reply(w, &p.h, errno, &e.to_string());
        }
        let fua = matches!(
            p.cmd,
            Command::Write { fua: true, .. }
                | Command::Trim { fua: true, .. }
                | Command::WriteZeroes { fua: true, .. }
        );
        if fua && !p.flushing {
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

    /// `base:allocation` extents of `[offset, offset + len)` from the image's block status
    /// (at most 2^20 extents, as the spec asks).
    fn block_status<W: Write>(
        &self,
        w: &mut W,
        h: &RequestHeader,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<(), Error> {
        let Some(id) = self.base_allocation else {
            return self.error_reply(w, h, errno::EINVAL, "no context selected");
        };
        let mut extents = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end && extents.len() < (1 << 20) {
            let st = match self.image.block_status(pos, end - pos) {
                Ok(s) => s,
                Err(e) => return self.error_reply(w, h, errno::EIO, &e.to_string()),
            };
            let mut f = 0;
            if st.zero {
                f |= wire::allocation::ZERO;
            }
            // As QEMU's server: a hole wherever no host data answers.
            if !st.data {
                f |= wire::allocation::HOLE;
            }
            extents.push(Extent {
                len: st.len,
                flags: f,
            });
            pos += st.len.max(1);
            if req_one {
                break;
            }
        }
        let payload = block_status_payload(self.n.extended, id, &extents);
        let kind = if self.n.extended {
            reply::BLOCK_STATUS_EXT
        } else {
            reply::BLOCK_STATUS
        };
        w.write_all(&chunk_header(
            self.n.extended,
            reply::FLAG_DONE,
            kind,
            h.cookie,
            h.offset,
            payload.len() as u64,
        ))?;
        w.write_all(&payload)?;
        Ok(())
    }
}
