//! One device: the backend side of the xenbus handshake (xen/io/xenbus.h states, the
//! negotiation of xen/io/blkif.h "Feature and Parameter Negotiation"), in the manner of Linux
//! blkback's `xenbus.c` (`frontend_changed`, `connect_ring`, `connect`) and mirage-block-xen.
//!
//! A control thread owns the device. It publishes the features and device properties, goes
//! `InitWait`, and then sleeps on xenstore watches (the frontend's `state`, the backend's
//! `online`, `@releaseDomain`) and on commands from the [`Device`] handle: a frontend that
//! never connects costs no CPU. When the frontend is `Initialised` or `Connected` it reads the
//! frontend's nodes ([`FrontendConnect::parse`]), maps each queue's ring, binds its event
//! channel and starts one reactor thread per queue (the private `reactor` module), then goes
//! `Connected`. A frontend going `Closing`/`Closed`, `online` set to 0, the frontend's
//! nodes vanishing (domain death) or a protocol error stops the reactors (each waits for its
//! I/O in flight), which unmaps everything, and closes the device; a frontend coming back to
//! `Initialising` after `Closed` (guest reboot, kexec) gets `InitWait` again.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xdisk_blkif::wire::ParseLimits;
use xdisk_blkif::xenbus::{
    keys, parse_u32, BackendFeatures, DeviceProperties, DiscardParams, FrontendConnect, Mode,
    VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE,
};
use xdisk_blkif::{BackRing, XenbusState};
use xdisk_image::queue::ImageQueue;
use xdisk_image::Image;
use xdisk_xen::platform::{DomId, EventChannels, GrantMapper};
use xdisk_xen::xenstore::wire::RELEASE_DOMAIN;
use xdisk_xen::xenstore::{Client, Errno, WatchCallback, WatchEvent};

use crate::config::{DataPath, DeviceConfig, MAX_POLL_US};
use crate::datapath::{CopyPath, MapPath, PersistentCache};
use crate::error::{Error, Result};
use crate::live::{QuiesceFn, Switch};
use crate::reactor::{Exit, Features, QueueAck, QueueCmd, QueueControl, QueueParts, Reactor, Stop};
use crate::region::map_counted;
use crate::stats::{add, Counters, DeviceStats};

/// How often an idle device checks that its xenstore connection is alive.
const LIVENESS_CHECK: Duration = Duration::from_secs(5);

/// State evaluations (two xenstore reads each, on the connection every device shares) allowed
/// in a burst, and per second after it: a frontend rewriting its `state` in a loop gets at
/// most this many (a connection takes about four).
const EVAL_BURST: f64 = 64.0;
const EVAL_PER_SEC: f64 = 100.0;

/// What woke the control thread. Watch events and wake-ups are coalesced into these bits
/// (the latest state wins: the control thread reads the nodes anew), so whatever a peer does
/// the queue holds at most one entry of each kind.
mod ev {
    pub const FRONTEND: u8 = 1;
    pub const ONLINE: u8 = 2;
    pub const RELEASE: u8 = 4;
    pub const COMMAND: u8 = 8;
    pub const QUEUE: u8 = 16;
}

/// The control thread's wake-ups: a set of pending bits and a condition variable.
struct Events {
    pending: Mutex<u8>,
    cv: Condvar,
    counters: Arc<Counters>,
}

