//! A synchronous xenstore client.
//!
//! One connection, shared by any number of threads: each request gets a fresh `req_id`, is
//! written under a lock, and waits (with a timeout) on its own channel; a reader thread reads
//! every incoming message and hands replies to their waiter by `req_id` (xenstore.txt: "A caller
//! who sends several requests may receive the replies in any order and must use req_id ... to
//! match up replies to requests") and watch events (`req_id` 0, xenstore.txt "WATCH_EVENT") to
//! the subscriber of their token.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use super::transport::{Transport, XenbusDevice, DEFAULT_DEVICE_PATH, DEFAULT_SOCKET_PATH};
use super::wire::{
    self, split_strings, DomId, Errno, Message, MsgType, Perm, WireError, XsRequest,
};

/// How long a request waits for its reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times [`Client::transaction`] runs its closure before giving up with `EAGAIN`.
pub const MAX_TX_RETRIES: u32 = 16;
/// How many times a listing through `DIRECTORY_PART` restarts when the node changes under it.
const MAX_DIRECTORY_PART_RESTARTS: u32 = 16;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstored answered with `XS_ERROR`.
    #[error("xenstore: {0}")]
    Xs(#[from] Errno),
    /// Connecting, or writing a request to the socket or device, failed (a failed write also
    /// closes the connection).
    #[error("xenstore i/o: {0}")]
    Io(#[from] io::Error),
    /// The daemon sent something this client does not understand.
    #[error("xenstore protocol error: {0}")]
    Protocol(String),
    /// No reply (or, for [`Watch::recv_timeout`], no event) within this time (the client's
    /// timeout, [`Client::set_timeout`], by default [`DEFAULT_TIMEOUT`]).
    #[error("no xenstore reply within {0:?}")]
    Timeout(Duration),
    /// The connection is closed (by the daemon, an I/O error or a protocol error).
    #[error("xenstore connection closed: {0}")]
    Disconnected(String),
    /// Refused before sending: a request larger than `XENSTORE_PAYLOAD_MAX`, an empty
    /// permission list, a `CONTROL` without a command.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Watch tokens identify subscriptions, so they must be unique per client.
    #[error("watch token {0:?} is already in use on this connection")]
    DuplicateToken(String),
}

impl Error {
    /// The xenstore error name, if this is an `XS_ERROR` reply.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Xs(e) => Some(*e),
            _ => None,
        }
    }
}

/// A watch event (xenstore.txt, "WATCH_EVENT": `<epath>|<token>|`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (relative if the watch was set with a relative path).
    pub path: String,
    /// The token given when the watch was set.
    pub token: String,
}

type ReplySlot = SyncSender<Message>;

/// A callback that receives watch events ([`Client::watch_with_callback`]).
pub type WatchCallback = Arc<dyn Fn(WatchEvent) + Send + Sync>;

/// Where the events of one watch go.
enum Sink {
    Channel(Sender<WatchEvent>),
    Callback(WatchCallback),
}

struct Demux {
    pending: HashMap<u32, ReplySlot>,
    watches: HashMap<String, Sink>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

struct Inner {
    writer: Mutex<Box<dyn Transport>>,
    demux: Mutex<Demux>,
    next_req_id: AtomicU32,
    timeout_ms: AtomicU64,
    closing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn mark_closed(&self, reason: String) {
        let mut d = lock(&self.demux);
        if d.closed.is_none() {
            tracing::debug!(%reason, "xenstore client connection closed");
            d.closed = Some(reason);
        }
        // Dropping the senders wakes every waiter (and ends every watch receiver).
        d.pending.clear();
        d.watches.clear();
    }

    fn send(&self, msg: &Message) -> Result<(), Error> {
        let bytes = msg.encode();
        let mut w = lock(&self.writer);
        if let Err(e) = w.write_all(&bytes).and_then(|()| w.flush()) {
            drop(w);
            // A partial write desynchronises the stream: nothing more can be sent on it.
            self.mark_closed(format!("write failed: {e}"));
            return Err(Error::Io(e));
        }
        Ok(())
    }

