//! A small in-process xenstored, for hosts without Xen and for tests.
//!
//! It listens on a unix socket chosen by the caller and speaks the wire protocol of
//! [`xdisk_xen::xenstore::wire`] (each message parsed as [`xdisk_xen::xenstore::parse_message`]
//! does), so libxenstore tools (`XENSTORED_PATH=<socket> xenstore-ls`) and
//! [`xdisk_xen::xenstore::Client`] both work against it. Socket connections are dom0;
//! [`Server::connect_as`] hands out connections that act as domain N, with xenstored's
//! permission rules and quotas ([`Config`]):
//! - a node's first permission entry names its owner and the access of every domain not listed
//!   after it; dom0 and the owner have full access; SET_PERMS needs ownership, and a domain may
//!   not give a node away (`EPERM`).
//! - a domain may only create nodes below a node it can write; new nodes inherit their
//!   parent's permissions, and a domain owns the nodes it creates (dom0-created nodes keep the
//!   parent's owner, as in xenstored).
//! - a missing node below one the caller may not access reports `EACCES`, not `ENOENT`.
//!
//! What it implements (xenstore.txt sections):
//! - READ, WRITE (creating missing parents), MKDIR, RM, DIRECTORY, DIRECTORY_PART, GET_PERMS,
//!   SET_PERMS, with relative paths resolved against `/local/domain/<domid>`.
//! - WATCH/UNWATCH/RESET_WATCHES and WATCH_EVENT: a watch fires for changes to its path or any
//!   descendant, once right after it is set, and for the special `@introduceDomain` and
//!   `@releaseDomain` events; unprivileged watchers only see events for nodes they can read.
//! - TRANSACTION_START/END: optimistic; a transaction works on a snapshot and its commit fails
//!   with `EAGAIN` if a node it read or wrote changed meanwhile (per-node generations).
//! - GET_DOMAIN_PATH, INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED, RESUME, SET_TARGET, CONTROL
//!   (`help`, `check`, `print`); no shared rings or event channels are involved.
//!
//! Robustness: each connection has a reader thread (one message at a time, at most
//! [`XENSTORE_PAYLOAD_MAX`] bytes, checked before allocating) and a writer thread fed through a
//! bounded queue. A length over the maximum or a truncated message closes that connection
//! only; a malformed payload gets an `XS_ERROR` reply. A client that does not read its replies
//! and events fills its queue ([`Config::max_outstanding`]) and is disconnected.

mod ops;
mod tree;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tree::{Actor, Event, Limits, Op, Perms, Tree, READ};

use xdisk_xen::xenstore::wire::{
    self, domain_path, is_child, join_strings, ok_payload, Access, DomId, Errno, Header, MsgType,
    Perm, XsRequest, HEADER_LEN, INTRODUCE_DOMAIN, RELEASE_DOMAIN, XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
};
use xdisk_xen::xenstore::{Client, Error as ClientError};

/// Quotas and limits. The per-domain ones (nodes, value size, permission entries,
/// transaction bytes) apply to unprivileged domains only, as in xenstored; the per-connection
/// ones apply to every connection.
#[derive(Clone, Debug)]
pub struct Config {
    /// Nodes a domain may own (xenstored's `quota-nb-entry-per-domain`); `ENOSPC` beyond.
    pub max_nodes_per_domain: usize,
    /// Largest value a domain may write; `ENOSPC` beyond. (Any value also has to fit in one
    /// message with its path.)
    pub max_value_size: usize,
    /// Entries in a permission list set by a domain; `ENOSPC` beyond.
    pub max_perms_per_node: usize,
    /// Watches per connection; `E2BIG` beyond (as xenstored).
    pub max_watches_per_conn: usize,
    /// Open transactions per connection; `ENOSPC` beyond.
    pub max_transactions_per_conn: usize,
    /// Bytes a domain's transaction may record (operations and paths it looked at); `ENOSPC`
    /// beyond.
    pub max_transaction_bytes: usize,
    /// Messages (replies and watch events) queued for a domain's connection that does not
    /// read them; the connection is closed when the queue overflows.
    pub max_outstanding: usize,
    /// The same for dom0 connections (trusted, but still bounded).
    pub max_outstanding_dom0: usize,
    /// Simultaneous connections (socket and [`Server::connect_as`]); more are refused.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_nodes_per_domain: 1000,
            max_value_size: XENSTORE_PAYLOAD_MAX,
            max_perms_per_node: 5,
            max_watches_per_conn: 256,
            max_transactions_per_conn: 32,
            max_transaction_bytes: 1 << 20,
            max_outstanding: 256,
            max_outstanding_dom0: 65536,
            max_connections: 1024,
        }
    }
}