impl Events {
    fn raise(&self, bits: u8) {
        let mut p = lock(&self.pending);
        *p |= bits;
        let n = u64::from(p.count_ones());
        drop(p);
        self.counters
            .events_pending_max
            .fetch_max(n, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Waits until one of `mask` is pending (or `timeout`), takes and returns those bits.
    fn wait(&self, mask: u8, timeout: Duration) -> u8 {
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.pending);
        while *p & mask == 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p = self
                .cv
                .wait_timeout(p, deadline - now)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        let got = *p & mask;
        *p &= !mask;
        got
    }

    /// A watch callback raising `bits`.
    fn callback(self: &Arc<Self>, bits: u8) -> WatchCallback {
        let me = self.clone();
        Arc::new(move |_ev: WatchEvent| {
            add(&me.counters.events, 1);
            me.raise(bits);
        })
    }
}

/// A token bucket: `burst` actions at once, then `per_sec` a second.
struct TokenBucket {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: f64, per_sec: f64) -> TokenBucket {
        TokenBucket {
            burst: burst.max(1.0),
            per_sec: per_sec.max(0.001),
            tokens: burst.max(1.0),
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> std::result::Result<(), Duration> {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Commands from the handle to the control thread.
enum Command {
    Resize(Sender<Result<u64>>),
    Quiesce(QuiesceFn, Sender<Result<()>>),
    Shutdown,
}

/// State shared by the handle, the control thread and the reactors.
struct Shared {
    counters: Arc<Counters>,
    sectors: Arc<AtomicU64>,
    state: AtomicU32,
    finished: AtomicBool,
    commands: Mutex<VecDeque<Command>>,
    /// Wakes the control thread.
    events: Arc<Events>,
    /// The image served (the top of the chain); replaced by a live snapshot.
    image: Mutex<Arc<Image>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watch tokens of one device (unique per device on a shared xenstore connection).
#[derive(Clone)]
struct Tokens {
    frontend: String,
    online: String,
    release: String,
}

impl Tokens {
    fn new(be: &str) -> Tokens {
        let t = |what: &str| format!("xdisk-backend:{what}:{be}");
        Tokens {
            frontend: t("frontend-state"),
            online: t("online"),
            release: t("release-domain"),
        }
    }
}

/// A running backend device. Dropping the handle shuts the device down.
pub struct Device {
    shared: Arc<Shared>,
    backend_dir: String,
    thread: Option<JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("backend_dir", &self.backend_dir)
            .field("state", &self.state())
            .finish()
    }
}

impl Device {
    /// Starts the backend of one device: publishes its features and properties in
    /// `cfg.backend_dir`, switches to `InitWait` and leaves a control thread to follow the
    /// frontend. Errors in the toolstack's nodes or in xenstore are returned here; everything
    /// the frontend does later is handled by the device itself.
    pub fn start(
        cfg: DeviceConfig,
        xs: impl Into<Arc<Client>>,
        gnt: Arc<dyn GrantMapper>,
        evt: Arc<dyn EventChannels>,
        image: Arc<Image>,
    ) -> Result<Device> {
        let xs = xs.into();
        let be = cfg.backend_dir.trim_end_matches('/').to_owned();
        let counters = Arc::new(Counters::default());
        counters
            .max_mappings
            .store(cfg.max_mapped_grants, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            counters: counters.clone(),
            sectors: Arc::new(AtomicU64::new(image.size() / 512)),
            state: AtomicU32::new(XenbusState::Initialising.to_u32()),
            finished: AtomicBool::new(false),
            commands: Mutex::new(VecDeque::new()),
            events: Arc::new(Events {
                pending: Mutex::new(0),
                cv: Condvar::new(),
                counters,
            }),
            image: Mutex::new(image.clone()),
        });
        let mut ctl = Control::new(
            cfg,
            be.clone(),
            xs.clone(),
            gnt,
            evt,
            image.clone(),
            shared.clone(),
        )?;
        ctl.start()?;
        let (shared2, be2) = (shared.clone(), be.clone());
        let thread = std::thread::Builder::new()
            .name("xdisk-blkback".into())
            .spawn(move || {
                // A panic must not leave the device Connected with nobody following the
                // frontend: the Control's drop stops its queues and marks it finished; the
                // error is reported as any fatal one (xenbus_dev_fatal).
                catch_unwind(AssertUnwindSafe(move || ctl.run())).unwrap_or_else(|p| {
                    let msg = panic_message(&*p);
                    tracing::error!(be = %be2, "device control thread panicked: {msg}");
                    let _ = xs.write(&format!("{be2}/error"), format!("internal error: {msg}"));
                    let _ = xs.write(
                        &format!("{be2}/{}", keys::STATE),
                        XenbusState::Closed.to_string(),
                    );
                    shared2
                        .state
                        .store(XenbusState::Closed.to_u32(), Ordering::SeqCst);
                    shared2.finished.store(true, Ordering::SeqCst);
                    Err(Error::Panicked(msg))
                })
            })
            .map_err(|e| Error::io("cannot start the device thread", e))?;
        Ok(Device {
            shared,
            backend_dir: be,
            thread: Some(thread),
        })
    }

    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        &self.backend_dir
    }

    /// The device's counters.
    pub fn stats(&self) -> DeviceStats {
        let mut s = self.shared.counters.snapshot();
        s.image_broken = u64::from(self.image().storage().is_broken());
        s
    }

    /// The image served now (the top of its chain: a live snapshot replaces it).
    pub fn image(&self) -> Arc<Image> {
        lock(&self.shared.image).clone()
    }

    /// Pauses every queue of the device (each stops consuming its ring and completes and
    /// answers everything it consumed), runs `f` on the current image with nothing in
    /// flight, switches to the image `f` may return (see [`crate::live`]) and resumes the
    /// queues. A device without a connected frontend just runs `f`. Runs on the device's
    /// control thread, which meanwhile follows no xenstore change. Fails, with nothing
    /// changed, if the queues do not pause within `quiesce_timeout` or if `f` fails.
    pub fn quiesce(&self, f: QuiesceFn) -> Result<()> {
        self.handle().quiesce(f)
    }

    /// A handle for live operations that does not own the device (it fails with
    /// [`Error::Stopped`] once the device has finished).
    pub fn handle(&self) -> DeviceHandle {
        DeviceHandle {
            shared: self.shared.clone(),
        }
    }

    /// The backend's xenbus state, as last written.
    pub fn state(&self) -> XenbusState {
        XenbusState::from_u32(self.shared.state.load(Ordering::SeqCst))
            .unwrap_or(XenbusState::Unknown)
    }

    /// The disk size in 512-byte sectors, as published.
    pub fn sectors(&self) -> u64 {
        self.shared.sectors.load(Ordering::SeqCst)
    }

    /// True once the device has finished (frontend gone, unplugged, or shut down).
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    fn command(&self, cmd: Command) -> Result<()> {
        if self.is_finished() {
            return Err(Error::Stopped);
        }
        lock(&self.shared.commands).push_back(cmd);
        self.shared.events.raise(ev::COMMAND);
        Ok(())
    }

    /// Online resize: after the image was resized, publishes the new `sectors` and re-writes
    /// `state` in the same transaction so that a connected frontend notices (as Linux
    /// blkback's `xen_vbd_resize`). Returns the new size in sectors.
    pub fn resize(&self) -> Result<u64> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Resize(tx))?;
        rx.recv().map_err(|_| Error::Stopped)?
    }

    /// Disconnects the frontend (if connected), switches to `Closed` and stops the device.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.command(Command::Shutdown);
        self.join()
    }

    /// Waits until the device finishes by itself (frontend gone, or closed with `online` 0).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(Error::Stopped)),
            None => Ok(()),
        }
    }
}

/// A handle on a running [`Device`] for live operations (see [`Device::handle`]).
#[derive(Clone)]
pub struct DeviceHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle").finish_non_exhaustive()
    }
}

