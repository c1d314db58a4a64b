//! One connection to an NBD server: the socket, the client side of the handshake, a
//! writer (behind a mutex) and one reader thread that reads every reply and hands it, by
//! cookie, to whoever waits for it (a synchronous caller or an engine's completion queue).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xdisk_io::{Completion, IoBuf, IoSlice};
use xdisk_nbd::client::{
    message_text, parse_chunk, parse_export_name_reply, parse_greeting, parse_meta_context,
    reply_header_len, Chunk, InfoReply, OptionReplyHeader, ReadCoverage, ReplyHeader,
    DATA_PREFIX_LEN, EXPORT_NAME_REPLY_LEN, GREETING_LEN, MAX_METADATA_CHUNK,
    OPTION_REPLY_HEADER_LEN,
};
use xdisk_nbd::wire::{
    client as client_flags, cmd, errno, handshake as hs_flags, opt, rep, reply, BlockSize, Extent,
    InfoRequest, MetaContextRequest, RequestHeader,
};

use crate::uri::Transport;
use crate::Error;

/// The largest read or write payload this client sends (the spec's advice to clients when
/// the server says nothing; also bounds the buffers a request needs).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn connect(t: &Transport, timeout: Duration) -> io::Result<Stream> {
        match t {
            Transport::Unix { path } => Ok(Stream::Unix(UnixStream::connect(path)?)),
            Transport::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`flags::*`).
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use.
    pub extended: bool,
    /// Block size constraints (maximum capped at [`MAX_PAYLOAD`]).
    pub block: BlockSize,
    /// The ID of the `base:allocation` context, if the server has it.
    pub allocation: Option<u32>,
    /// The export was reached by `NBD_OPT_GO` (not the older `EXPORT_NAME`).
    pub go: bool,
}