impl Config {
    fn limits(&self) -> Limits {
        Limits {
            max_nodes_per_domain: self.max_nodes_per_domain,
            max_value_size: self.max_value_size,
            max_perms_per_node: self.max_perms_per_node,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server state.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct WatchReg {
    /// Absolute path or special `@` name.
    path: String,
    token: Vec<u8>,
    /// For watches set with a relative path: the prefix stripped from event paths
    /// (xenstore.txt, "WATCH_EVENT": "Iff <wpath> ... was specified as a relative pathname, the
    /// <epath> path will also be relative").
    rel_base: Option<String>,
}

struct Tx {
    /// The store when the transaction started; decisions are recorded against it.
    base: Tree,
    /// The transaction's own view: the snapshot plus its changes.
    view: Tree,
    /// Generations (in `base`) of the nodes the transaction depends on; 0 = absent.
    observed: HashMap<String, u64>,
    /// Changes to replay on commit.
    ops: Vec<Op>,
    bytes: usize,
}

impl Tx {
    fn observe(&mut self, path: &str, budget: Option<usize>) -> Result<(), Errno> {
        for (p, g) in self.base.dependencies(path) {
            if !self.observed.contains_key(&p) {
                self.bytes += p.len() + 16;
                if budget.is_some_and(|b| self.bytes > b) {
                    return Err(Errno::ENOSPC);
                }
                self.observed.insert(p, g);
            }
        }
        Ok(())
    }
}

struct Conn {
    domid: DomId,
    out: SyncSender<Vec<u8>>,
    stream: UnixStream,
    watches: Vec<WatchReg>,
    txs: HashMap<u32, Tx>,
    broken: bool,
}

impl Conn {
    /// Queues a message; never blocks (the lock is held). Overflow closes the connection.
    fn push(&mut self, id: u64, msg: Vec<u8>) {
        if self.broken {
            return;
        }
        match self.out.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    conn = id,
                    domid = self.domid,
                    "xenstored: output queue full, closing connection"
                );
                self.close();
            }
            Err(TrySendError::Disconnected(_)) => self.close(),
        }
    }

    fn close(&mut self) {
        self.broken = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

struct State {
    tree: Tree,
    gen: u64,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    next_tx: u32,
    introduced: BTreeSet<DomId>,
    targets: HashMap<DomId, DomId>,
    /// Permissions of the special watch names (only readers get their events).
    special: HashMap<String, Perms>,
}

/// A successful reply: its payload and messages to send right after it (the initial watch
/// event).
struct Reply {
    payload: Vec<u8>,
    after: Vec<Vec<u8>>,
}

impl Reply {
    fn ok() -> Reply {
        Reply {
            payload: ok_payload(),
            after: Vec::new(),
        }
    }

    fn data(payload: Vec<u8>) -> Reply {
        Reply {
            payload,
            after: Vec::new(),
        }
    }
}

fn encode(msg_type: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(
        &Header {
            msg_type,
            req_id,
            tx_id,
            len: payload.len() as u32,
        }
        .encode(),
    );
    v.extend_from_slice(&payload);
    v
}

/// Resolves a relative node path against the domain's home (xenstore.txt, `<path>`).
fn resolve(path: &str, dom: DomId) -> Result<String, Errno> {
    if path.starts_with('/') {
        return Ok(path.to_owned());
    }
    let abs = format!("{}/{}", domain_path(dom), path);
    if abs.len() > XENSTORE_ABS_PATH_MAX {
        return Err(Errno::EINVAL);
    }
    Ok(abs)
}

fn parent_of(path: &str) -> Option<&str> {
    match path.rfind('/') {
        Some(0) if path.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&path[..i]),
    }
}

impl State {
    fn new() -> State {
        let mut gen = 0;
        let tree = Tree::new(&mut gen);
        let closed: Perms = vec![Perm::new(Access::None, 0)].into();
        State {
            tree,
            gen,
            conns: HashMap::new(),
            next_conn: 1,
            next_tx: 1,
            introduced: BTreeSet::new(),
            targets: HashMap::new(),
            special: HashMap::from([
                (INTRODUCE_DOMAIN.to_owned(), closed.clone()),
                (RELEASE_DOMAIN.to_owned(), closed),
            ]),
        }
    }