impl DeviceHandle {
    /// See [`Device::quiesce`].
    pub fn quiesce(&self, f: QuiesceFn) -> Result<()> {
        if self.shared.finished.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.commands).push_back(Command::Quiesce(f, tx));
        self.shared.events.raise(ev::COMMAND);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Stopped),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.shared.finished.load(Ordering::SeqCst) {
                        // The control thread answers what it took before it finished.
                        return rx
                            .recv_timeout(Duration::from_secs(1))
                            .unwrap_or(Err(Error::Stopped));
                    }
                }
            }
        }
    }

    /// See [`Device::image`].
    pub fn image(&self) -> Arc<Image> {
        lock(&self.shared.image).clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.command(Command::Shutdown);
            let _ = self.join();
        }
    }
}

/// The text of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// How a queue thread ended.
enum QueueEnd {
    Exit(Exit),
    Panicked(String),
}

/// A running queue.
struct RunningQueue {
    qid: u32,
    stop: Arc<Stop>,
    /// Commands to the queue (see [`QueueCmd`]); answered on the control's `acks`.
    commands: Sender<(u64, QueueCmd)>,
    /// Set by the thread when its reactor returns (before it wakes the control thread).
    exit: Arc<Mutex<Option<QueueEnd>>>,
    thread: JoinHandle<()>,
}