    fn new_message(ty: MsgType, tx_id: u32, payload: Vec<u8>) -> Result<Message, Error> {
        Message::new(ty, 0, tx_id, payload).map_err(|_| {
            Error::InvalidArgument(format!(
                "{} request is larger than XENSTORE_PAYLOAD_MAX ({} bytes)",
                ty.name(),
                wire::XENSTORE_PAYLOAD_MAX
            ))
        })
    }

    /// Sends a request and waits for its reply; returns the reply payload.
    fn request(&self, req: &XsRequest, tx_id: u32) -> Result<Vec<u8>, Error> {
        let (ty, payload) = req.encode();
        let mut msg = Self::new_message(ty, tx_id, payload)?;
        let (slot, rx) = mpsc::sync_channel(1);
        let req_id = {
            let mut d = lock(&self.demux);
            if let Some(reason) = &d.closed {
                return Err(Error::Disconnected(reason.clone()));
            }
            let mut id = self.next_req_id.fetch_add(1, Ordering::Relaxed);
            while d.pending.contains_key(&id) {
                id = self.next_req_id.fetch_add(1, Ordering::Relaxed);
            }
            d.pending.insert(id, slot);
            id
        };
        msg.header.req_id = req_id;
        tracing::trace!(req = ty.name(), req_id, tx_id, "xenstore request");
        if let Err(e) = self.send(&msg) {
            lock(&self.demux).pending.remove(&req_id);
            return Err(e);
        }
        let timeout = self.timeout();
        let reply = match rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.demux).pending.remove(&req_id);
                return Err(Error::Timeout(timeout));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let reason = lock(&self.demux).closed.clone().unwrap_or_default();
                return Err(Error::Disconnected(reason));
            }
        };
        match reply.header.msg_type {
            MsgType::Error => Err(Error::Xs(Errno::from_payload(&reply.payload))),
            t if t == ty => Ok(reply.payload),
            t => Err(Error::Protocol(format!(
                "reply of type {} to a {} request",
                t.name(),
                ty.name()
            ))),
        }
    }

    /// Sends a request without waiting for (or keeping) its reply; used from `Drop`.
    fn send_and_forget(&self, req: &XsRequest, tx_id: u32) {
        let (ty, payload) = req.encode();
        if let Ok(mut msg) = Self::new_message(ty, tx_id, payload) {
            if lock(&self.demux).closed.is_some() {
                return;
            }
            // An id nobody waits for: the reader drops the reply.
            msg.header.req_id = self.next_req_id.fetch_add(1, Ordering::Relaxed);
            let _ = self.send(&msg);
        }
    }

    fn dispatch(&self, msg: Message) {
        if msg.header.msg_type == MsgType::WatchEvent {
            let parts = match split_strings(&msg.payload) {
                Ok(p) if p.len() >= 2 => p,
                _ => {
                    tracing::warn!("malformed xenstore watch event dropped");
                    return;
                }
            };
            let ev = WatchEvent {
                path: String::from_utf8_lossy(parts[0]).into_owned(),
                token: String::from_utf8_lossy(parts[1]).into_owned(),
            };
            let d = lock(&self.demux);
            match d.watches.get(&ev.token) {
                Some(Sink::Channel(tx)) => {
                    let _ = tx.send(ev);
                }
                Some(Sink::Callback(f)) => f(ev),
                None => tracing::debug!(?ev, "xenstore watch event for an unknown token dropped"),
            }
            return;
        }
        let slot = lock(&self.demux).pending.remove(&msg.header.req_id);
        match slot {
            Some(slot) => {
                let _ = slot.try_send(msg);
            }
            None => tracing::debug!(
                req_id = msg.header.req_id,
                ty = msg.header.msg_type.name(),
                "xenstore reply nobody waits for dropped"
            ),
        }
    }

    fn reader_loop(self: Arc<Self>, mut reader: Box<dyn Transport>) {
        let reason = loop {
            match wire::read_message(&mut reader) {
                Ok(Some(msg)) => self.dispatch(msg),
                Ok(None) => break "closed by xenstored".to_owned(),
                Err(WireError::Io(e)) if self.closing.load(Ordering::Relaxed) => {
                    break format!("client closed ({e})")
                }
                Err(e) => break e.to_string(),
            }
            if self.closing.load(Ordering::Relaxed) {
                break "client closed".to_owned();
            }
        };
        self.mark_closed(reason);
    }
}