    /// Handles one message from connection `cid` and queues the reply.
    fn handle(&mut self, cfg: &Config, cid: u64, hdr: Header, payload: &[u8]) {
        let result = XsRequest::decode(hdr.msg_type, payload).and_then(|req| {
            tracing::trace!(conn = cid, ?req, tx = hdr.tx_id, "xenstored request");
            self.dispatch(cfg, cid, hdr.tx_id, req)
        });
        let (ty, body, after) = match result {
            // A reply that does not fit is E2BIG (e.g. DIRECTORY of a big node; the client
            // then uses DIRECTORY_PART).
            Ok(r) if r.payload.len() > XENSTORE_PAYLOAD_MAX => {
                (MsgType::Error, Errno::E2BIG.to_payload(), Vec::new())
            }
            Ok(r) => (hdr.msg_type, r.payload, r.after),
            Err(e) => {
                tracing::debug!(conn = cid, ty = hdr.msg_type.name(), err = %e, "xenstored error reply");
                (MsgType::Error, e.to_payload(), Vec::new())
            }
        };
        if let Some(conn) = self.conns.get_mut(&cid) {
            conn.push(cid, encode(ty, hdr.req_id, hdr.tx_id, body));
            for m in after {
                conn.push(cid, m);
            }
        }
    }

    fn actor(&self, dom: DomId) -> Actor {
        Actor {
            dom,
            target: self.targets.get(&dom).copied(),
        }
    }

    fn introduce(&mut self, domid: DomId) -> Result<(), Errno> {
        if domid == 0 || u32::from(domid) >= wire::DOMID_FIRST_RESERVED {
            return Err(Errno::EINVAL);
        }
        if self.introduced.insert(domid) {
            self.fire_special(INTRODUCE_DOMAIN);
        }
        Ok(())
    }

    fn release(&mut self, domid: DomId) -> Result<(), Errno> {
        if domid == 0 || u32::from(domid) >= wire::DOMID_FIRST_RESERVED {
            return Err(Errno::EINVAL);
        }
        if !self.introduced.remove(&domid) {
            return Err(Errno::ENOENT);
        }
        self.targets.remove(&domid);
        // xenstore.txt "RELEASE": the domain "won't be able to communicate with xenstored".
        for conn in self.conns.values_mut().filter(|c| c.domid == domid) {
            conn.close();
        }
        self.fire_special(RELEASE_DOMAIN);
        Ok(())
    }

    fn fire_special(&mut self, name: &str) {
        let perms = self
            .special
            .get(name)
            .cloned()
            .unwrap_or_else(|| vec![Perm::new(Access::None, 0)].into());
        self.fire(vec![Event::new(name, perms)]);
    }