/// The control thread's state.
struct Control {
    cfg: DeviceConfig,
    be: String,
    fe: String,
    fe_domid: DomId,
    xs: Arc<Client>,
    gnt: Arc<dyn GrantMapper>,
    evt: Arc<dyn EventChannels>,
    image: Arc<Image>,
    shared: Arc<Shared>,
    tokens: Tokens,
    mode: Mode,
    features: BackendFeatures,
    queues: Vec<RunningQueue>,
    /// Queues that were asked to stop and did not within the teardown bound (their I/O in
    /// flight keeps them, and the guest pages it uses, alive); joined once they end.
    lingering: Vec<RunningQueue>,
    /// Rate limits (XSA-349 class): connections, and state evaluations.
    connect_bucket: TokenBucket,
    eval_bucket: TokenBucket,
    /// A held-back evaluation is due at this time.
    deferred: Option<Instant>,
    /// Whether the connect rate limit was logged since the last connection.
    throttle_logged: bool,
    state: XenbusState,
    /// Whether xenstore said the frontend domain was introduced (then a later "not
    /// introduced" means it died).
    fe_introduced: bool,
    watching: bool,
    /// Acknowledgements of the queues' commands: (queue, operation, answer).
    acks_tx: Sender<(u32, u64, QueueAck)>,
    acks: mpsc::Receiver<(u32, u64, QueueAck)>,
    /// The number of the last quiesce operation.
    op: u64,
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: DeviceConfig,
        be: String,
        xs: Arc<Client>,
        gnt: Arc<dyn GrantMapper>,
        evt: Arc<dyn EventChannels>,
        image: Arc<Image>,
        shared: Arc<Shared>,
    ) -> Result<Control> {
        let read = |key: &str| -> Result<Option<String>> {
            let path = format!("{be}/{key}");
            match xs.read_string(&path) {
                Ok(v) => Ok(Some(v)),
                Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
                Err(e) => Err(Error::xs(&path, e)),
            }
        };
        let node_err = |node: &str, reason: String| Error::Node {
            node: format!("{be}/{node}"),
            reason,
        };
        let fe = match &cfg.frontend_dir {
            Some(f) => f.clone(),
            None => read("frontend")?.ok_or_else(|| node_err("frontend", "missing".into()))?,
        };
        let fe = fe.trim_end_matches('/').to_owned();
        let fe_domid = match cfg.frontend_domid {
            Some(d) => d,
            None => {
                let v = read("frontend-id")?
                    .ok_or_else(|| node_err("frontend-id", "missing".into()))?;
                parse_u32(&v)
                    .ok()
                    .and_then(|d| DomId::try_from(d).ok())
                    .ok_or_else(|| node_err("frontend-id", format!("invalid value {v:?}")))?
            }
        };
        let mode = match cfg.mode {
            Some(m) => m,
            None => match read(keys::MODE)? {
                Some(v) => v
                    .parse()
                    .map_err(|e| node_err(keys::MODE, format!("{e}")))?,
                None => Mode::ReadWrite,
            },
        };
        let mode = if image.read_only() {
            Mode::ReadOnly
        } else {
            mode
        };
        let discard_enable = read(keys::DISCARD_ENABLE)?.is_none_or(|v| v != "0");
        let writable = mode == Mode::ReadWrite;
        let discard = (cfg.discard && discard_enable && writable).then(|| DiscardParams {
            granularity: image.discard_granularity(),
            alignment: 0,
            secure: cfg.discard_secure,
        });
        let features = BackendFeatures {
            flush_cache: cfg.flush,
            barrier: cfg.barrier,
            discard,
            max_indirect_segments: cfg.max_indirect_segments,
            persistent: cfg.persistent && cfg.data_path == DataPath::Map,
            max_ring_page_order: cfg.max_ring_page_order,
            max_queues: cfg.max_queues.max(1),
        };
        let tokens = Tokens::new(&be);
        let (acks_tx, acks) = mpsc::channel();
        let connect_bucket = TokenBucket::new(
            f64::from(cfg.connect_burst),
            1.0 / cfg.connect_interval.as_secs_f64().max(0.001),
        );
        Ok(Control {
            cfg,
            be,
            fe,
            fe_domid,
            xs,
            gnt,
            evt,
            image,
            shared,
            tokens,
            mode,
            features,
            queues: Vec::new(),
            lingering: Vec::new(),
            connect_bucket,
            eval_bucket: TokenBucket::new(EVAL_BURST, EVAL_PER_SEC),
            deferred: None,
            throttle_logged: false,
            state: XenbusState::Initialising,
            fe_introduced: false,
            watching: false,
            acks_tx,
            acks,
            op: 0,
        })
    }

    fn path(&self, key: &str) -> String {
        format!("{}/{key}", self.be)
    }

    fn device_properties(&self) -> DeviceProperties {
        let sectors = self.shared.sectors.load(Ordering::SeqCst);
        let pss = self.cfg.physical_sector_size;
        // blkif.h: "sectors" * "sector-size" must be a multiple of "physical-sector-size".
        let physical_sector_size = if pss >= 512
            && pss.is_power_of_two()
            && (sectors * 512).is_multiple_of(u64::from(pss))
        {
            pss
        } else {
            512
        };
        let mut info = 0;
        if self.mode == Mode::ReadOnly {
            info |= VDISK_READONLY;
        }
        if self.cfg.removable {
            info |= VDISK_REMOVABLE;
        }
        // Linux blkback reads "device-type" from the frontend's directory.
        if self
            .xs
            .read_string(&format!("{}/{}", self.fe, keys::DEVICE_TYPE))
            .is_ok_and(|t| t == "cdrom")
        {
            info |= VDISK_CDROM | VDISK_REMOVABLE;
        }
        DeviceProperties {
            sectors,
            sector_size: 512,
            physical_sector_size,
            info,
        }
    }

    /// Publishes features and properties, goes InitWait, sets the watches.
    fn start(&mut self) -> Result<()> {
        let mut nodes = self.features.nodes();
        nodes.extend(self.device_properties().nodes());
        let be = self.be.clone();
        self.xs
            .transaction(|tx| {
                for (k, v) in &nodes {
                    tx.write(&format!("{be}/{k}"), v)?;
                }
                tx.write(
                    &format!("{be}/{}", keys::STATE),
                    XenbusState::InitWait.to_string(),
                )
            })
            .map_err(|e| Error::xs(&be, e))?;
        self.set_state_local(XenbusState::InitWait);
        self.fe_introduced = self.xs.is_domain_introduced(self.fe_domid).unwrap_or(false);
        let t = self.tokens.clone();
        let fe_state = format!("{}/{}", self.fe, keys::STATE);
        let watches = [
            (fe_state, &t.frontend, ev::FRONTEND),
            (self.path(keys::ONLINE), &t.online, ev::ONLINE),
            (RELEASE_DOMAIN.to_owned(), &t.release, ev::RELEASE),
        ];
        for (path, token, bit) in watches {
            let cb = self.shared.events.callback(bit);
            if let Err(e) = self.xs.watch_with_callback(&path, token, cb) {
                self.unwatch();
                return Err(Error::xs(&path, e));
            }
        }
        self.watching = true;
        Ok(())
    }

    fn unwatch(&mut self) {
        let t = self.tokens.clone();
        let _ = self
            .xs
            .unwatch(&format!("{}/{}", self.fe, keys::STATE), &t.frontend);
        let _ = self.xs.unwatch(&self.path(keys::ONLINE), &t.online);
        let _ = self.xs.unwatch(RELEASE_DOMAIN, &t.release);
        self.watching = false;
    }

    fn set_state_local(&mut self, s: XenbusState) {
        self.state = s;
        self.shared.state.store(s.to_u32(), Ordering::SeqCst);
    }

    fn set_state(&mut self, s: XenbusState) {
        tracing::debug!(be = %self.be, from = self.state.name(), to = s.name(), "backend state");
        if let Err(e) = self.xs.write(&self.path(keys::STATE), s.to_string()) {
            tracing::warn!(be = %self.be, "cannot write state {}: {e}", s.name());
        }
        self.set_state_local(s);
    }

    fn run(mut self) -> Result<()> {
        self.evaluate_limited();
        let mut done = self.shared.finished.load(Ordering::SeqCst);
        while !done {
            // The timeout only notices a lost xenstore connection (whose watches would never
            // fire again), or runs an evaluation held back by the rate limit.
            let timeout = match self.deferred {
                Some(at) => at
                    .saturating_duration_since(Instant::now())
                    .min(LIVENESS_CHECK),
                None => LIVENESS_CHECK,
            };
            let bits = self.shared.events.wait(u8::MAX, timeout);
            if bits & ev::COMMAND != 0 {
                let cmds: Vec<Command> = lock(&self.shared.commands).drain(..).collect();
                for c in cmds {
                    match c {
                        Command::Resize(reply) => {
                            let _ = reply.send(self.resize());
                        }
                        Command::Quiesce(f, reply) => {
                            let _ = reply.send(self.quiesce(f));
                        }
                        Command::Shutdown => {
                            self.disconnect();
                            self.close();
                            done = true;
                        }
                    }
                }
                if done {
                    break;
                }
            }
            if bits & ev::QUEUE != 0 {
                self.reap_queues();
            }
            if bits & ev::RELEASE != 0 && self.domain_dead() {
                tracing::info!(be = %self.be, domid = self.fe_domid, "frontend domain died");
                self.disconnect();
                self.settle_image();
                self.set_state(XenbusState::Closed);
                break;
            }
            let due = self.deferred.is_some_and(|at| Instant::now() >= at);
            if bits & (ev::FRONTEND | ev::ONLINE | ev::RELEASE) != 0 || due {
                done = self.evaluate_limited();
            } else if bits == 0 && !self.xs.is_connected() {
                tracing::error!(be = %self.be, "xenstore connection lost");
                break;
            }
        }
        self.disconnect();
        if self.watching {
            self.unwatch();
        }
        self.shared.finished.store(true, Ordering::SeqCst);
        // Refuse further commands whose replies would never come.
        for c in lock(&self.shared.commands).drain(..) {
            match c {
                Command::Resize(reply) => {
                    let _ = reply.send(Err(Error::Stopped));
                }
                Command::Quiesce(_, reply) => {
                    let _ = reply.send(Err(Error::Stopped));
                }
                Command::Shutdown => {}
            }
        }
        // The device is Closed in xenstore; the queues that outlived the teardown bound
        // still hold guest pages for their I/O in flight: wait for them before the image
        // is released.
        for q in self.lingering.drain(..) {
            let _ = q.thread.join();
        }
        Ok(())
    }

    /// [`Control::evaluate`], at most [`EVAL_PER_SEC`] a second after a burst: the rest are
    /// coalesced into one evaluation when the next token is there.
    fn evaluate_limited(&mut self) -> bool {
        match self.eval_bucket.take() {
            Ok(()) => {
                self.deferred = None;
                self.evaluate()
            }
            Err(wait) => {
                if self.deferred.is_none() {
                    add(&self.shared.counters.throttled, 1);
                }
                self.deferred = Some(Instant::now() + wait);
                false
            }
        }
    }

    /// Holds an evaluation back for `wait`.
    fn defer(&mut self, wait: Duration) {
        let at = Instant::now() + wait;
        self.deferred = Some(self.deferred.map_or(at, |d| d.min(at)));
    }

    fn domain_dead(&mut self) -> bool {
        match self.xs.is_domain_introduced(self.fe_domid) {
            Ok(true) => {
                self.fe_introduced = true;
                false
            }
            Ok(false) => self.fe_introduced,
            Err(_) => false,
        }
    }

    /// Closes the device from our side: Closing, then Closed.
    fn close(&mut self) {
        if self.state != XenbusState::Closed {
            if self.state != XenbusState::Closing {
                self.set_state(XenbusState::Closing);
            }
            self.settle_image();
            self.set_state(XenbusState::Closed);
        }
    }

    /// Writes back what the image format keeps in memory (qcow2's L2 tables and refcounts,
    /// in their crash-safe order) before the device says Closed: libxl and `xdisk detach`
    /// return on Closed, and whoever opens the file next (qemu-img, a backup, the next
    /// attach) must find what the guest saw, not metadata still waiting in this process.
    /// Not a flush (that is the guest's to ask): a raw file needs nothing, and a qcow2 image
    /// whose metadata is all written costs no sync, so a detach stays quick on a busy disk.
    fn settle_image(&self) {
        if let Err(e) = self.image.write_back_metadata() {
            tracing::warn!(be = %self.be, "writing the image's metadata back before Closed: {e}");
        }
    }

    /// Reacts to the current frontend state and `online`, as Linux blkback's
    /// `frontend_changed` (xen/io/xenbus.h: `Initialised` is "waiting for a connection from
    /// the peer", `Closing` "the device is being closed due to an error or an unplug
    /// event"). Returns true when the device is finished.
    fn evaluate(&mut self) -> bool {
        let fe_path = format!("{}/{}", self.fe, keys::STATE);
        let fe_state = match self.xs.read_string(&fe_path) {
            Ok(v) => v.parse::<XenbusState>().ok(),
            Err(e) if e.errno() == Some(Errno::ENOENT) => {
                tracing::info!(be = %self.be, "frontend {} vanished", self.fe);
                self.disconnect();
                self.settle_image();
                self.set_state(XenbusState::Closed);
                return true;
            }
            Err(e) => {
                tracing::warn!(be = %self.be, "cannot read {fe_path}: {e}");
                return !self.xs.is_connected();
            }
        };
        let online = !matches!(
            self.xs.read_string(&self.path(keys::ONLINE)).as_deref(),
            Ok("0")
        );
        if !online {
            // Unplug requested (libxl writes online=0, then waits for Closed).
            self.disconnect();
            if matches!(
                fe_state,
                Some(XenbusState::Connected | XenbusState::Initialised | XenbusState::Closing)
            ) {
                if !matches!(self.state, XenbusState::Closing | XenbusState::Closed) {
                    self.set_state(XenbusState::Closing);
                }
                return false;
            }
            self.close();
            return true;
        }
        let Some(fe_state) = fe_state else {
            // Garbage in the frontend's state node: ignored, as an unknown transition.
            return false;
        };
        match fe_state {
            XenbusState::Initialising => {
                // Watch events are coalesced (latest state wins): a frontend that went
                // Closing -> Closed -> Initialising quickly may be seen at Initialising while
                // we are still Closing. Its Closed is implied: finish closing first.
                if self.state == XenbusState::Closing {
                    self.disconnect();
                    self.close();
                }
                if self.state == XenbusState::Closed {
                    tracing::info!(be = %self.be, "frontend reconnecting");
                    self.set_state(XenbusState::InitWait);
                }
            }
            XenbusState::Initialised | XenbusState::Connected => {
                if self.state == XenbusState::InitWait {
                    if !self.may_connect() {
                        return false;
                    }
                    if let Err(e) = self.connect() {
                        tracing::warn!(be = %self.be, "cannot connect: {e}");
                        self.fail(&e.to_string());
                    }
                }
            }
            XenbusState::Closing => {
                self.disconnect();
                if !matches!(self.state, XenbusState::Closing | XenbusState::Closed) {
                    self.set_state(XenbusState::Closing);
                }
            }
            XenbusState::Closed => {
                self.disconnect();
                self.close();
            }
            XenbusState::Unknown => {
                // Linux blkback unregisters the device.
                self.disconnect();
                self.close();
                return true;
            }
            XenbusState::InitWait | XenbusState::Reconfiguring | XenbusState::Reconfigured => {}
        }
        false
    }

    /// Whether a connection may start now: not while queues of the last one still finish
    /// their I/O (threads stay bounded), and not more than `connect_burst` in a row, then one
    /// per `connect_interval` (a frontend cycling Closed -> Initialising -> Initialised costs
    /// a full connect and disconnect each time). Otherwise the evaluation is held back.
    fn may_connect(&mut self) -> bool {
        self.reap_lingering();
        if !self.lingering.is_empty() {
            self.defer(Duration::from_millis(50));
            return false;
        }
        match self.connect_bucket.take() {
            Ok(()) => {
                self.throttle_logged = false;
                true
            }
            Err(wait) => {
                add(&self.shared.counters.throttled, 1);
                if !self.throttle_logged {
                    self.throttle_logged = true;
                    tracing::warn!(
                        be = %self.be,
                        "frontend reconnects too often: connections held back ({} at once, \
                         then one per {:?})",
                        self.cfg.connect_burst,
                        self.cfg.connect_interval
                    );
                }
                self.defer(wait);
                false
            }
        }
    }

    /// Joins the lingering queues that have ended.
    fn reap_lingering(&mut self) {
        let mut i = 0;
        while i < self.lingering.len() {
            if self.lingering[i].thread.is_finished() {
                let q = self.lingering.swap_remove(i);
                let _ = q.thread.join();
            } else {
                i += 1;
            }
        }
    }

    /// Disconnects after an error: writes `error`, goes Closing then Closed (xenbus_dev_fatal).
    fn fail(&mut self, msg: &str) {
        self.disconnect();
        if let Err(e) = self.xs.write(&self.path("error"), msg) {
            tracing::debug!(be = %self.be, "cannot write error node: {e}");
        }
        self.close();
    }

    /// Joins finished reactors; a protocol error or stuck I/O fails the device.
    fn reap_queues(&mut self) {
        self.reap_lingering();
        let mut error = None;
        let mut panic = None;
        let mut stuck = None;
        let mut i = 0;
        while i < self.queues.len() {
            let exit = lock(&self.queues[i].exit).take();
            match exit {
                Some(exit) => {
                    let q = self.queues.swap_remove(i);
                    let _ = q.thread.join();
                    match exit {
                        QueueEnd::Exit(Exit::ProtocolError(e)) => error = Some(e),
                        QueueEnd::Exit(Exit::IoStuck(e)) => {
                            stuck = Some(stuck_io(&self.shared.counters, &self.be, &e))
                        }
                        QueueEnd::Exit(Exit::Stopped) => {}
                        QueueEnd::Panicked(m) => panic = Some(m),
                    }
                }
                None => i += 1,
            }
        }
        if let Some(m) = panic {
            tracing::error!(be = %self.be, "a queue thread panicked: {m}");
            self.fail(&format!("internal error: a queue panicked: {m}"));
            return;
        }
        if let Some(e) = &error {
            tracing::warn!(be = %self.be, "frontend protocol error: {e}");
            add(&self.shared.counters.protocol_errors, 1);
        }
        // Stuck I/O is the graver news for the operator: it names the error node.
        match (stuck, error) {
            (Some(msg), _) => self.fail(&msg),
            (None, Some(e)) => self.fail(&format!("protocol error: {e}")),
            (None, None) => {}
        }
    }

    /// Stops every queue (each waits for its I/O in flight, then unmaps everything). Bounded
    /// by `teardown_timeout`: a queue whose I/O is still in flight then (a flush of a loaded
    /// disk in writeback mode can take long) is left to finish in the background, keeping
    /// what its I/O uses mapped, and the device moves on (Linux blkback's
    /// `xen_blkif_disconnect` also lets the state go on while I/O is in flight).
    fn disconnect(&mut self) {
        if self.queues.is_empty() {
            return;
        }
        for q in &self.queues {
            q.stop.request();
        }
        let mut stuck = None;
        let deadline = Instant::now() + self.cfg.teardown_timeout;
        loop {
            let mut i = 0;
            while i < self.queues.len() {
                if self.queues[i].thread.is_finished() {
                    let q = self.queues.swap_remove(i);
                    let _ = q.thread.join();
                    let end = lock(&q.exit).take();
                    if let Some(QueueEnd::Exit(Exit::IoStuck(e))) = end {
                        stuck = Some(stuck_io(&self.shared.counters, &self.be, &e));
                    }
                } else {
                    i += 1;
                }
            }
            if self.queues.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    be = %self.be,
                    queues = self.queues.len(),
                    "I/O still in flight {:?} after the disconnection: the queues finish it in \
                     the background",
                    self.cfg.teardown_timeout
                );
                add(
                    &self.shared.counters.lingering_queues,
                    self.queues.len() as u64,
                );
                self.lingering.append(&mut self.queues);
                break;
            }
            // Queue threads raise QUEUE as they end; other wake-ups stay pending.
            let _ = self
                .shared
                .events
                .wait(ev::QUEUE, (deadline - now).min(Duration::from_millis(50)));
        }
        if let Some(msg) = stuck {
            // Loudly: the device cannot be trusted any more (see `stuck_io`).
            if let Err(e) = self.xs.write(&self.path("error"), &msg) {
                tracing::debug!(be = %self.be, "cannot write error node: {e}");
            }
        }
    }

    fn connect(&mut self) -> Result<()> {
        self.disconnect();
        let fe = self.fe.clone();
        let xs = self.xs.clone();
        // FrontendConnect::parse takes `None` as "absent, use the default": only ENOENT is
        // that; any other read error fails the connection.
        let read_error = RefCell::new(None);
        let conn = FrontendConnect::parse(
            |k| {
                let path = format!("{fe}/{k}");
                match xs.read_string(&path) {
                    Ok(v) => Some(v),
                    Err(e) if e.errno() == Some(Errno::ENOENT) => None,
                    Err(e) => {
                        read_error.borrow_mut().get_or_insert(Error::xs(&path, e));
                        None
                    }
                }
            },
            &self.features.limits(),
        );
        if let Some(e) = read_error.into_inner() {
            return Err(e);
        }
        let conn = conn?;
        let features = Features {
            flush: self.features.flush_cache,
            barrier: self.features.barrier,
            discard: self.features.discard.is_some(),
            discard_secure: self.features.discard.is_some_and(|d| d.secure),
            read_only: self.mode == Mode::ReadOnly,
        };
        let persistent = conn.persistent && self.features.persistent;
        tracing::info!(
            be = %self.be,
            queues = conn.queues.len(),
            order = conn.ring_page_order,
            abi = ?conn.protocol,
            persistent,
            "connecting"
        );
        let limits = ParseLimits {
            max_indirect_segments: self.features.max_indirect_segments,
        };
        for (qid, q) in conn.queues.iter().enumerate() {
            match self.start_queue(qid as u32, q, &conn, limits, features, persistent) {
                Ok(rq) => self.queues.push(rq),
                Err(e) => {
                    self.disconnect();
                    return Err(e);
                }
            }
        }
        // As Linux blkback's connect(): device properties, then Connected. The local state
        // goes first: the frontend may act on the node as soon as it is written.
        let props = self.device_properties();
        self.set_state_local(XenbusState::Connected);
        let be = self.be.clone();
        let r = self.xs.transaction(|tx| {
            for (k, v) in props.nodes() {
                tx.write(&format!("{be}/{k}"), v)?;
            }
            tx.write(
                &format!("{be}/{}", keys::STATE),
                XenbusState::Connected.to_string(),
            )
        });
        if let Err(e) = r {
            self.set_state_local(XenbusState::InitWait);
            self.disconnect();
            return Err(Error::xs(&be, e));
        }
        add(&self.shared.counters.connects, 1);
        Ok(())
    }

    fn start_queue(
        &self,
        qid: u32,
        q: &xdisk_blkif::xenbus::QueueConnect,
        conn: &FrontendConnect,
        limits: ParseLimits,
        features: Features,
        persistent: bool,
    ) -> Result<RunningQueue> {
        let counters = &self.shared.counters;
        let region = map_counted(&*self.gnt, counters, self.fe_domid, &q.ring_refs, true)?;
        let ring = BackRing::new(region, conn.protocol, conn.ring_page_order, limits)?;
        let evtchn = self.evt.bind_interdomain(self.fe_domid, q.event_channel)?;
        let stop = Arc::new(Stop::new().map_err(|e| Error::io("eventfd", e))?);
        let (commands, commands_rx) = mpsc::channel();
        let parts = QueueParts {
            qid,
            domid: self.fe_domid,
            ring,
            evtchn,
            counters: counters.clone(),
            sectors: self.shared.sectors.clone(),
            features,
            stop: stop.clone(),
            control: QueueControl {
                commands: commands_rx,
                acks: self.acks_tx.clone(),
                queue_cfg: self.cfg.queue.clone(),
            },
            poll: Duration::from_micros(u64::from(self.cfg.poll_us.min(MAX_POLL_US))),
        };
        let events = self.shared.events.clone();
        let name = format!("xdisk-blkback-q{qid}");
        let exit = Arc::new(Mutex::new(None));
        let exit_slot = exit.clone();
        let spawn = |f: Box<dyn FnOnce() -> Exit + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    // A panicking reactor (its drop ran while unwinding) must not leave the
                    // device Connected with a dead queue: the control thread fails it.
                    let e = match catch_unwind(AssertUnwindSafe(f)) {
                        Ok(e) => QueueEnd::Exit(e),
                        Err(p) => QueueEnd::Panicked(panic_message(&*p)),
                    };
                    *lock(&exit_slot) = Some(e);
                    events.raise(ev::QUEUE);
                })
                .map_err(|e| Error::io("cannot start a queue thread", e))
        };
        let thread = match self.cfg.data_path {
            DataPath::Map => {
                let data = MapPath {
                    gnt: self.gnt.clone(),
                    domid: self.fe_domid,
                    counters: counters.clone(),
                    cache: persistent.then(|| {
                        PersistentCache::new(self.cfg.max_persistent_grants, counters.clone())
                    }),
                    spare: Vec::new(),
                };
                let iq = ImageQueue::new(self.image.clone(), &self.cfg.queue)?;
                let r = Reactor::new(parts, data, iq);
                spawn(Box::new(move || r.run()))?
            }
            DataPath::Copy => {
                let data = CopyPath {
                    gnt: self.gnt.clone(),
                    domid: self.fe_domid,
                };
                let iq = ImageQueue::new(self.image.clone(), &self.cfg.queue)?;
                let r = Reactor::new(parts, data, iq);
                spawn(Box::new(move || r.run()))?
            }
        };
        Ok(RunningQueue {
            qid,
            stop,
            commands,
            exit,
            thread,
        })
    }

    fn resize(&mut self) -> Result<u64> {
        let sectors = self.image.size() / 512;
        self.shared.sectors.store(sectors, Ordering::SeqCst);
        let be = self.be.clone();
        let state = self.state;
        // Linux blkback's xen_vbd_resize: "sectors", then the current state, in one
        // transaction, so that a connected frontend re-reads the size.
        self.xs
            .transaction(|tx| {
                tx.write(&format!("{be}/{}", keys::SECTORS), sectors.to_string())?;
                tx.write(&format!("{be}/{}", keys::STATE), state.to_string())
            })
            .map_err(|e| Error::xs(&be, e))?;
        Ok(sectors)
    }
}

