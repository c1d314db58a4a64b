//! xdisk's NBD client: an export of an NBD server as an xdisk [`Storage`], so that every
//! format (raw, qcow2) runs over it and every command that takes a disk name takes
//! `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` ([`uri`]).
//!
//! Design:
//! - One connection per storage: a socket, a writer behind a mutex, and one reader thread
//!   that reads every reply and hands it by cookie to the synchronous caller waiting for it
//!   or to an engine's completion queue (signalling the queue's eventfd). No thread per
//!   request; requests are pipelined. All I/O of a storage shares the one connection, so a
//!   FLUSH covers every completed write.
//! - The handshake is fixed newstyle only: extended headers if the server has them, else
//!   structured replies; `base:allocation` (for [`Storage::allocation`]); `NBD_OPT_GO`
//!   with block size constraints (requests over the maximum payload are split; the minimum
//!   block size is the storage's alignment), `NBD_OPT_EXPORT_NAME` if GO is unknown.
//! - Everything the server sends is checked ([`xdisk_nbd::client`]): a protocol violation
//!   kills the connection and every request in flight fails with EIO.
//! - When the server goes away, the next request reconnects, a bounded number of times
//!   with backoff ([`ClientConfig`]); requests in flight then, and every request once the
//!   attempts are used up, fail with EIO: on every connection of the storage (the engines'
//!   own, with multi-conn, included), not only the one that tried. A server that stops
//!   answering is given up after [`ClientConfig::io_timeout`]: nothing waits forever.
//! - TLS (`nbds://`, `nbds+unix://`): `NBD_OPT_STARTTLS` first, the rest of the handshake
//!   over TLS, then the reader thread and the writers on the plain end of a TLS pump thread
//!   ([`xdisk_nbd_tls::pump`]). x509 only (no PSK).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod conn;
pub mod uri;

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use xdisk_io::sys::EventFd;
use xdisk_io::{
    AioKind, Alignment, Allocation, CacheMode, Completion, Engine, EngineConfig, IoBuf, IoSlice,
    Op, OpKind, Storage,
};
use xdisk_nbd::wire::{allocation as alloc_bits, cmd, flags, Extent};

use conn::{
    eio, lock, Conn, EngineOp, EngineShared, EngineState, Request, Sink, SyncWait, TlsSetup,
};
pub use conn::{Negotiated, MAX_PAYLOAD};
pub use uri::{is_nbd_uri, NbdUri, Transport, UriTls};

/// Errors of opening an NBD export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed NBD URI.
    #[error("bad NBD URI {0}")]
    Uri(String),
    /// TLS could not be set up (credentials, the server's certificate, the handshake).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server insists on TLS.
    #[error("the NBD server requires TLS (use nbds:// or nbds+unix:// with tls-certificates=DIR)")]
    TlsRequired,
    /// The server has no such export.
    #[error("the NBD server has no export '{0}'")]
    NoSuchExport(String),
    /// The server refused an option.
    #[error("the NBD server refused the export ({what}): {message}")]
    Refused {
        /// The error reply.
        what: String,
        /// The server's message.
        message: String,
    },
    /// The server broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// A socket error.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// How to open an export.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Refuse writes even if the export takes them.
    pub read_only: bool,
    /// The cache mode the storage reports (flushes are sent unless `unsafe`).
    pub cache: CacheMode,
    /// Connecting and shaking hands may take this long.
    pub handshake_timeout: Duration,
    /// A server that sends nothing for this long while requests wait is given up.
    pub io_timeout: Duration,
    /// Reconnection attempts after the connection is lost (0: never reconnect).
    pub reconnect_attempts: u32,
    /// Delay before the first attempt; doubled before each next one.
    pub reconnect_delay: Duration,
}

impl Default for ClientConfig {
    /// 30 s handshake and I/O timeouts; 5 reconnection attempts over about 10 s
    /// (0.3 + 0.6 + 1.2 + 2.4 + 4.8 s).
    fn default() -> Self {
        ClientConfig {
            read_only: false,
            cache: CacheMode::WriteBack,
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            reconnect_attempts: 5,
            reconnect_delay: Duration::from_millis(300),
        }
    }
}