impl Negotiated {
    /// Whether the export has transmission flag `f`.
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

fn rep_name(t: u32) -> String {
    match t {
        rep::ERR_UNSUP => "unsupported".into(),
        rep::ERR_POLICY => "forbidden by policy".into(),
        rep::ERR_INVALID => "invalid".into(),
        rep::ERR_PLATFORM => "not supported on this platform".into(),
        rep::ERR_TLS_REQD => "TLS required".into(),
        rep::ERR_UNKNOWN => "unknown export".into(),
        rep::ERR_SHUTDOWN => "server shutting down".into(),
        rep::ERR_BLOCK_SIZE_REQD => "block size required".into(),
        rep::ERR_TOO_BIG => "too big".into(),
        rep::ERR_EXT_HEADER_REQD => "extended headers required".into(),
        other => format!("reply type {other:#x}"),
    }
}

/// What a TLS connection is set up with (built once per storage).
#[derive(Clone)]
pub(crate) struct TlsSetup {
    pub(crate) cfg: Arc<xdisk_nbd_tls::TlsClientConfig>,
    pub(crate) opts: xdisk_nbd_tls::ClientOptions,
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// The handshake over a fresh stream, bounded by a deadline; over TLS once `tls` is set.
struct Handshake<'a> {
    s: &'a mut Stream,
    deadline: Instant,
    tls: Option<xdisk_nbd_tls::ClientConnection>,
}

impl Handshake<'_> {
    fn arm(&self) -> Result<(), Error> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::Protocol("handshake timed out".into()))?;
        self.s
            .set_read_timeout(Some(left))
            .and_then(|()| self.s.set_write_timeout(Some(left)))
            .map_err(|e| Error::io("socket timeouts", e))
    }
    fn read(&mut self, buf: &mut [u8], what: &str) -> Result<(), Error> {
        self.arm()?;
        let r = match &mut self.tls {
            Some(c) => xdisk_nbd_tls::TlsStream::new(c, &mut *self.s).read_exact(buf),
            None => self.s.read_exact(buf),
        };
        r.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                Error::Protocol(format!("the server hung up during the handshake ({what})"))
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Error::Protocol(format!("handshake timed out ({what})"))
            }
            _ => Error::io(format!("handshake ({what})"), e),
        })
    }
    fn send(&mut self, b: &[u8]) -> Result<(), Error> {
        self.arm()?;
        let r = match &mut self.tls {
            Some(c) => {
                let mut t = xdisk_nbd_tls::TlsStream::new(c, &mut *self.s);
                let r = t.write_all(b).and_then(|()| t.flush());
                if r.is_err() {
                    // A server that refuses the session after the handshake (TLS 1.3: our
                    // certificate) says why in an alert, before it closes.
                    if c.read_tls(&mut *self.s).is_ok() {
                        if let Err(e) = c.process_new_packets() {
                            return Err(Error::Tls(format!("the server ended the session: {e}")));
                        }
                    }
                }
                r
            }
            None => self.s.write_all(b),
        };
        r.map_err(|e| Error::io("handshake (sending an option)", e))
    }
    /// `NBD_OPT_STARTTLS`, then the TLS handshake; what follows goes over TLS.
    fn start_tls(&mut self, t: &TlsSetup) -> Result<(), Error> {
        self.option(opt::STARTTLS, &[])?;
        let (h, data) = self.reply(opt::STARTTLS)?;
        match h.reply_type {
            rep::ACK => {}
            r if h.is_error() => {
                return Err(Error::Tls(format!(
                    "the server refused TLS ({}): {}",
                    rep_name(r),
                    message_text(&data)
                )))
            }
            r => return Err(Error::Protocol(format!("unexpected reply {r} to STARTTLS"))),
        }
        let mut c = xdisk_nbd_tls::client_connection(t.cfg.clone(), &t.opts)
            .map_err(|e| Error::Tls(e.to_string()))?;
        while c.is_handshaking() {
            self.arm()?;
            c.complete_io(&mut *self.s).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    Error::Protocol("handshake timed out (TLS)".into())
                }
                io::ErrorKind::UnexpectedEof => {
                    Error::Tls("the server hung up during the TLS handshake".into())
                }
                _ => Error::Tls(format!("handshake: {e}")),
            })?;
        }
        self.tls = Some(c);
        Ok(())
    }
    fn option(&mut self, option: u32, data: &[u8]) -> Result<(), Error> {
        self.send(&xdisk_nbd::client::option_request(option, data))
    }
    /// One option reply to `option`: its header and data.
    fn reply(&mut self, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), Error> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read(&mut h, "option reply")?;
        let h = OptionReplyHeader::parse(&h).map_err(|e| Error::Protocol(e.to_string()))?;
        if h.option != option {
            return Err(Error::Protocol(format!(
                "reply to option {} while option {option} was asked",
                h.option
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        self.read(&mut data, "option reply data")?;
        Ok((h, data))
    }
    /// An option whose only answers are ACK or an error; `Ok(false)` on an error.
    fn simple_option(&mut self, option: u32) -> Result<bool, Error> {
        self.option(option, &[])?;
        let (h, data) = self.reply(option)?;
        match h.reply_type {
            rep::ACK => Ok(true),
            _ if h.is_error() => {
                tracing::debug!(
                    option,
                    reply = %rep_name(h.reply_type),
                    message = %message_text(&data),
                    "option refused"
                );
                Ok(false)
            }
            other => Err(Error::Protocol(format!(
                "unexpected reply {other} to option {option}"
            ))),
        }
    }
}

/// The most replies one option may bring before the server counts as hostile.
const MAX_REPLIES: usize = 256;

/// The client side of the fixed newstyle handshake for `export` (with `tls`: STARTTLS
/// first, and the TLS session comes back).
pub(crate) fn handshake(
    s: &mut Stream,
    export: &str,
    timeout: Duration,
    tls: Option<&TlsSetup>,
) -> Result<(Negotiated, Option<xdisk_nbd_tls::ClientConnection>), Error> {
    let mut h = Handshake {
        s,
        deadline: Instant::now() + timeout,
        tls: None,
    };
    let mut g = [0u8; GREETING_LEN];
    h.read(&mut g, "greeting")?;
    let hflags = parse_greeting(&g).map_err(|e| {
        Error::Protocol(format!(
            "not a newstyle NBD server ({e}); oldstyle servers are not supported"
        ))
    })?;
    if hflags & hs_flags::FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol(
            "the server does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = hflags & hs_flags::NO_ZEROES != 0;
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    h.send(&cflags.to_be_bytes())?;
    if let Some(t) = tls {
        h.start_tls(t)?;
    }

    let extended = h.simple_option(opt::EXTENDED_HEADERS)?;
    let structured = extended || h.simple_option(opt::STRUCTURED_REPLY)?;
    let mut allocation = None;
    if structured {
        let req = MetaContextRequest {
            name: export.to_owned(),
            queries: vec!["base:allocation".into()],
        };
        h.option(opt::SET_META_CONTEXT, &req.encode())?;
        for _ in 0..MAX_REPLIES {
            let (r, data) = h.reply(opt::SET_META_CONTEXT)?;
            match r.reply_type {
                rep::ACK => break,
                rep::META_CONTEXT => {
                    let (id, name) =
                        parse_meta_context(&data).map_err(|e| Error::Protocol(e.to_string()))?;
                    if name == "base:allocation" {
                        allocation = Some(id);
                    }
                }
                t if r.is_error() => {
                    tracing::debug!(reply = %rep_name(t), "no base:allocation context");
                    allocation = None;
                    break;
                }
                t => {
                    return Err(Error::Protocol(format!(
                        "unexpected reply {t} to SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    let go = InfoRequest {
        name: export.to_owned(),
        requests: vec![xdisk_nbd::wire::info::BLOCK_SIZE],
    };
    h.option(opt::GO, &go.encode())?;
    let mut export_info = None;
    let mut block = None;
    let mut use_go = true;
    let mut acked = false;
    for _ in 0..MAX_REPLIES {
        let (r, data) = h.reply(opt::GO)?;
        match r.reply_type {
            rep::ACK => {
                acked = true;
                break;
            }
            rep::INFO => {
                match InfoReply::parse(&data).map_err(|e| Error::Protocol(e.to_string()))? {
                    InfoReply::Export { size, flags } => export_info = Some((size, flags)),
                    InfoReply::BlockSize(b) => block = Some(b),
                    _ => {}
                }
            }
            rep::ERR_UNSUP => {
                use_go = false;
                break;
            }
            rep::ERR_UNKNOWN => return Err(Error::NoSuchExport(export.to_owned())),
            rep::ERR_TLS_REQD => return Err(Error::TlsRequired),
            t if r.is_error() => {
                return Err(Error::Refused {
                    what: rep_name(t),
                    message: message_text(&data),
                })
            }
            t => return Err(Error::Protocol(format!("unexpected reply {t} to GO"))),
        }
    }
    if use_go && !acked {
        return Err(Error::Protocol("too many replies to GO".into()));
    }
    let (size, tflags) = if use_go {
        export_info
            .ok_or_else(|| Error::Protocol("GO acknowledged without NBD_INFO_EXPORT".into()))?
    } else {
        // The old way: no error reply possible; a server without the export hangs up.
        h.option(opt::EXPORT_NAME, export.as_bytes())?;
        let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
        h.read(&mut b, "export name reply")
            .map_err(|_| Error::NoSuchExport(export.to_owned()))?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            h.read(&mut z, "export name reply padding")?;
        }
        parse_export_name_reply(&b)
    };
    let mut block = block.unwrap_or(BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: MAX_PAYLOAD,
    });
    block.maximum = block.maximum.min(MAX_PAYLOAD) / block.minimum * block.minimum;
    h.s.set_read_timeout(None)
        .map_err(|e| Error::io("socket timeouts", e))?;
    let neg = Negotiated {
        size,
        flags: tflags,
        structured,
        extended,
        block,
        allocation,
        go: use_go,
    };
    Ok((neg, h.tls))
}

/// The errno for an NBD error value.
pub(crate) fn errno_of(e: u32) -> i32 {
    match e {
        errno::EPERM => libc::EPERM,
        errno::EIO => libc::EIO,
        errno::ENOMEM => libc::ENOMEM,
        errno::EINVAL => libc::EINVAL,
        errno::ENOSPC => libc::ENOSPC,
        errno::EOVERFLOW => libc::EOVERFLOW,
        errno::ENOTSUP => libc::EOPNOTSUPP,
        errno::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

pub(crate) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A synchronous caller's wait for one request.
#[derive(Default)]
pub(crate) struct SyncWait {
    done: Mutex<Option<SyncDone>>,
    cond: Condvar,
}

/// What a synchronous request got.
pub(crate) struct SyncDone {
    pub result: io::Result<()>,
    /// A read's data.
    pub data: Vec<u8>,
    /// A block status request's extents of the allocation context.
    pub extents: Vec<Extent>,
}

impl SyncWait {
    pub(crate) fn wait(&self) -> SyncDone {
        let mut g = lock(&self.done);
        loop {
            if let Some(d) = g.take() {
                return d;
            }
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn set(&self, d: SyncDone) {
        *lock(&self.done) = Some(d);
        self.cond.notify_all();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One operation of an engine, in flight on one or more NBD requests.
pub(crate) struct EngineOp {
    pub user_data: u64,
    pub buf: Option<IoSlice>,
    pub parts: usize,
    pub error: Option<io::Error>,
    /// Bytes the completion reports.
    pub result: usize,
    pub flush: bool,
}

/// An engine's side that the reader thread completes.
pub(crate) struct EngineShared {
    pub state: Mutex<EngineState>,
    pub cond: Condvar,
    pub notify: Arc<xdisk_io::sys::EventFd>,
    /// The storage's broken flag (a failed flush sets it).
    pub broken: Arc<std::sync::OnceLock<String>>,
}

#[derive(Default)]
pub(crate) struct EngineState {
    pub ops: HashMap<u64, EngineOp>,
    pub done: std::collections::VecDeque<Completion<IoSlice>>,
}

impl EngineShared {
    /// Finishes one part of op `id`; completes the op after its last part.
    pub(crate) fn finish_part(&self, id: u64, result: io::Result<()>) {
        let mut st = lock(&self.state);
        let Some(op) = st.ops.get_mut(&id) else {
            return;
        };
        if let Err(e) = result {
            op.error.get_or_insert(e);
        }
        op.parts = op.parts.saturating_sub(1);
        if op.parts > 0 {
            return;
        }
        let Some(op) = st.ops.remove(&id) else {
            return;
        };
        if let (true, Some(e)) = (op.flush, &op.error) {
            self.broken.get_or_init(|| e.to_string());
        }
        st.done.push_back(Completion {
            user_data: op.user_data,
            result: match op.error {
                Some(e) => Err(e),
                None => Ok(op.result),
            },
            buf: op.buf,
            phase: xdisk_io::Phase::Done,
        });
        drop(st);
        self.notify.signal();
        self.cond.notify_all();
    }
    fn copy_in(&self, id: u64, at: usize, data: &[u8]) {
        let mut st = lock(&self.state);
        if let Some(b) = st.ops.get_mut(&id).and_then(|o| o.buf.as_mut()) {
            if at
                .checked_add(data.len())
                .is_some_and(|e| e <= b.total_len())
            {
                b.copy_in(at, data);
            }
        }
    }
    fn fill_zero(&self, id: u64, at: usize, len: usize) {
        let mut st = lock(&self.state);
        if let Some(b) = st.ops.get_mut(&id).and_then(|o| o.buf.as_mut()) {
            if at.checked_add(len).is_some_and(|e| e <= b.total_len()) {
                b.fill_zero(at, len);
            }
        }
    }
}

/// Who gets a request's reply.
pub(crate) enum Sink {
    Sync(Arc<SyncWait>),
    Engine {
        shared: Arc<EngineShared>,
        id: u64,
        /// Where this part's data starts in the op's buffer.
        at: usize,
    },
}

/// A request in flight.
pub(crate) struct Pending {
    kind: u16,
    offset: u64,
    len: u64,
    sink: Sink,
    /// A synchronous read's data.
    data: Vec<u8>,
    coverage: Option<ReadCoverage>,
    error: Option<io::Error>,
    extents: Option<Vec<Extent>>,
}

impl Pending {
    fn complete(self, result: io::Result<()>) {
        let result = match (result, self.error) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        };
        match self.sink {
            Sink::Sync(w) => w.set(SyncDone {
                result,
                data: self.data,
                extents: self.extents.unwrap_or_default(),
            }),
            Sink::Engine { shared, id, .. } => shared.finish_part(id, result),
        }
    }
    fn write_data(&mut self, at: u64, data: &[u8]) {
        let at = at as usize;
        match &self.sink {
            Sink::Sync(_) => {
                if let Some(d) = self.data.get_mut(at..at + data.len()) {
                    d.copy_from_slice(data);
                }
            }
            Sink::Engine {
                shared,
                id,
                at: base,
            } => shared.copy_in(*id, base + at, data),
        }
    }
    fn zero(&mut self, at: u64, len: u64) {
        let (at, len) = (at as usize, len as usize);
        match &self.sink {
            Sink::Sync(_) => {
                if let Some(d) = self.data.get_mut(at..at + len) {
                    d.fill(0);
                }
            }
            Sink::Engine {
                shared,
                id,
                at: base,
            } => shared.fill_zero(*id, base + at, len),
        }
    }
}

/// A request to send.
pub(crate) struct Request {
    pub kind: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u64,
    pub payload: Option<Vec<u8>>,
    pub sink: Sink,
}

struct State {
    dead: Option<String>,
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) neg: Negotiated,
    name: String,
    io_timeout: Duration,
}

impl Shared {
    /// Marks the connection dead and fails every request in flight with EIO.
    fn kill(&self, why: &str) {
        let pending: Vec<Pending> = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(why.to_owned());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        if !pending.is_empty() {
            tracing::warn!(
                server = %self.name,
                "NBD connection lost ({why}): {} requests fail with EIO",
                pending.len()
            );
        }
        for p in pending {
            p.complete(Err(eio()));
        }
    }
}

/// One connection: the writer side, and the reader thread.
pub(crate) struct Conn {
    pub(crate) shared: Arc<Shared>,
    writer: Mutex<Stream>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("name", &self.shared.name)
            .finish()
    }
}

/// The reader's poll period for noticing a stalled server.
const TICK: Duration = Duration::from_millis(500);

impl Conn {
    /// Connects and shakes hands.
    pub(crate) fn open(
        t: &Transport,
        export: &str,
        name: &str,
        handshake_timeout: Duration,
        io_timeout: Duration,
        tls: Option<&TlsSetup>,
    ) -> Result<Conn, Error> {
        let mut s = Stream::connect(t, handshake_timeout)
            .map_err(|e| Error::io(format!("cannot connect to {name}"), e))?;
        let (neg, session) = handshake(&mut s, export, handshake_timeout, tls)?;
        let io = |e| Error::io("socket setup", e);
        if let Some(c) = session {
            // The reader and the writers use the plain end of a pump running the session.
            s.set_write_timeout(None).map_err(io)?;
            s = Stream::Unix(xdisk_nbd_tls::pump(c, s).map_err(io)?);
        }
        s.set_write_timeout(Some(io_timeout)).map_err(io)?;
        let mut rs = s.try_clone().map_err(io)?;
        rs.set_read_timeout(Some(TICK)).map_err(io)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dead: None,
                pending: HashMap::new(),
                next_cookie: 1,
            }),
            neg,
            name: name.to_owned(),
            io_timeout,
        });
        let sh = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                let guard = KillOnDrop(sh.clone());
                let why = match read_loop(&sh, &mut rs) {
                    Ok(()) => "closed".to_owned(),
                    Err(e) => e,
                };
                rs.shutdown();
                guard.0.kill(&why);
            })
            .map_err(|e| Error::io("cannot start the NBD reader thread", e))?;
        Ok(Conn {
            shared,
            writer: Mutex::new(s),
            reader: Mutex::new(Some(reader)),
        })
    }

    pub(crate) fn neg(&self) -> &Negotiated {
        &self.shared.neg
    }

    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.shared.state).dead.is_some()
    }

    /// Sends requests (one write for the batch). Requests that cannot be sent fail (EIO)
    /// through their sinks; a failed send kills the connection.
    pub(crate) fn send(&self, reqs: Vec<Request>) {
        let neg = self.shared.neg;
        let mut wire = Vec::new();
        {
            let mut st = lock(&self.shared.state);
            if st.dead.is_some() {
                drop(st);
                for r in reqs {
                    pending_of(r, &neg).0.complete(Err(eio()));
                }
                return;
            }
            for r in reqs {
                let cookie = st.next_cookie;
                st.next_cookie += 1;
                let (p, payload, flags) = pending_of(r, &neg);
                let h = RequestHeader {
                    flags,
                    kind: p.kind,
                    cookie,
                    offset: p.offset,
                    length: p.len,
                    extended: neg.extended,
                };
                wire.extend_from_slice(&h.encode());
                if let Some(pl) = payload {
                    wire.extend_from_slice(&pl);
                }
                st.pending.insert(cookie, p);
            }
        }
        let mut w = lock(&self.writer);
        if let Err(e) = w.write_all(&wire) {
            tracing::warn!(server = %self.shared.name, "cannot send to the NBD server: {e}");
            // The reader sees the shutdown and fails every request in flight.
            w.shutdown();
        }
    }
}

fn pending_of(r: Request, neg: &Negotiated) -> (Pending, Option<Vec<u8>>, u16) {
    let data = match (&r.sink, r.kind) {
        (Sink::Sync(_), cmd::READ) => vec![0u8; r.len as usize],
        _ => Vec::new(),
    };
    let mut flags = r.flags;
    if neg.extended && r.kind == cmd::WRITE {
        flags |= xdisk_nbd::client::write_flags(true);
    }
    (
        Pending {
            kind: r.kind,
            offset: r.offset,
            len: r.len,
            sink: r.sink,
            data,
            coverage: (r.kind == cmd::READ).then(|| ReadCoverage::new(r.offset, r.len)),
            error: None,
            extents: None,
        },
        r.payload,
        flags,
    )
}

impl Drop for Conn {
    /// A clean goodbye: `NBD_CMD_DISC`, then the socket is shut and the reader joined.
    fn drop(&mut self) {
        {
            let mut w = lock(&self.writer);
            if !self.is_dead() {
                let h = RequestHeader {
                    flags: 0,
                    kind: cmd::DISC,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                    extended: self.shared.neg.extended,
                };
                let _ = w.write_all(&h.encode());
            }
            w.shutdown();
        }
        if let Some(r) = lock(&self.reader).take() {
            let _ = r.join();
        }
    }
}

struct KillOnDrop(Arc<Shared>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Reached on every way out of the reader thread, a panic included.
        self.0.kill("the reader thread ended");
    }
}

/// Reads exactly `buf` from the socket: waits as long as nothing is in flight, but no
/// longer than the I/O timeout without progress while requests wait.
fn read_full(sh: &Shared, s: &mut Stream, buf: &mut [u8], idle_ok: bool) -> Result<(), String> {
    let mut got = 0;
    let mut stalled: Option<Instant> = None;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => {
                got += n;
                stalled = None;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let waiting = !lock(&sh.state).pending.is_empty();
                if idle_ok && got == 0 && !waiting {
                    stalled = None;
                    continue;
                }
                let since = *stalled.get_or_insert_with(Instant::now);
                if since.elapsed() >= sh.io_timeout {
                    return Err(format!("no reply from the server for {:?}", sh.io_timeout));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("socket error: {e}")),
        }
    }
    Ok(())
}