    /// Queues a WATCH_EVENT for every watch an event matches (xenstore.txt "WATCH": "The
    /// event's path matches the watch's <wpath> if it is an child of <wpath>").
    fn fire(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let State { conns, targets, .. } = self;
        for (&id, conn) in conns.iter_mut() {
            if conn.broken || conn.watches.is_empty() {
                continue;
            }
            let actor = Actor {
                dom: conn.domid,
                target: targets.get(&conn.domid).copied(),
            };
            let mut msgs = Vec::new();
            for w in &conn.watches {
                for ev in &events {
                    let hit = if ev.exact {
                        w.path == ev.path
                    } else {
                        is_child(&ev.path, &w.path)
                    };
                    if !hit {
                        continue;
                    }
                    let readable = |p: &Perms| tree::rights(p, actor) & READ != 0;
                    if !(readable(&ev.perms) || ev.old_perms.as_ref().is_some_and(readable)) {
                        continue;
                    }
                    let epath = match &w.rel_base {
                        Some(base) => ev
                            .path
                            .strip_prefix(base.as_str())
                            .and_then(|r| r.strip_prefix('/'))
                            .unwrap_or(&ev.path),
                        None => &ev.path,
                    };
                    let payload = wire::watch_event_payload(epath, &w.token);
                    if payload.len() > XENSTORE_PAYLOAD_MAX {
                        tracing::warn!(
                            conn = id,
                            "xenstored: watch event too large to send, dropped"
                        );
                        continue;
                    }
                    msgs.push(encode(MsgType::WatchEvent, 0, 0, payload));
                }
            }
            for m in msgs {
                conn.push(id, m);
            }
        }
    }
}

/// The reply of DIRECTORY_PART (xenstore.txt): `<gencnt>|` then as many whole
/// `<child-leaf-name>|` entries from byte `offset` of the child list as fit; the part that
/// reaches the end of the list carries an extra empty name.
fn directory_part(gen: u64, names: &[&String], offset: usize) -> Vec<u8> {
    let list = join_strings(names);
    let mut out = join_strings(&[gen.to_string()]);
    let room = XENSTORE_PAYLOAD_MAX.saturating_sub(out.len() + 1);
    let rest = list.get(offset..).unwrap_or_default();
    let mut take = 0;
    for entry in rest.split_inclusive(|&b| b == 0) {
        if take + entry.len() > room {
            break;
        }
        take += entry.len();
    }
    out.extend_from_slice(&rest[..take]);
    if take == rest.len() {
        out.push(0);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Connections and the server object.

struct Shared {
    cfg: Config,
    state: Mutex<State>,
    shutdown: AtomicBool,
}

fn spawn_connection(shared: &Arc<Shared>, stream: UnixStream, domid: DomId) -> io::Result<u64> {
    let reader = stream.try_clone()?;
    let mut writer = stream.try_clone()?;
    let queue = if domid == 0 {
        shared.cfg.max_outstanding_dom0
    } else {
        shared.cfg.max_outstanding
    };
    let (out, rx) = mpsc::sync_channel::<Vec<u8>>(queue.max(1));
    let cid = {
        let mut st = lock(&shared.state);
        if st.conns.len() >= shared.cfg.max_connections {
            return Err(io::Error::other("too many xenstore connections"));
        }
        let cid = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(
            cid,
            Conn {
                domid,
                out,
                stream,
                watches: Vec::new(),
                txs: HashMap::new(),
                broken: false,
            },
        );
        cid
    };
    let spawned = thread::Builder::new()
        .name(format!("xenstored-w{cid}"))
        .spawn(move || {
            for msg in rx {
                if writer.write_all(&msg).is_err() {
                    let _ = writer.shutdown(Shutdown::Both);
                    break;
                }
            }
        });
    let spawned = spawned.and_then(|_| {
        let shared = shared.clone();
        thread::Builder::new()
            .name(format!("xenstored-r{cid}"))
            .spawn(move || serve(shared, cid, reader))
    });
    if let Err(e) = spawned {
        if let Some(mut c) = lock(&shared.state).conns.remove(&cid) {
            c.close();
        }
        return Err(e);
    }
    tracing::debug!(conn = cid, domid, "xenstored: new connection");
    Ok(cid)
}

fn serve(shared: Arc<Shared>, cid: u64, mut stream: UnixStream) {
    loop {
        let msg = match wire::read_message(&mut stream) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(conn = cid, err = %e, "xenstored: closing connection");
                break;
            }
        };
        if shared.shutdown.load(Ordering::Relaxed) {
            break;
        }
        let mut st = lock(&shared.state);
        if st.conns.get(&cid).is_none_or(|c| c.broken) {
            break;
        }
        st.handle(&shared.cfg, cid, msg.header, &msg.payload);
    }
    if let Some(mut c) = lock(&shared.state).conns.remove(&cid) {
        // Queued replies still go out: the writer drains its queue before it ends.
        c.broken = true;
        let _ = c.stream.shutdown(Shutdown::Read);
    }
    tracing::debug!(conn = cid, "xenstored: connection closed");
}

/// The in-process xenstored. Dropping it stops the listener and closes every connection.
pub struct Server {
    shared: Arc<Shared>,
    socket_path: Option<PathBuf>,
    listener: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("socket_path", &self.socket_path)
            .finish()
    }
}