/// A synchronous request: command, flags, offset, length, write payload.
type SyncReq = (u16, u16, u64, u64, Option<Vec<u8>>);

struct Slot {
    conn: Option<Arc<Conn>>,
    /// Set once reconnection was given up: every request fails.
    failed: Option<String>,
}

/// An NBD export as a storage.
pub struct NbdStorage {
    uri: NbdUri,
    name: String,
    cfg: ClientConfig,
    neg: Negotiated,
    read_only: bool,
    slot: Mutex<Slot>,
    /// TLS, for the connection and reconnections.
    tls: Option<TlsSetup>,
    /// Serialises read-modify-write of writes not aligned to the minimum block size.
    rmw: Mutex<()>,
    broken: Arc<OnceLock<String>>,
    /// Set when reconnection was given up on any connection (the storage's or an engine's
    /// own): the server is gone for all of them, so every connection fails at once from then
    /// on instead of each queue spending its own round of attempts.
    gave_up: OnceLock<String>,
}

impl fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdStorage")
            .field("uri", &self.name)
            .field("negotiated", &self.neg)
            .finish()
    }
}

/// Rounds down/up to a power-of-two-free multiple of `m`.
fn down(x: u64, m: u64) -> u64 {
    x / m * m
}
fn up(x: u64, m: u64) -> u64 {
    x.div_ceil(m).saturating_mul(m)
}

impl NbdStorage {
    /// Connects to the export `uri` names.
    pub fn open(uri: &NbdUri, cfg: &ClientConfig) -> Result<NbdStorage, Error> {
        let name = uri.to_string();
        let tls = match uri.tls_options() {
            Some(opts) => Some(TlsSetup {
                cfg: xdisk_nbd_tls::client_config(&opts).map_err(|e| Error::Tls(e.to_string()))?,
                opts,
            }),
            None => None,
        };
        let conn = Conn::open(
            &uri.transport,
            &uri.export,
            &name,
            cfg.handshake_timeout,
            cfg.io_timeout,
            tls.as_ref(),
        )?;
        let neg = *conn.neg();
        tracing::debug!(%name, ?neg, "NBD export opened");
        Ok(NbdStorage {
            uri: uri.clone(),
            name,
            cfg: cfg.clone(),
            read_only: cfg.read_only || neg.has(flags::READ_ONLY),
            neg,
            slot: Mutex::new(Slot {
                conn: Some(Arc::new(conn)),
                failed: None,
            }),
            tls,
            rmw: Mutex::new(()),
            broken: Arc::new(OnceLock::new()),
            gave_up: OnceLock::new(),
        })
    }

    /// Parses `uri` and connects.
    pub fn open_uri(uri: &str, cfg: &ClientConfig) -> Result<NbdStorage, Error> {
        Self::open(&NbdUri::parse(uri)?, cfg)
    }

    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The live connection, reconnecting (bounded) if it was lost.
    fn conn(&self) -> io::Result<Arc<Conn>> {
        self.conn_in(&self.slot)
    }

    /// A new connection to the same export (for an engine of its own, on a server that
    /// advertises `CAN_MULTI_CONN`).
    fn new_conn(&self) -> Result<Conn, Error> {
        Conn::open(
            &self.uri.transport,
            &self.uri.export,
            &self.name,
            self.cfg.handshake_timeout,
            self.cfg.io_timeout,
            self.tls.as_ref(),
        )
    }