impl Control {
    /// Sends `cmd` (made per queue) to every queue as operation `op`.
    fn tell_queues(&self, op: u64, cmd: impl Fn() -> QueueCmd) {
        for q in &self.queues {
            if q.commands.send((op, cmd())).is_ok() {
                q.stop.command();
            }
        }
    }

    /// Waits until every running queue answered operation `op` (a queue that ended counts
    /// as answered: nothing of it is in flight); returns the answers. Err on timeout.
    fn wait_acks(&mut self, op: u64, deadline: Instant, what: &str) -> Result<Vec<QueueAck>> {
        let mut got: Vec<(u32, QueueAck)> = Vec::new();
        loop {
            let missing = self
                .queues
                .iter()
                .filter(|q| !q.thread.is_finished() && !got.iter().any(|(id, _)| *id == q.qid))
                .count();
            if missing == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Live(format!(
                    "{missing} of {} queues did not {what} within {:?}",
                    self.queues.len(),
                    self.cfg.quiesce_timeout
                )));
            }
            match self
                .acks
                .recv_timeout((deadline - now).min(Duration::from_millis(50)))
            {
                Ok((qid, o, a)) if o == op => {
                    if !got.iter().any(|(q, _)| *q == qid) {
                        got.push((qid, a));
                    }
                }
                // An answer to an earlier operation that was given up.
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Stopped),
            }
        }
        Ok(got.into_iter().map(|(_, a)| a).collect())
    }

    /// See [`Device::quiesce`].
    fn quiesce(&mut self, f: QuiesceFn) -> Result<()> {
        self.reap_lingering();
        if !self.lingering.is_empty() {
            // Their I/O would still reach the image after the operation.
            return Err(Error::Live(
                "I/O of an earlier connection is still in flight; try again".into(),
            ));
        }
        self.op += 1;
        let op = self.op;
        let started = Instant::now();
        let deadline = started + self.cfg.quiesce_timeout;
        self.tell_queues(op, || QueueCmd::Pause);
        if let Err(e) = self.wait_acks(op, deadline, "pause") {
            self.tell_queues(op, || QueueCmd::Resume);
            return Err(e);
        }
        tracing::debug!(be = %self.be, queues = self.queues.len(), waited = ?started.elapsed(), "queues paused");
        let image = self.image.clone();
        let r = match catch_unwind(AssertUnwindSafe(|| f(&image))) {
            Ok(r) => r,
            Err(p) => Err(Error::Panicked(panic_message(&*p))),
        };
        let r = match r {
            Ok(Some(sw)) => self.switch(op, sw, deadline),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.tell_queues(op, || QueueCmd::Resume);
        tracing::debug!(be = %self.be, paused = ?started.elapsed(), ok = r.is_ok(), "queues resumed");
        r
    }

    /// Phase two of a switch, all queues paused: prepare, commit, switch (or roll back).
    fn switch(&mut self, op: u64, sw: Switch, deadline: Instant) -> Result<()> {
        let Switch {
            image,
            commit,
            rollback,
        } = sw;
        if image.size() != self.image.size() {
            rollback();
            return Err(Error::Live(format!(
                "the new image is {} bytes, the device {} bytes",
                image.size(),
                self.image.size()
            )));
        }
        let img = image.clone();
        self.tell_queues(op, || QueueCmd::Prepare(img.clone()));
        let prepared = self.wait_acks(
            op,
            deadline.max(Instant::now() + Duration::from_secs(5)),
            "prepare",
        );
        let failed = match prepared {
            Ok(acks) => acks.into_iter().find_map(|a| match a {
                QueueAck::Prepared(Err(e)) => Some(Error::Live(format!(
                    "a queue cannot serve the new image: {e}"
                ))),
                _ => None,
            }),
            Err(e) => Some(e),
        };
        let failed = match failed {
            Some(e) => Some(e),
            None => match catch_unwind(AssertUnwindSafe(commit)) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(p) => Some(Error::Panicked(panic_message(&*p))),
            },
        };
        if let Some(e) = failed {
            self.tell_queues(op, || QueueCmd::Abort);
            rollback();
            return Err(e);
        }
        self.tell_queues(op, || QueueCmd::Commit);
        self.image = image.clone();
        *lock(&self.shared.image) = image;
        Ok(())
    }
}

impl Drop for Control {
    /// Also runs when the control thread panics: the queues are told to stop (not waited
    /// for) and the device is marked finished, so that its owner notices.
    fn drop(&mut self) {
        for q in self.queues.iter().chain(&self.lingering) {
            q.stop.request();
        }
        if self.watching {
            self.unwatch();
        }
        self.shared.finished.store(true, Ordering::SeqCst);
    }
}

/// Logs (as an error) and describes I/O that a queue could not wait out when it stopped:
/// the kernel may still use the guest pages of those requests, so they stay mapped (leaked).
fn stuck_io(counters: &Counters, be: &str, e: &str) -> String {
    add(&counters.stuck_queues, 1);
    tracing::error!(be = %be, "I/O engine failure, device failed: {e}");
    format!("I/O engine failure: {e}")
}