/// Scratch size for streaming read data.
const SCRATCH: usize = 256 * 1024;

fn read_loop(sh: &Shared, s: &mut Stream) -> Result<(), String> {
    let mut scratch = vec![0u8; SCRATCH];
    let neg = sh.neg;
    loop {
        let mut hb = [0u8; 32];
        read_full(sh, s, &mut hb[..4], true)?;
        let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
        let hlen = reply_header_len(magic).map_err(|e| format!("bad reply: {e}"))?;
        read_full(sh, s, &mut hb[4..hlen], false)?;
        let h = ReplyHeader::parse(&hb[..hlen]).map_err(|e| format!("bad reply: {e}"))?;
        let cookie = h.cookie();
        let taken = lock(&sh.state).pending.remove(&cookie);
        let Some(mut p) = taken else {
            return Err(format!("reply for unknown cookie {cookie}"));
        };
        match h {
            ReplyHeader::Simple { error, .. } => {
                if neg.extended {
                    p.complete(Err(eio()));
                    return Err("simple reply with extended headers".into());
                }
                if neg.structured && p.kind == cmd::READ {
                    p.complete(Err(eio()));
                    return Err("simple reply to a read with structured replies".into());
                }
                if error != 0 {
                    p.complete(Err(io::Error::from_raw_os_error(errno_of(error))));
                    continue;
                }
                if p.kind == cmd::READ {
                    let mut at = 0u64;
                    while at < p.len {
                        let n = (p.len - at).min(SCRATCH as u64) as usize;
                        if let Err(e) = read_full(sh, s, &mut scratch[..n], false) {
                            p.complete(Err(eio()));
                            return Err(e);
                        }
                        p.write_data(at, &scratch[..n]);
                        at += n as u64;
                    }
                }
                p.complete(Ok(()));
            }
            ReplyHeader::Chunk {
                flags: cflags,
                kind,
                offset,
                len,
                ..
            } => {
                if !neg.structured || neg.extended != offset.is_some() {
                    p.complete(Err(eio()));
                    return Err("reply chunk of a style that was not negotiated".into());
                }
                match chunk(sh, s, &mut p, kind, len, &mut scratch) {
                    Ok(()) => {}
                    Err(e) => {
                        p.complete(Err(eio()));
                        return Err(e);
                    }
                }
                if cflags & reply::FLAG_DONE != 0 {
                    let incomplete =
                        p.error.is_none() && p.coverage.as_ref().is_some_and(|c| !c.complete());
                    if incomplete {
                        p.complete(Err(eio()));
                        return Err("read reply does not cover the whole request".into());
                    }
                    if p.kind == cmd::BLOCK_STATUS && p.extents.is_none() && p.error.is_none() {
                        p.error = Some(eio());
                    }
                    p.complete(Ok(()));
                } else {
                    lock(&sh.state).pending.insert(cookie, p);
                }
            }
        }
    }
}