    /// The live connection of `slot`, reconnecting (bounded) if it was lost.
    fn conn_in(&self, slot: &Mutex<Slot>) -> io::Result<Arc<Conn>> {
        let mut slot = lock(slot);
        if let Some(c) = &slot.conn {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        if slot.failed.is_some() || self.gave_up.get().is_some() {
            return Err(eio());
        }
        slot.conn = None;
        let mut delay = self.cfg.reconnect_delay;
        let mut last = String::from("reconnection disabled");
        for attempt in 1..=self.cfg.reconnect_attempts {
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2);
            if let Some(why) = self.gave_up.get() {
                // Another connection of this storage gave up meanwhile.
                last = why.clone();
                break;
            }
            match Conn::open(
                &self.uri.transport,
                &self.uri.export,
                &self.name,
                self.cfg.handshake_timeout,
                self.cfg.io_timeout,
                self.tls.as_ref(),
            ) {
                Ok(c) => {
                    let n = c.neg();
                    if n.size != self.neg.size || n.block != self.neg.block {
                        last = format!(
                            "the export changed (size {} -> {}, block sizes {:?} -> {:?})",
                            self.neg.size, n.size, self.neg.block, n.block
                        );
                        break;
                    }
                    if n.has(flags::READ_ONLY) && !self.read_only {
                        last = "the export became read-only".into();
                        break;
                    }
                    tracing::info!(server = %self.name, attempt, "NBD connection re-established");
                    let c = Arc::new(c);
                    slot.conn = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(server = %self.name, attempt, "NBD reconnection failed: {e}");
                    last = e.to_string();
                }
            }
        }
        if self.gave_up.get().is_none() {
            tracing::error!(server = %self.name, "giving up on the NBD server: {last}");
        }
        self.gave_up.get_or_init(|| last.clone());
        slot.failed = Some(last);
        Err(eio())
    }

    /// Sends synchronous requests (pipelined) and waits for all; the first error wins.
    fn run(&self, reqs: Vec<SyncReq>) -> io::Result<Vec<conn::SyncDone>> {
        let conn = self.conn()?;
        let mut waits = Vec::with_capacity(reqs.len());
        let mut out = Vec::with_capacity(reqs.len());
        for (kind, fl, offset, len, payload) in reqs {
            let w = Arc::new(SyncWait::default());
            waits.push(w.clone());
            out.push(Request {
                kind,
                flags: fl,
                offset,
                len,
                payload,
                sink: Sink::Sync(w),
            });
        }
        conn.send(out);
        let mut done = Vec::with_capacity(waits.len());
        let mut err = None;
        for w in waits {
            let mut d = w.wait();
            if let Err(e) = std::mem::replace(&mut d.result, Ok(())) {
                err.get_or_insert(e);
            }
            done.push(d);
        }
        match err {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn min_block(&self) -> u64 {
        u64::from(self.neg.block.minimum.max(1))
    }

    fn max_payload(&self) -> u64 {
        u64::from(self.neg.block.maximum.max(self.neg.block.minimum).max(1))
    }

    /// The largest effect length of one request without payload (trim, write zeroes).
    fn max_effect(&self) -> u64 {
        if self.neg.extended {
            1 << 40
        } else {
            down(u64::from(u32::MAX), self.min_block().max(4096))
        }
    }

    /// Reads an aligned range inside the export.
    fn read_aligned(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let max = self.max_payload();
        let mut reqs = Vec::new();
        let mut pos = 0u64;
        while pos < buf.len() as u64 {
            let n = (buf.len() as u64 - pos).min(max);
            reqs.push((cmd::READ, 0, off + pos, n, None));
            pos += n;
        }
        let mut pos = 0usize;
        for d in self.run(reqs)? {
            let n = d.data.len();
            buf[pos..pos + n].copy_from_slice(&d.data);
            pos += n;
        }
        Ok(())
    }

    fn write_aligned(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let max = self.max_payload() as usize;
        let reqs = buf
            .chunks(max)
            .enumerate()
            .map(|(i, c)| {
                (
                    cmd::WRITE,
                    0,
                    off + (i * max) as u64,
                    c.len() as u64,
                    Some(c.to_vec()),
                )
            })
            .collect();
        self.run(reqs).map(|_| ())
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_usable()
    }

    fn inside(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.neg.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        }
    }

    /// Sends effect-only requests (trim, write zeroes) over an aligned range.
    fn effect(&self, kind: u16, off: u64, len: u64) -> io::Result<()> {
        let max = self.max_effect();
        let mut reqs = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(max);
            reqs.push((kind, 0, pos, n, None));
            pos += n;
        }
        self.run(reqs).map(|_| ())
    }