/// A connection to xenstored. Cheap to share between threads (`&Client` is enough: every
/// method takes `&self`).
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Client {
    /// Connects the way libxenstore does: `$XENSTORED_PATH` if set (a socket or a device),
    /// else the daemon socket (`$XENSTORED_RUNDIR/socket`, default
    /// [`DEFAULT_SOCKET_PATH`]), else the xenbus device ([`DEFAULT_DEVICE_PATH`]).
    pub fn open() -> Result<Client, Error> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return Client::connect(PathBuf::from(p));
        }
        let socket = match std::env::var_os("XENSTORED_RUNDIR") {
            Some(dir) => PathBuf::from(dir).join("socket"),
            None => PathBuf::from(DEFAULT_SOCKET_PATH),
        };
        match Client::connect_unix(&socket) {
            Ok(c) => Ok(c),
            Err(sock_err) => Client::open_device(DEFAULT_DEVICE_PATH).map_err(|dev_err| {
                Error::Io(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no xenstore: {}: {sock_err}; {DEFAULT_DEVICE_PATH}: {dev_err}",
                        socket.display()
                    ),
                ))
            }),
        }
    }

    /// Connects to a unix socket or opens a device, whichever `path` is.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref();
        if std::fs::metadata(path)?.file_type().is_socket() {
            Client::connect_unix(path)
        } else {
            Client::open_device(path)
        }
    }

    /// Connects to xenstored's unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::from_stream(UnixStream::connect(path)?)
    }

    /// Opens the xenbus device (normally [`DEFAULT_DEVICE_PATH`]).
    pub fn open_device(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::with_transport(Box::new(XenbusDevice::open(path)?))
    }

    /// Uses an already connected stream (e.g. from
    /// `xdisk_xensim::xenstored::Server::connect_as`).
    pub fn from_stream(stream: UnixStream) -> Result<Client, Error> {
        Client::with_transport(Box::new(stream))
    }

    /// Uses any transport; starts the reader thread.
    pub fn with_transport(transport: Box<dyn Transport>) -> Result<Client, Error> {
        let reader = transport.try_clone_box()?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(transport),
            demux: Mutex::new(Demux {
                pending: HashMap::new(),
                watches: HashMap::new(),
                closed: None,
            }),
            next_req_id: AtomicU32::new(1),
            timeout_ms: AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64),
            closing: AtomicBool::new(false),
        });
        let for_reader = inner.clone();
        thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || for_reader.reader_loop(reader))?;
        Ok(Client { inner })
    }

    /// Sets how long each request waits for its reply.
    pub fn set_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.inner.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// The reply timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// `false` once the connection is closed; every request then fails with
    /// [`Error::Disconnected`].
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.demux).closed.is_none()
    }

    fn req(&self, tx: u32, req: XsRequest) -> Result<Vec<u8>, Error> {
        self.inner.request(&req, tx)
    }

    // --- operations shared with transactions (`tx` 0 = none) ---------------------------------

    fn op_read(&self, tx: u32, path: &str) -> Result<Vec<u8>, Error> {
        self.req(
            tx,
            XsRequest::Read {
                path: path.to_owned(),
            },
        )
    }

    fn op_write(&self, tx: u32, path: &str, value: &[u8]) -> Result<(), Error> {
        self.req(
            tx,
            XsRequest::Write {
                path: path.to_owned(),
                value: value.to_vec(),
            },
        )
        .map(drop)
    }

    fn op_mkdir(&self, tx: u32, path: &str) -> Result<(), Error> {
        self.req(
            tx,
            XsRequest::Mkdir {
                path: path.to_owned(),
            },
        )
        .map(drop)
    }

    fn op_rm(&self, tx: u32, path: &str) -> Result<(), Error> {
        self.req(
            tx,
            XsRequest::Rm {
                path: path.to_owned(),
            },
        )
        .map(drop)
    }

    fn op_exists(&self, tx: u32, path: &str) -> Result<bool, Error> {
        match self.op_read(tx, path) {
            Ok(_) => Ok(true),
            Err(Error::Xs(Errno::ENOENT)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn op_directory(&self, tx: u32, path: &str) -> Result<Vec<String>, Error> {
        match self.req(
            tx,
            XsRequest::Directory {
                path: path.to_owned(),
            },
        ) {
            Ok(payload) => Ok(names(&payload)),
            // xenstored answers E2BIG when the list does not fit in one reply; then fetch it in
            // parts (xenstore.txt, "DIRECTORY_PART").
            Err(Error::Xs(Errno::E2BIG)) => self.directory_in_parts(tx, path),
            Err(e) => Err(e),
        }
    }

    fn directory_in_parts(&self, tx: u32, path: &str) -> Result<Vec<String>, Error> {
        'restart: for _ in 0..MAX_DIRECTORY_PART_RESTARTS {
            let mut all = Vec::new();
            let mut generation: Option<Vec<u8>> = None;
            let mut offset: usize = 0;
            loop {
                let off = u32::try_from(offset)
                    .map_err(|_| Error::Protocol("directory listing too large".into()))?;
                let reply = self.req(
                    tx,
                    XsRequest::DirectoryPart {
                        path: path.to_owned(),
                        offset: off,
                    },
                )?;
                // `<gencnt>|<child-leaf-name>|*`, the last part ending with an empty name.
                let nul = reply.iter().position(|&b| b == 0).ok_or_else(|| {
                    Error::Protocol("DIRECTORY_PART reply without generation".into())
                })?;
                let (gen, rest) = (&reply[..nul], &reply[nul + 1..]);
                match &generation {
                    None => generation = Some(gen.to_vec()),
                    Some(g) if g.as_slice() != gen => continue 'restart,
                    Some(_) => {}
                }
                if rest.is_empty() {
                    return Err(Error::Protocol("empty DIRECTORY_PART chunk".into()));
                }
                let done = rest == [0] || rest.ends_with(&[0, 0]);
                let chunk = if done { &rest[..rest.len() - 1] } else { rest };
                all.extend(names(chunk));
                offset += chunk.len();
                if done {
                    return Ok(all);
                }
            }
        }
        Err(Error::Xs(Errno::EAGAIN))
    }

    fn op_get_perms(&self, tx: u32, path: &str) -> Result<Vec<Perm>, Error> {
        let reply = self.req(
            tx,
            XsRequest::GetPerms {
                path: path.to_owned(),
            },
        )?;
        let parts =
            split_strings(&reply).map_err(|_| Error::Protocol("malformed permissions".into()))?;
        wire::parse_perms(&parts).map_err(|_| Error::Protocol("malformed permissions".into()))
    }

    fn op_set_perms(&self, tx: u32, path: &str, perms: &[Perm]) -> Result<(), Error> {
        if perms.is_empty() {
            return Err(Error::InvalidArgument(
                "a permission list needs at least the owner entry".into(),
            ));
        }
        self.req(
            tx,
            XsRequest::SetPerms {
                path: path.to_owned(),
                perms: perms.to_vec(),
            },
        )
        .map(drop)
    }

    // --- public API ---------------------------------------------------------------------------

    /// Reads a node's value (`XS_READ`).
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        self.op_read(0, path)
    }

    /// Reads a node's value as UTF-8 text.
    pub fn read_string(&self, path: &str) -> Result<String, Error> {
        to_string(self.read(path)?)
    }

    /// Whether a node exists (and is readable).
    pub fn exists(&self, path: &str) -> Result<bool, Error> {
        self.op_exists(0, path)
    }

    /// Writes a node, creating missing parents (`XS_WRITE`).
    pub fn write(&self, path: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.op_write(0, path, value.as_ref())
    }

    /// Creates a node and its missing parents, keeping existing values (`XS_MKDIR`).
    pub fn mkdir(&self, path: &str) -> Result<(), Error> {
        self.op_mkdir(0, path)
    }

    /// Removes a node and everything below it (`XS_RM`).
    pub fn rm(&self, path: &str) -> Result<(), Error> {
        self.op_rm(0, path)
    }

    /// Lists the names of a node's children (`XS_DIRECTORY`, falling back to
    /// `XS_DIRECTORY_PART` for long lists).
    pub fn directory(&self, path: &str) -> Result<Vec<String>, Error> {
        self.op_directory(0, path)
    }

    /// A node's permissions; the first entry is the owner (`XS_GET_PERMS`).
    pub fn get_perms(&self, path: &str) -> Result<Vec<Perm>, Error> {
        self.op_get_perms(0, path)
    }

    /// Replaces a node's permissions (`XS_SET_PERMS`).
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), Error> {
        self.op_set_perms(0, path, perms)
    }

    /// Starts a transaction (`XS_TRANSACTION_START`). Prefer [`Client::transaction`], which
    /// retries on conflicts.
    pub fn transaction_start(&self) -> Result<Transaction<'_>, Error> {
        let reply = self.req(0, XsRequest::TransactionStart)?;
        let id = first_string(&reply)
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| Error::Protocol("bad TRANSACTION_START reply".into()))?;
        Ok(Transaction {
            client: self,
            id,
            finished: false,
        })
    }

    /// Runs `f` in a transaction and commits it; when the commit (or an operation) fails with
    /// `EAGAIN` because of a conflicting change, runs it again, at most [`MAX_TX_RETRIES`]
    /// times. Any other error aborts the transaction and is returned.
    pub fn transaction<T, F>(&self, mut f: F) -> Result<T, Error>
    where
        F: FnMut(&Transaction<'_>) -> Result<T, Error>,
    {
        for attempt in 0..MAX_TX_RETRIES {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(1 << attempt.min(5)));
            }
            let tx = self.transaction_start()?;
            match f(&tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(Error::Xs(Errno::EAGAIN)) => {
                        tracing::debug!(attempt, "xenstore transaction conflict, retrying")
                    }
                    Err(e) => return Err(e),
                },
                Err(Error::Xs(Errno::EAGAIN)) => {
                    let _ = tx.abort();
                }
                Err(e) => {
                    let _ = tx.abort();
                    return Err(e);
                }
            }
        }
        Err(Error::Xs(Errno::EAGAIN))
    }

    /// Sets a watch whose events arrive on the returned [`Watch`]. xenstored fires it once
    /// right away (xenstore.txt, "WATCH"). The token must be unique on this client.
    pub fn watch(&self, path: &str, token: &str) -> Result<Watch, Error> {
        let (tx, rx) = mpsc::channel();
        self.watch_with_sender(path, token, tx)?;
        Ok(Watch {
            inner: self.inner.clone(),
            path: path.to_owned(),
            token: token.to_owned(),
            rx,
            active: true,
        })
    }

    /// Sets a watch whose events are sent to `events` (so that many watches can share one
    /// receiver); remove it with [`Client::unwatch`]. The token must be unique on this client.
    pub fn watch_with_sender(
        &self,
        path: &str,
        token: &str,
        events: Sender<WatchEvent>,
    ) -> Result<(), Error> {
        self.watch_with_sink(path, token, Sink::Channel(events))
    }

    /// Sets a watch whose events are handed to `callback`, on the connection's reader thread
    /// and under its dispatch lock: the callback must be quick and must not call this client.
    /// Unlike a channel it lets the subscriber coalesce events, so that a peer firing a watch
    /// in a loop costs no memory (XSA-349). Remove it with [`Client::unwatch`].
    pub fn watch_with_callback(
        &self,
        path: &str,
        token: &str,
        callback: WatchCallback,
    ) -> Result<(), Error> {
        self.watch_with_sink(path, token, Sink::Callback(callback))
    }

    fn watch_with_sink(&self, path: &str, token: &str, events: Sink) -> Result<(), Error> {
        {
            let mut d = lock(&self.inner.demux);
            if d.watches.contains_key(token) {
                return Err(Error::DuplicateToken(token.to_owned()));
            }
            // Registered before the request so that the initial event cannot be missed.
            d.watches.insert(token.to_owned(), events);
        }
        let r = self.req(
            0,
            XsRequest::Watch {
                path: path.to_owned(),
                token: token.as_bytes().to_vec(),
            },
        );
        if r.is_err() {
            lock(&self.inner.demux).watches.remove(token);
        }
        r.map(drop)
    }

    /// Removes a watch (`XS_UNWATCH`).
    pub fn unwatch(&self, path: &str, token: &str) -> Result<(), Error> {
        lock(&self.inner.demux).watches.remove(token);
        self.req(
            0,
            XsRequest::Unwatch {
                path: path.to_owned(),
                token: token.as_bytes().to_vec(),
            },
        )
        .map(drop)
    }

    /// Removes every watch and transaction of this connection (`XS_RESET_WATCHES`).
    pub fn reset_watches(&self) -> Result<(), Error> {
        self.req(0, XsRequest::ResetWatches)?;
        lock(&self.inner.demux).watches.clear();
        Ok(())
    }

    /// `/local/domain/<domid>` as the daemon says it (`XS_GET_DOMAIN_PATH`).
    pub fn get_domain_path(&self, domid: DomId) -> Result<String, Error> {
        let reply = self.req(0, XsRequest::GetDomainPath { domid })?;
        first_string(&reply).ok_or_else(|| Error::Protocol("bad GET_DOMAIN_PATH reply".into()))
    }

    /// Tells xenstored about a new domain (`XS_INTRODUCE`, dom0 only).
    pub fn introduce(&self, domid: DomId, mfn: u64, evtchn: u32) -> Result<(), Error> {
        self.req(0, XsRequest::Introduce { domid, mfn, evtchn })
            .map(drop)
    }

    /// Asks xenstored to drop a domain (`XS_RELEASE`, dom0 only).
    pub fn release(&self, domid: DomId) -> Result<(), Error> {
        self.req(0, XsRequest::Release { domid }).map(drop)
    }

    /// Whether xenstored talks to a domain (`XS_IS_DOMAIN_INTRODUCED`).
    pub fn is_domain_introduced(&self, domid: DomId) -> Result<bool, Error> {
        let reply = self.req(0, XsRequest::IsDomainIntroduced { domid })?;
        match first_string(&reply).as_deref() {
            Some("T") => Ok(true),
            Some("F") => Ok(false),
            _ => Err(Error::Protocol("bad IS_DOMAIN_INTRODUCED reply".into())),
        }
    }

    /// `XS_RESUME` (dom0 only).
    pub fn resume(&self, domid: DomId) -> Result<(), Error> {
        self.req(0, XsRequest::Resume { domid }).map(drop)
    }

    /// `XS_SET_TARGET` (dom0 only): `domid` gets the rights of `target`.
    pub fn set_target(&self, domid: DomId, target: DomId) -> Result<(), Error> {
        self.req(0, XsRequest::SetTarget { domid, target })
            .map(drop)
    }

    /// `XS_CONTROL` with a command and its parameters; returns the raw reply.
    pub fn control(&self, args: &[&str]) -> Result<Vec<u8>, Error> {
        if args.is_empty() {
            return Err(Error::InvalidArgument("CONTROL needs a command".into()));
        }
        self.req(
            0,
            XsRequest::Control {
                args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
            },
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let shut = lock(&self.inner.writer).shutdown();
        if shut.is_err() {
            // The xenbus device cannot be shut down: provoke a reply so that the reader thread
            // wakes up, sees `closing` and exits.
            self.inner
                .send_and_forget(&XsRequest::GetDomainPath { domid: 0 }, 0);
        }
    }
}