/// Reads and applies one chunk's payload to its request.
fn chunk(
    sh: &Shared,
    s: &mut Stream,
    p: &mut Pending,
    kind: u16,
    len: u64,
    scratch: &mut [u8],
) -> Result<(), String> {
    if kind == reply::OFFSET_DATA {
        if p.kind != cmd::READ {
            return Err("data chunk in the reply to a request that is not a read".into());
        }
        if len <= DATA_PREFIX_LEN as u64 || len - DATA_PREFIX_LEN as u64 > p.len {
            return Err(format!("data chunk of {len} bytes for a read of {}", p.len));
        }
        let mut pre = [0u8; DATA_PREFIX_LEN];
        read_full(sh, s, &mut pre, false)?;
        let Chunk::Data { offset, len: dlen } =
            parse_chunk(kind, len, &pre).map_err(|e| e.to_string())?
        else {
            return Err("bad data chunk".into());
        };
        let at = match p.coverage.as_mut() {
            Some(c) => c.add(offset, dlen).map_err(|e| e.to_string())?,
            None => return Err("data chunk without a read".into()),
        };
        let mut done = 0u64;
        while done < dlen {
            let n = (dlen - done).min(scratch.len() as u64) as usize;
            read_full(sh, s, &mut scratch[..n], false)?;
            p.write_data(at + done, &scratch[..n]);
            done += n as u64;
        }
        return Ok(());
    }
    if len > MAX_METADATA_CHUNK {
        return Err(format!("reply chunk of {len} bytes"));
    }
    let mut payload = vec![0u8; len as usize];
    read_full(sh, s, &mut payload, false)?;
    match parse_chunk(kind, len, &payload).map_err(|e| format!("bad reply chunk: {e}"))? {
        Chunk::None => {}
        Chunk::Data { .. } => return Err("bad data chunk".into()),
        Chunk::Hole { offset, len } => {
            if p.kind != cmd::READ {
                return Err("hole chunk in the reply to a request that is not a read".into());
            }
            let at = match p.coverage.as_mut() {
                Some(c) => c.add(offset, len).map_err(|e| e.to_string())?,
                None => return Err("hole chunk without a read".into()),
            };
            p.zero(at, len);
        }
        Chunk::BlockStatus { id, extents } => {
            if p.kind != cmd::BLOCK_STATUS {
                return Err("block status chunk in the reply to another request".into());
            }
            if Some(id) != sh.neg.allocation {
                return Err(format!("block status of unknown context {id}"));
            }
            if p.extents.is_some() {
                return Err("two block status chunks for one context".into());
            }
            p.extents = Some(extents);
        }
        Chunk::Error {
            errno,
            message,
            offset,
        } => {
            if let Some(o) = offset {
                if o < p.offset || o - p.offset >= p.len.max(1) {
                    return Err(format!("error offset {o} outside the request"));
                }
            }
            tracing::debug!(server = %sh.name, errno, %message, "NBD request failed");
            if p.error.is_none() {
                p.error = Some(io::Error::from_raw_os_error(errno_of(errno)));
            }
        }
    }
    Ok(())
}