    /// The block status extents of `base:allocation` from `off` (at most `len` asked).
    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        let len = len.min(self.max_effect());
        let mut d = self.run(vec![(cmd::BLOCK_STATUS, 0, off, len, None)])?;
        Ok(d.pop().map(|d| d.extents).unwrap_or_default())
    }
}

/// `base:allocation` status as a storage run: a hole only if it also reads as zeroes.
fn is_hole(flags: u32) -> bool {
    flags & (alloc_bits::HOLE | alloc_bits::ZERO) == alloc_bits::HOLE | alloc_bits::ZERO
}

impl Storage for NbdStorage {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.name)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.neg.size)
    }
    fn set_size(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let size = self.neg.size;
        let n = if off >= size {
            0
        } else {
            (size - off).min(buf.len() as u64) as usize
        };
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        let m = self.min_block();
        if off.is_multiple_of(m) && ((n as u64).is_multiple_of(m) || off + n as u64 == size) {
            return self.read_aligned(&mut buf[..n], off);
        }
        let a = down(off, m);
        let e = up(off + n as u64, m).min(size);
        let mut tmp = vec![0u8; (e - a) as usize];
        self.read_aligned(&mut tmp, a)?;
        let s = (off - a) as usize;
        buf[..n].copy_from_slice(&tmp[s..s + n]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writable()?;
        self.inside(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let m = self.min_block();
        let end = off + buf.len() as u64;
        if off.is_multiple_of(m) && (end.is_multiple_of(m) || end == self.neg.size) {
            return self.write_aligned(buf, off);
        }
        let _g = lock(&self.rmw);
        let a = down(off, m);
        let e = up(end, m).min(self.neg.size);
        let mut tmp = vec![0u8; (e - a) as usize];
        self.read_aligned(&mut tmp, a)?;
        let s = (off - a) as usize;
        tmp[s..s + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, a)
    }
    fn flush(&self) -> io::Result<()> {
        self.check_usable()?;
        if self.read_only || !self.neg.has(flags::SEND_FLUSH) {
            return Ok(());
        }
        let r = self.run(vec![(cmd::FLUSH, 0, 0, 0, None)]).map(|_| ());
        if let Err(e) = &r {
            self.mark_broken(e);
        }
        r
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        if !self.neg.has(flags::SEND_TRIM) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD export does not take TRIM",
            ));
        }
        let end = off.saturating_add(len).min(self.neg.size);
        let m = self.min_block();
        let (a, e) = (up(off, m), down(end, m));
        if a >= e {
            return Ok(());
        }
        self.effect(cmd::TRIM, a, e - a)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let end = off.saturating_add(len).min(self.neg.size);
        if off >= end {
            return Ok(());
        }
        if !self.neg.has(flags::SEND_WRITE_ZEROES) {
            return self.write_zeroes_by_writing(off, end - off);
        }
        let m = self.min_block();
        let (a, e) = (up(off, m).min(end), down(end, m).max(off));
        if a >= e {
            return self.write_zeroes_by_writing(off, end - off);
        }
        if a > off {
            self.write_zeroes_by_writing(off, a - off)?;
        }
        if end > e {
            self.write_zeroes_by_writing(e, end - e)?;
        }
        self.effect(cmd::WRITE_ZEROES, a, e - a)
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        // Nothing to reserve on a server's export; growing it is not possible.
        self.inside(off, len)
    }
    fn allocation(&self, off: u64, len: u64) -> Allocation {
        let data = Allocation::Data { len };
        if self.neg.allocation.is_none() || off >= self.neg.size {
            return data;
        }
        let ask = len.min(self.neg.size - off);
        let extents = match self.block_status(off, ask) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(server = %self.name, "block status failed: {e}");
                return data;
            }
        };
        let Some(first) = extents.first() else {
            return data;
        };
        let hole = is_hole(first.flags);
        let run: u64 = extents
            .iter()
            .take_while(|e| is_hole(e.flags) == hole)
            .map(|e| e.len)
            .fold(0u64, u64::saturating_add);
        let run = run.clamp(1, len);
        if hole {
            Allocation::Hole { len: run }
        } else {
            Allocation::Data { len: run }
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn cache(&self) -> CacheMode {
        self.cfg.cache
    }
    fn alignment(&self) -> Alignment {
        Alignment {
            offset: self.neg.block.minimum.max(1),
            memory: 1,
        }
    }
    fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }
    fn mark_broken(&self, err: &io::Error) {
        self.broken.get_or_init(|| err.to_string());
    }
    fn open_engine(
        self: Arc<Self>,
        cfg: &EngineConfig,
        notify: Arc<EventFd>,
    ) -> Option<io::Result<Box<dyn Engine<IoSlice>>>> {
        Some(Ok(Box::new(NbdEngine::new(self, cfg, notify))))
    }
}