fn names(payload: &[u8]) -> Vec<String> {
    payload
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn first_string(payload: &[u8]) -> Option<String> {
    let s = payload.split(|&b| b == 0).next()?;
    std::str::from_utf8(s).ok().map(str::to_owned)
}

fn to_string(v: Vec<u8>) -> Result<String, Error> {
    String::from_utf8(v).map_err(|_| Error::Protocol("value is not UTF-8".into()))
}

/// An open transaction. Operations on it see the transaction's view; [`Transaction::commit`]
/// applies them atomically or fails with `EAGAIN`. Dropping it without committing aborts it.
pub struct Transaction<'a> {
    client: &'a Client,
    id: u32,
    finished: bool,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").field("id", &self.id).finish()
    }
}

impl Transaction<'_> {
    /// The transaction id (the `tx_id` of its requests).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// [`Client::read`] in the transaction (`XS_READ` with its `tx_id`).
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        self.client.op_read(self.id, path)
    }

    /// [`Client::read_string`] in the transaction.
    pub fn read_string(&self, path: &str) -> Result<String, Error> {
        to_string(self.read(path)?)
    }

    /// [`Client::exists`] in the transaction (a read; `ENOENT` is `false`).
    pub fn exists(&self, path: &str) -> Result<bool, Error> {
        self.client.op_exists(self.id, path)
    }

    /// [`Client::write`] in the transaction: visible to others only once committed.
    pub fn write(&self, path: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.client.op_write(self.id, path, value.as_ref())
    }

    /// [`Client::mkdir`] in the transaction.
    pub fn mkdir(&self, path: &str) -> Result<(), Error> {
        self.client.op_mkdir(self.id, path)
    }

    /// [`Client::rm`] in the transaction.
    pub fn rm(&self, path: &str) -> Result<(), Error> {
        self.client.op_rm(self.id, path)
    }

    /// [`Client::directory`] in the transaction.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, Error> {
        self.client.op_directory(self.id, path)
    }

    /// [`Client::get_perms`] in the transaction.
    pub fn get_perms(&self, path: &str) -> Result<Vec<Perm>, Error> {
        self.client.op_get_perms(self.id, path)
    }

    /// [`Client::set_perms`] in the transaction.
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), Error> {
        self.client.op_set_perms(self.id, path, perms)
    }

    fn end(&mut self, commit: bool) -> Result<(), Error> {
        self.finished = true;
        self.client
            .req(self.id, XsRequest::TransactionEnd { commit })
            .map(drop)
    }

    /// Commits (`TRANSACTION_END T`): `Err(Error::Xs(Errno::EAGAIN))` if something it read or
    /// wrote was changed by someone else meanwhile.
    pub fn commit(mut self) -> Result<(), Error> {
        self.end(true)
    }

    /// Discards the transaction (`TRANSACTION_END F`).
    pub fn abort(mut self) -> Result<(), Error> {
        self.end(false)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.client
                .inner
                .send_and_forget(&XsRequest::TransactionEnd { commit: false }, self.id);
        }
    }
}