impl Server {
    /// A server with default [`Config`] listening on the unix socket `path`.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Server> {
        Server::bind_with_config(path, Config::default())
    }

    /// A server listening on the unix socket `path` (a stale socket file there is replaced).
    pub fn bind_with_config(path: impl AsRef<Path>, cfg: Config) -> io::Result<Server> {
        let path = path.as_ref().to_path_buf();
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let is_socket =
                    std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
                if !is_socket || UnixStream::connect(&path).is_ok() {
                    return Err(e);
                }
                std::fs::remove_file(&path)?;
                UnixListener::bind(&path)?
            }
            Err(e) => return Err(e),
        };
        let mut server = Server::in_memory(cfg);
        let shared = server.shared.clone();
        let handle = thread::Builder::new()
            .name("xenstored-listen".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if shared.shutdown.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = spawn_connection(&shared, stream, 0) {
                                tracing::warn!(err = %e, "xenstored: connection refused");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(err = %e, "xenstored: accept failed");
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        server.socket_path = Some(path);
        server.listener = Some(handle);
        tracing::debug!(path = %server.socket_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "xenstored: listening");
        Ok(server)
    }

    /// A server without a socket: connections come only from [`Server::connect_as`].
    pub fn in_memory(cfg: Config) -> Server {
        Server {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(State::new()),
                shutdown: AtomicBool::new(false),
            }),
            socket_path: None,
            listener: None,
        }
    }

    /// The socket path, if the server listens on one.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// A new connection that acts as domain `domid` (like a guest's xenbus ring): relative
    /// paths resolve under `/local/domain/<domid>`, permissions and quotas apply unless
    /// `domid` is 0. Returns the client end.
    pub fn connect_as(&self, domid: DomId) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        spawn_connection(&self.shared, ours, domid)?;
        Ok(theirs)
    }

    /// A [`Client`] on a new connection acting as domain `domid`.
    pub fn client_as(&self, domid: DomId) -> Result<Client, ClientError> {
        Client::from_stream(self.connect_as(domid)?)
    }

    /// Marks a domain introduced and fires `@introduceDomain` (what `XS_INTRODUCE` does).
    pub fn introduce_domain(&self, domid: DomId) -> Result<(), Errno> {
        lock(&self.shared.state).introduce(domid)
    }

    /// Releases a domain: closes its connections and fires `@releaseDomain` (`XS_RELEASE`).
    pub fn release_domain(&self, domid: DomId) -> Result<(), Errno> {
        lock(&self.shared.state).release(domid)
    }

    /// Number of nodes owned by `domid` (what its node quota counts).
    pub fn nodes_owned_by(&self, domid: DomId) -> usize {
        lock(&self.shared.state).tree.owned_by(domid)
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.state).conns.len()
    }

    /// Number of watches set on all connections.
    pub fn watch_count(&self) -> usize {
        lock(&self.shared.state)
            .conns
            .values()
            .map(|c| c.watches.len())
            .sum()
    }

    /// Reads a node directly (as dom0), bypassing the protocol.
    pub fn read_node(&self, path: &str) -> Option<Vec<u8>> {
        lock(&self.shared.state)
            .tree
            .get(path)
            .map(|n| n.value.clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        if let Some(path) = &self.socket_path {
            // Wake the listener out of accept().
            let _ = UnixStream::connect(path);
        }
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        let mut st = lock(&self.shared.state);
        for c in st.conns.values_mut() {
            c.close();
        }
        st.conns.clear();
        drop(st);
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_part_chunks() {
        let names: Vec<String> = (0..1000).map(|i| format!("child{i:04}")).collect();
        let refs: Vec<&String> = names.iter().collect();
        let mut got = Vec::new();
        let mut off = 0;
        loop {
            let part = directory_part(42, &refs, off);
            assert!(part.len() <= XENSTORE_PAYLOAD_MAX);
            let rest = part.strip_prefix(b"42\0".as_slice()).unwrap();
            let done = rest == [0] || rest.ends_with(&[0, 0]);
            let chunk = if done { &rest[..rest.len() - 1] } else { rest };
            got.extend(
                chunk
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8(s.to_vec()).unwrap()),
            );
            off += chunk.len();
            if done {
                break;
            }
        }
        assert_eq!(got, names);
        assert_eq!(directory_part(1, &refs, 1 << 30), b"1\0\0");
    }

    #[test]
    fn parents() {
        assert_eq!(parent_of("/a"), Some("/"));
        assert_eq!(parent_of("/a/b"), Some("/a"));
        assert_eq!(parent_of("/"), None);
    }
}