/// The asynchronous path of an [`NbdStorage`] for one queue: `commit` sends the queued
/// operations on the storage's connection (one write for the batch), the reader thread
/// completes them from the replies (read data copied into the operation's buffer) and
/// signals `notify`; `reap` hands the completions out.
pub struct NbdEngine {
    storage: Arc<NbdStorage>,
    /// The engine's own connection, on a server that advertises `CAN_MULTI_CONN` (a flush
    /// on any connection then covers all): each queue talks to the server on its own
    /// socket. `None`: the storage's connection, shared.
    own: Option<Mutex<Slot>>,
    shared: Arc<EngineShared>,
    queued: Vec<Op<IoSlice>>,
    in_flight: usize,
    capacity: usize,
    next_id: u64,
}

impl NbdEngine {
    /// An engine over `storage` whose completions signal `notify`.
    pub fn new(storage: Arc<NbdStorage>, cfg: &EngineConfig, notify: Arc<EventFd>) -> NbdEngine {
        let broken = storage.broken.clone();
        // A connection of its own if the server allows it (it may limit its clients: then
        // the queue shares the storage's connection).
        let own = if storage.neg.has(flags::CAN_MULTI_CONN) {
            match storage.new_conn() {
                Ok(c) => Some(Mutex::new(Slot {
                    conn: Some(Arc::new(c)),
                    failed: None,
                })),
                Err(e) => {
                    tracing::info!(server = %storage.name, "sharing one NBD connection: {e}");
                    None
                }
            }
        } else {
            None
        };
        NbdEngine {
            storage,
            own,
            shared: Arc::new(EngineShared {
                state: Mutex::new(EngineState::default()),
                cond: std::sync::Condvar::new(),
                notify,
                broken,
            }),
            queued: Vec::new(),
            in_flight: 0,
            capacity: cfg.queue_depth.max(1) as usize,
            next_id: 0,
        }
    }

    /// Completes an operation now (no request needed, or refused before sending).
    fn now(&self, op: Op<IoSlice>, result: io::Result<usize>) {
        lock(&self.shared.state).done.push_back(Completion {
            user_data: op.user_data,
            result,
            buf: op.buf,
            phase: xdisk_io::Phase::Done,
        });
        self.shared.notify.signal();
    }