/// A watch set with [`Client::watch`]: a receiver of its events. Dropping it removes the
/// watch (without waiting for the daemon's answer); [`Watch::unwatch`] waits.
pub struct Watch {
    inner: Arc<Inner>,
    path: String,
    token: String,
    rx: Receiver<WatchEvent>,
    active: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("path", &self.path)
            .field("token", &self.token)
            .finish()
    }
}

impl Watch {
    /// The watched path, as given to [`Client::watch`] (events fire for it and every node
    /// below it).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The token the watch was set with; its events carry it (xenstore.txt, "WATCH").
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The underlying channel (e.g. for `iter()` or `try_iter()`).
    pub fn receiver(&self) -> &Receiver<WatchEvent> {
        &self.rx
    }

    /// Waits for the next event; fails once the connection is closed.
    pub fn recv(&self) -> Result<WatchEvent, Error> {
        self.rx.recv().map_err(|_| self.disconnected())
    }

    /// Waits at most `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<WatchEvent, Error> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::Timeout(timeout),
            RecvTimeoutError::Disconnected => self.disconnected(),
        })
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<WatchEvent> {
        self.rx.try_recv().ok()
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected(
            lock(&self.inner.demux)
                .closed
                .clone()
                .unwrap_or_else(|| "watch removed".into()),
        )
    }

    /// Removes the watch and waits for the daemon to confirm.
    pub fn unwatch(mut self) -> Result<(), Error> {
        self.active = false;
        lock(&self.inner.demux).watches.remove(&self.token);
        let req = XsRequest::Unwatch {
            path: self.path.clone(),
            token: self.token.as_bytes().to_vec(),
        };
        self.inner.request(&req, 0).map(drop)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.active {
            lock(&self.inner.demux).watches.remove(&self.token);
            let req = XsRequest::Unwatch {
                path: self.path.clone(),
                token: self.token.as_bytes().to_vec(),
            };
            self.inner.send_and_forget(&req, 0);
        }
    }
}