    /// Turns an operation into NBD requests, or completes it at once.
    fn requests(&mut self, mut op: Op<IoSlice>, out: &mut Vec<Request>) {
        let s = &self.storage;
        let size = s.neg.size;
        let m = s.min_block();
        let (kind, off, len, result, payload, flush) = match op.kind {
            OpKind::Read | OpKind::Write => {
                let write = op.kind == OpKind::Write;
                let total = op.buf.as_ref().map_or(0, |b| b.total_len()) as u64;
                if write {
                    if let Err(e) = s.writable().and_then(|()| s.inside(op.offset, total)) {
                        return self.now(op, Err(e));
                    }
                }
                // Like pread: a short count at the end of the export.
                let n = if op.offset >= size {
                    0
                } else {
                    (size - op.offset).min(total)
                };
                if n == 0 {
                    return self.now(op, Ok(0));
                }
                if !op.offset.is_multiple_of(m) || (!n.is_multiple_of(m) && op.offset + n != size) {
                    return self.now(op, Err(io::Error::from_raw_os_error(libc::EINVAL)));
                }
                let kind = if write { cmd::WRITE } else { cmd::READ };
                (kind, op.offset, n, n as usize, write, false)
            }
            OpKind::Flush => {
                if let Err(e) = s.check_usable() {
                    return self.now(op, Err(e));
                }
                if s.read_only || !s.neg.has(flags::SEND_FLUSH) {
                    return self.now(op, Ok(0));
                }
                (cmd::FLUSH, 0, 0, 0, false, true)
            }
            OpKind::Fallocate { mode, len } => {
                if let Err(e) = s.writable() {
                    return self.now(op, Err(e));
                }
                let end = op.offset.saturating_add(len).min(size);
                let (a, e) = (up(op.offset, m), down(end, m));
                let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
                let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
                let (kind, flag) = if punch {
                    (cmd::TRIM, flags::SEND_TRIM)
                } else if zero {
                    (cmd::WRITE_ZEROES, flags::SEND_WRITE_ZEROES)
                } else {
                    return self.now(op, Ok(0));
                };
                if !s.neg.has(flag) || (zero && (a != op.offset || e != end)) {
                    return self.now(op, Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
                }
                if a >= e {
                    return self.now(op, Ok(0));
                }
                (kind, a, e - a, 0, false, false)
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let max = if kind == cmd::READ || kind == cmd::WRITE {
            s.max_payload()
        } else {
            s.max_effect()
        };
        let mut parts = Vec::new();
        let mut pos = 0u64;
        loop {
            let n = (len - pos).min(max);
            let data = if payload {
                let mut v = vec![0u8; n as usize];
                if let Some(b) = op.buf.as_mut() {
                    b.copy_out(pos as usize, &mut v);
                }
                Some(v)
            } else {
                None
            };
            parts.push(Request {
                kind,
                flags: 0,
                offset: off + pos,
                len: n,
                payload: data,
                sink: Sink::Engine {
                    shared: self.shared.clone(),
                    id,
                    at: pos as usize,
                },
            });
            pos += n;
            if pos >= len {
                break;
            }
        }
        lock(&self.shared.state).ops.insert(
            id,
            EngineOp {
                user_data: op.user_data,
                buf: op.buf.take(),
                parts: parts.len(),
                error: None,
                result,
                flush,
            },
        );
        out.extend(parts);
    }
}

impl Engine<IoSlice> for NbdEngine {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }
    fn submit(&mut self, op: Op<IoSlice>) -> Result<(), (Op<IoSlice>, io::Error)> {
        if self.in_flight >= self.capacity {
            return Err((op, io::Error::from(io::ErrorKind::WouldBlock)));
        }
        self.in_flight += 1;
        self.queued.push(op);
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let mut reqs = Vec::new();
        for op in std::mem::take(&mut self.queued) {
            self.requests(op, &mut reqs);
        }
        if reqs.is_empty() {
            return Ok(());
        }
        let conn = match &self.own {
            Some(slot) => self.storage.conn_in(slot),
            None => self.storage.conn(),
        };
        match conn {
            Ok(c) => c.send(reqs),
            Err(e) => {
                for r in reqs {
                    if let Sink::Engine { id, .. } = r.sink {
                        self.shared.finish_part(
                            id,
                            Err(io::Error::from_raw_os_error(
                                e.raw_os_error().unwrap_or(libc::EIO),
                            )),
                        );
                    }
                }
            }
        }
        Ok(())
    }
    fn reap(
        &mut self,
        out: &mut Vec<Completion<IoSlice>>,
        min: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        self.commit()?;
        let min = if timeout.is_none() {
            min.min(self.in_flight)
        } else {
            min
        };
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut st = lock(&self.shared.state);
        let mut got = 0;
        loop {
            let n = st.done.len();
            out.extend(st.done.drain(..));
            got += n;
            self.in_flight = self.in_flight.saturating_sub(n);
            if got >= min {
                return Ok(got);
            }
            st = match deadline {
                None => self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(got);
                    }
                    self.shared
                        .cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
    fn event_fd(&self) -> std::os::unix::io::RawFd {
        self.shared.notify.fd()
    }
    fn clear_event_fd(&self) -> bool {
        // Shared with the queue's other notifications: the queue drains it.
        false
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}
