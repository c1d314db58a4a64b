//! The supervisor: finds devices in xenstore and runs one backend [`Device`] for each.
//!
//! It watches `/local/domain/<own domid>/backend/<type>` for every configured type (`qdisk` by
//! default, which is what libxl writes for `backendtype=qdisk` disks and what QEMU's xen-block
//! serves; `xdisk` is a private type for `xdisk attach`) and `@releaseDomain`. A device
//! `backend/<type>/<frontend domid>/<devid>` is served when the toolstack has written it
//! (`frontend`, `frontend-id`, `online` 1, `state` 1, as QEMU's xen-bus requires before it
//! creates a backend) — or, after a restart of the daemon, when the backend is `Closed` with
//! `online` 1 and the frontend is `Initialising` or `Closed`, for frontends that start over
//! from `Initialising` (Linux 6.1's xen-blkfront does not: it stays `Closed`, see
//! docs/xen.md).
//!
//! Each device lives in its own host thread, inside `catch_unwind`: it parses the nodes
//! ([`crate::params`]), opens the image, starts the [`Device`] (which follows the frontend by
//! itself: connect, close, reconnect, domain death) and writes `hotplug-status` `connected`.
//! Whatever goes wrong — bad nodes, a bad image, a panic — fails that device only:
//! `hotplug-status` `error`, an `error` node, `state` Closed. The device stops when its
//! frontend goes away for good (the [`Device`] finishes), when the toolstack removes the
//! backend directory (detach, domain destroy), or when the supervisor shuts down; what the
//! stopping device wrote into a directory the toolstack had already removed is removed again.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use std::path::Path;
use xdisk_backend::{Device, DeviceConfig, DeviceStats};
use xdisk_blkif::xenbus::Mode;
use xdisk_blkif::XenbusState;

use xdisk_image::{CacheMode, Format, Image, OpenOptions};
use xdisk_xen::platform::DomId;
use xdisk_xen::xenstore::wire::RELEASE_DOMAIN;
use xdisk_xen::xenstore::{Client, Errno, WatchEvent};

use crate::error::{Error, Result};
use crate::jobs::run;
use crate::params::{self, DeviceType, DiskSpec, ParamsDefaults};
use crate::platform::Platform;
use crate::status::{ChainLayer, DaemonStatus, DeviceStatus, Phase};

mod backup;
pub use backup::BACKUP_BITMAP_PREFIX;

/// A hook that adjusts each device's configuration before it starts.
pub type DeviceHook = Arc<dyn Fn(&mut DeviceConfig, &DiskSpec) + Send + Sync>;

/// What the supervisor serves.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// Backend types watched under `/local/domain/<own domid>/backend/`.
    pub backend_types: Vec<String>,
    /// Only these frontend domains (`None`: all).
    pub domains: Option<Vec<DomId>>,
    /// Daemon-wide overrides of the disks' nodes.
    pub params: ParamsDefaults,
    /// Adjusts each device's [`DeviceConfig`].
    pub device_hook: Option<DeviceHook>,
    /// How often a device's host thread checks whether its device finished by itself.
    pub poll_interval: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            backend_types: vec!["qdisk".into()],
            domains: None,
            params: ParamsDefaults::default(),
            device_hook: None,
            poll_interval: Duration::from_millis(200),
        }
    }
}

impl std::fmt::Debug for SupervisorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorConfig")
            .field("backend_types", &self.backend_types)
            .field("domains", &self.domains)
            .field("params", &self.params)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device's identity: `<type>/<frontend domid>/<devid>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The backend type: the directory under `backend/` (`qdisk`, `xdisk`).
    pub backend_type: String,
    /// The frontend's (guest's) domain.
    pub domid: DomId,
    /// The virtual device number.
    pub devid: u32,
}

impl Key {
    /// `<type>/<frontend domid>/<devid>` (`qdisk/5/51712`): the device's name in
    /// [`DeviceStatus::name`], the log and `xdisk stat`.
    pub fn name(&self) -> String {
        format!("{}/{}/{}", self.backend_type, self.domid, self.devid)
    }
}

/// One device known to the supervisor.
struct Entry {
    key: Key,
    be: String,
    status: Mutex<DeviceStatus>,
    device: Mutex<Option<Device>>,
    stop: Mutex<Option<Sender<()>>>,
    host: Mutex<Option<JoinHandle<()>>>,
    /// The disk as served now (a live snapshot changes its image) and the cache mode its
    /// image was opened with; set once the device started.
    spec: Mutex<Option<(DiskSpec, CacheMode)>>,
    /// Held by a live operation (one at a time per device), and by a job around each of its
    /// pauses of the queues.
    live: Mutex<()>,
    /// The job running on the device (one at a time), if any.
    job: Mutex<Option<u64>>,
    /// The backup running on the device (its job is `job`), for `xdisk backup --finish`.
    backup: Mutex<Option<Arc<backup::BackupCtl>>>,
}

impl Entry {
    fn phase(&self) -> Phase {
        lock(&self.status).phase
    }

    fn set_phase(&self, p: Phase) {
        lock(&self.status).phase = p;
    }

    fn request_stop(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }

    fn snapshot(&self) -> DeviceStatus {
        let mut s = lock(&self.status).clone();
        let dev = lock(&self.device);
        if let Some(d) = dev.as_ref() {
            // A device whose threads are broken must not break the report of the others.
            if let Ok((stats, state)) = catch_unwind(AssertUnwindSafe(|| (d.stats(), d.state()))) {
                s.counters = stats;
                s.xenbus_state = Some(state.name().to_owned());
            }
        }
        s
    }
}

const TOKEN_PREFIX: &str = "xdisk-supervisor";

/// How many stopped devices [`Supervisor::stopped_devices`] remembers.
pub const HISTORY: usize = 64;

/// Internal wake-ups share the watch channel (their tokens never reach xenstore).
enum Wake {
    Reap(Key),
    Shutdown,
}

struct Inner {
    cfg: SupervisorConfig,
    platform: Platform,
    /// `/local/domain/<own domid>/backend`.
    base: String,
    entries: Mutex<BTreeMap<Key, Arc<Entry>>>,
    /// The last devices that stopped, newest last.
    history: Mutex<std::collections::VecDeque<DeviceStatus>>,
    wake: Sender<WatchEvent>,
    pending: Mutex<Vec<Wake>>,
    tokens: Tokens,
    jobs: crate::jobs::Jobs,
}

#[derive(Clone)]
struct Tokens {
    wake: String,
    release: String,
    types: Vec<(String, String, String)>, // (type, path, token)
}

/// The supervisor of a backend domain's devices. Dropping it stops every device.
pub struct Supervisor {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("base", &self.inner.base)
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Supervisor {
    /// Sets the watches and starts serving (existing devices are picked up at once).
    pub fn start(cfg: SupervisorConfig, platform: Platform) -> Result<Supervisor> {
        static INSTANCE: AtomicU64 = AtomicU64::new(0);
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        for t in &cfg.backend_types {
            if t.is_empty() || t.contains('/') || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Invalid(format!("invalid backend type {t:?}")));
            }
        }
        if cfg.backend_types.is_empty() {
            return Err(Error::Invalid("no backend type to watch".into()));
        }
        let base = format!("/local/domain/{}/backend", platform.domid);
        let tok = |what: &str| format!("{TOKEN_PREFIX}:{}:{n}:{what}", std::process::id());
        let tokens = Tokens {
            wake: tok("wake"),
            release: tok("release"),
            types: cfg
                .backend_types
                .iter()
                .map(|t| (t.clone(), format!("{base}/{t}"), tok(&format!("type:{t}"))))
                .collect(),
        };
        let (wake, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            cfg,
            platform,
            base,
            entries: Mutex::new(BTreeMap::new()),
            history: Mutex::new(std::collections::VecDeque::new()),
            wake: wake.clone(),
            pending: Mutex::new(Vec::new()),
            tokens: tokens.clone(),
            jobs: crate::jobs::Jobs::default(),
        });
        let xs = inner.platform.xs.clone();
        let mut set = Vec::new();
        let mut watch = |path: &str, token: &str| -> Result<()> {
            xs.watch_with_sender(path, token, wake.clone())
                .map_err(|e| Error::xs(path, e))?;
            set.push((path.to_owned(), token.to_owned()));
            Ok(())
        };
        let r = (|| {
            for (_, path, token) in &tokens.types {
                watch(path, token)?;
            }
            watch(RELEASE_DOMAIN, &tokens.release)
        })();
        if let Err(e) = r {
            for (p, t) in set {
                let _ = xs.unwatch(&p, &t);
            }
            return Err(e);
        }
        let for_thread = inner.clone();
        let thread = std::thread::Builder::new()
            .name("xdisk-supervisor".into())
            .spawn(move || {
                for_thread.run(rx);
                for (p, t) in set {
                    let _ = for_thread.platform.xs.unwatch(&p, &t);
                }
            })
            .map_err(|e| Error::io("cannot start the supervisor thread", e))?;
        tracing::info!(
            base = %inner.base,
            types = ?inner.cfg.backend_types,
            domains = ?inner.cfg.domains,
            "supervisor started"
        );
        Ok(Supervisor {
            inner,
            thread: Some(thread),
        })
    }

    /// False once the supervisor stopped by itself (its xenstore connection was lost).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The platform served on.
    pub fn platform(&self) -> &Platform {
        &self.inner.platform
    }

    /// The configuration.
    pub fn config(&self) -> &SupervisorConfig {
        &self.inner.cfg
    }

    /// Every device known (running, starting, stopping or failed), by name.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let entries: Vec<Arc<Entry>> = lock(&self.inner.entries).values().cloned().collect();
        entries.iter().map(|e| e.snapshot()).collect()
    }

    /// The last devices that stopped (at most [`HISTORY`]), oldest first, with their counters
    /// as they were when the device finished (or, when the supervisor stopped it, just
    /// before).
    pub fn stopped_devices(&self) -> Vec<DeviceStatus> {
        lock(&self.inner.history).iter().cloned().collect()
    }

    /// One device by name (`qdisk/5/51712`).
    pub fn device(&self, name: &str) -> Option<DeviceStatus> {
        self.devices().into_iter().find(|d| d.name == name)
    }

    /// The daemon's report.
    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            platform: self.inner.platform.kind.as_str().to_owned(),
            backend_domid: self.inner.platform.domid,
            backend_types: self.inner.cfg.backend_types.clone(),
            domains: self.inner.cfg.domains.clone(),
            attach_frontend_domid: self.inner.platform.domid,
            xenstore_path: self
                .inner
                .platform
                .sim_xenstore_path()
                .map(|p| p.display().to_string()),
            devices: self.devices(),
        }
    }

    /// Stops every device (each closes its frontend and unmaps everything) and the watches.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Jobs end first (cancelled: each leaves its device and images consistent and
        // removes its temporary bitmap while the device still runs).
        self.inner.jobs.cancel_all();
        if let Some(t) = self.thread.take() {
            self.inner.send_wake(Wake::Shutdown);
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads a node: `Ok(None)` when it does not exist.
fn read_opt(xs: &Client, path: &str) -> Result<Option<String>> {
    match xs.read_string(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(Error::xs(path, e)),
    }
}

impl Inner {
    fn send_wake(&self, w: Wake) {
        lock(&self.pending).push(w);
        let _ = self.wake.send(WatchEvent {
            path: String::new(),
            token: self.tokens.wake.clone(),
        });
    }

    fn xs(&self) -> &Client {
        &self.platform.xs
    }

    fn run(self: &Arc<Self>, rx: Receiver<WatchEvent>) {
        let mut shutdown = false;
        while !shutdown {
            let first = match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.xs().is_connected() {
                        tracing::error!("xenstore connection lost; stopping every device");
                        break;
                    }
                    None
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut touched: BTreeSet<Key> = BTreeSet::new();
            let mut rescan: BTreeSet<String> = BTreeSet::new();
            let mut reaped = Vec::new();
            let mut handle = |ev: WatchEvent, touched: &mut BTreeSet<Key>| {
                if ev.token == self.tokens.wake {
                    for w in lock(&self.pending).drain(..) {
                        match w {
                            Wake::Reap(k) => reaped.push(k),
                            Wake::Shutdown => shutdown = true,
                        }
                    }
                } else if ev.token == self.tokens.release {
                    // A domain died: its devices notice by themselves; failed entries of
                    // removed directories are forgotten here.
                    rescan.extend(self.cfg.backend_types.iter().cloned());
                } else if let Some((t, path, _)) = self
                    .tokens
                    .types
                    .iter()
                    .find(|(_, _, tok)| *tok == ev.token)
                {
                    match parse_event_path(path, &ev.path) {
                        Some((dom, dev)) => {
                            touched.insert(Key {
                                backend_type: t.clone(),
                                domid: dom,
                                devid: dev,
                            });
                        }
                        None => {
                            rescan.insert(t.clone());
                        }
                    }
                }
            };
            if let Some(ev) = first {
                handle(ev, &mut touched);
            }
            while let Ok(ev) = rx.try_recv() {
                handle(ev, &mut touched);
            }
            for k in reaped {
                self.reap(&k);
                touched.insert(k);
            }
            if shutdown {
                break;
            }
            for t in &rescan {
                touched.extend(self.scan_type(t));
            }
            if !rescan.is_empty() {
                touched.extend(lock(&self.entries).keys().cloned());
            }
            for k in touched {
                if let Err(e) = self.check(&k) {
                    tracing::warn!(device = %k.name(), "{e}");
                }
            }
        }
        self.stop_all();
    }

    fn stop_all(&self) {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        for e in &entries {
            e.request_stop();
        }
        for e in &entries {
            let host = lock(&e.host).take();
            if let Some(h) = host {
                let _ = h.join();
            }
        }
        lock(&self.entries).clear();
        tracing::info!("supervisor stopped");
    }

    /// Every device under `backend/<type>`.
    fn scan_type(&self, t: &str) -> Vec<Key> {
        let dir = format!("{}/{t}", self.base);
        let mut keys = Vec::new();
        let doms = self.xs().directory(&dir).unwrap_or_default();
        for d in doms {
            let Ok(domid) = d.parse::<DomId>() else {
                continue;
            };
            for dev in self
                .xs()
                .directory(&format!("{dir}/{d}"))
                .unwrap_or_default()
            {
                if let Ok(devid) = dev.parse::<u32>() {
                    keys.push(Key {
                        backend_type: t.to_owned(),
                        domid,
                        devid,
                    });
                }
            }
        }
        keys
    }

    fn be_path(&self, k: &Key) -> String {
        format!("{}/{}/{}/{}", self.base, k.backend_type, k.domid, k.devid)
    }

    fn wanted_domain(&self, domid: DomId) -> bool {
        self.cfg.domains.as_ref().is_none_or(|d| d.contains(&domid))
    }

    /// Joins a finished host thread; failed devices stay listed until their directory goes.
    fn reap(&self, k: &Key) {
        let entry = lock(&self.entries).get(k).cloned();
        let Some(e) = entry else { return };
        let host = lock(&e.host).take();
        if let Some(h) = host {
            let _ = h.join();
        }
        if e.phase() != Phase::Failed {
            lock(&self.entries).remove(k);
            let mut h = lock(&self.history);
            h.push_back(lock(&e.status).clone());
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
    }

    /// Starts, stops or forgets one device after a change.
    fn check(self: &Arc<Self>, k: &Key) -> Result<()> {
        let be = self.be_path(k);
        let xs = self.xs();
        let entry = lock(&self.entries).get(k).cloned();
        if let Some(e) = entry {
            match e.phase() {
                Phase::Starting | Phase::Running => {
                    if read_opt(xs, &format!("{be}/frontend"))?.is_none() {
                        tracing::info!(device = %k.name(), "backend nodes removed; stopping");
                        e.set_phase(Phase::Stopping);
                        e.request_stop();
                    }
                }
                Phase::Stopping => {}
                Phase::Failed => {
                    if read_opt(xs, &format!("{be}/frontend"))?.is_none() {
                        lock(&self.entries).remove(k);
                        cleanup_leftovers(xs, &be);
                    }
                }
            }
            return Ok(());
        }
        if !self.wanted_domain(k.domid) {
            return Ok(());
        }
        let read = |n: &str| read_opt(xs, &format!("{be}/{n}"));
        let Some(fe) = read("frontend")? else {
            return Ok(());
        };
        if read("frontend-id")?.is_none() {
            return Ok(());
        }
        if read("online")?.as_deref() != Some("1") {
            return Ok(());
        }
        if read("hotplug-status")?.as_deref() == Some("error") {
            return Ok(());
        }
        let state = read("state")?.and_then(|s| s.parse::<XenbusState>().ok());
        let serve = match state {
            Some(XenbusState::Initialising) => true,
            Some(XenbusState::Closed) => {
                // Left by a previous run of the daemon: serve again if the frontend is
                // waiting for a backend.
                let fs = read_opt(xs, &format!("{fe}/state"))?
                    .and_then(|s| s.parse::<XenbusState>().ok());
                matches!(fs, Some(XenbusState::Initialising | XenbusState::Closed))
            }
            _ => false,
        };
        if !serve {
            if !matches!(state, Some(XenbusState::Closed) | None) {
                tracing::debug!(device = %k.name(), ?state, "not served: backend state");
            }
            return Ok(());
        }
        self.spawn(k.clone(), be, fe);
        Ok(())
    }

    fn spawn(self: &Arc<Self>, key: Key, be: String, fe: String) {
        let (stop_tx, stop_rx) = mpsc::channel();
        let status = DeviceStatus {
            name: key.name(),
            backend_type: key.backend_type.clone(),
            frontend_domid: key.domid,
            devid: key.devid,
            vdev: crate::devid::name_of_devid(key.devid),
            backend_path: be.clone(),
            frontend_path: Some(fe),
            image: None,
            format: None,
            chain: Vec::new(),
            read_only: false,
            cache: None,
            phase: Phase::Starting,
            xenbus_state: None,
            size: None,
            error: None,
            counters: DeviceStats::default(),
        };
        let entry = Arc::new(Entry {
            key: key.clone(),
            be,
            status: Mutex::new(status),
            device: Mutex::new(None),
            stop: Mutex::new(Some(stop_tx)),
            host: Mutex::new(None),
            spec: Mutex::new(None),
            live: Mutex::new(()),
            job: Mutex::new(None),
            backup: Mutex::new(None),
        });
        lock(&self.entries).insert(key.clone(), entry.clone());
        tracing::info!(device = %key.name(), "serving");
        let inner = self.clone();
        let e2 = entry.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("xdisk-dev-{}-{}", key.domid, key.devid))
            .spawn(move || inner.host(e2, stop_rx));
        match spawned {
            Ok(h) => *lock(&entry.host) = Some(h),
            Err(e) => {
                let msg = format!("cannot start a thread: {e}");
                self.fail(&entry, &msg);
            }
        }
    }

    /// The host thread of one device.
    fn host(self: Arc<Self>, entry: Arc<Entry>, stop: Receiver<()>) {
        // Every event of this device carries its identity (journal fields DEVICE, DOMID,
        // DEVID, BACKEND_TYPE, IMAGE under journald; JSON keys with --log-format=json).
        let span = tracing::info_span!(
            "device",
            device = %entry.key.name(),
            domid = entry.key.domid,
            devid = entry.key.devid,
            backend_type = %entry.key.backend_type,
            image = tracing::field::Empty,
        );
        let _guard = span.enter();
        let r = catch_unwind(AssertUnwindSafe(|| self.serve(&entry, &stop)));
        // Its job ends first (cancelled; its cleanup runs while the device may still
        // answer), so that no job holds the image when the device is started again.
        self.jobs
            .cancel_device(&entry.key.name(), Duration::from_secs(60));
        // The device is gone whatever happened (a panic unwinding through `serve` dropped
        // it, which shut it down). Taken out first: the lock must not be held across the
        // shutdown, or `xdisk stat` (Entry::snapshot) would wait for it.
        let device = lock(&entry.device).take();
        if let Some(d) = device {
            let _ = catch_unwind(AssertUnwindSafe(|| d.shutdown()));
        }
        match r {
            Ok(Ok(())) => {
                cleanup_leftovers(self.xs(), &entry.be);
                tracing::info!(device = %entry.key.name(), "stopped");
            }
            Ok(Err(e)) => self.fail(&entry, &e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                self.fail(&entry, &format!("internal error (panic): {msg}"));
            }
        }
        self.send_wake(Wake::Reap(entry.key.clone()));
    }

    /// Reports a failed device in xenstore (unless its directory is gone) and in the status.
    fn fail(&self, entry: &Entry, msg: &str) {
        tracing::error!(device = %entry.key.name(), "{msg}");
        {
            let mut s = lock(&entry.status);
            s.phase = Phase::Failed;
            s.error = Some(msg.to_owned());
            s.xenbus_state = Some(XenbusState::Closed.name().to_owned());
        }
        let be = &entry.be;
        let r = self.xs().transaction(|tx| {
            match tx.read(&format!("{be}/frontend")) {
                Ok(_) => {}
                Err(e) if e.errno() == Some(Errno::ENOENT) => return Ok(false),
                Err(e) => return Err(e),
            }
            tx.write(&format!("{be}/error"), msg)?;
            tx.write(&format!("{be}/hotplug-status"), "error")?;
            tx.write(&format!("{be}/state"), XenbusState::Closed.to_string())?;
            Ok(true)
        });
        match r {
            Ok(true) => {}
            Ok(false) => {
                // Removed meanwhile: nothing to report to, nothing to keep.
                entry.set_phase(Phase::Stopping);
            }
            Err(e) => tracing::warn!(device = %entry.key.name(), "cannot report the error: {e}"),
        }
    }

    fn serve(&self, entry: &Entry, stop: &Receiver<()>) -> Result<()> {
        let xs = self.xs();
        let be = &entry.be;
        let key = &entry.key;
        // The nodes are read once; xenstore errors other than a missing node fail the device.
        let mut nodes = BTreeMap::new();
        for n in [
            "params",
            "mode",
            "discard-enable",
            "direct-io-safe",
            "device-type",
            "frontend-id",
            "removable",
        ] {
            if let Some(v) = read_opt(xs, &format!("{be}/{n}"))? {
                nodes.insert(n, v);
            }
        }
        let fe_id = nodes.get("frontend-id").cloned().unwrap_or_default();
        if fe_id.parse::<DomId>().ok() != Some(key.domid) {
            return Err(Error::Device(format!(
                "frontend-id {fe_id:?} does not match the directory's domain {}",
                key.domid
            )));
        }
        let spec = params::parse(|n| nodes.get(n).cloned(), &self.cfg.params)?;
        if stop.try_recv().is_ok() {
            return Ok(());
        }
        let (image, cache) = open_image(&spec)?;
        drop_job_bitmaps(&image);
        {
            let mut s = lock(&entry.status);
            s.image = Some(spec.shown());
            tracing::Span::current().record("image", tracing::field::display(spec.shown()));
            s.format = Some(image.format().as_str().to_owned());
            s.read_only = image.read_only();
            s.cache = Some(cache.to_string());
            s.size = Some(image.size());
            s.chain = ChainLayer::of(&image);
        }
        let mut cfg = DeviceConfig::new(be.clone());
        cfg.frontend_domid = Some(key.domid);
        cfg.mode = Some(if spec.read_only {
            Mode::ReadOnly
        } else {
            Mode::ReadWrite
        });
        cfg.discard = spec.discard;
        cfg.removable = spec.device_type == DeviceType::Cdrom
            || nodes.get("removable").map(String::as_str) == Some("1");
        if let Some(hook) = &self.cfg.device_hook {
            hook(&mut cfg, &spec);
        }
        let p = &self.platform;
        let device = Device::start(
            cfg,
            p.xs.clone(),
            p.gnt.clone(),
            p.evt.clone(),
            image.clone(),
        )?;
        *lock(&entry.spec) = Some((spec.clone(), cache));
        *lock(&entry.device) = Some(device);
        xs.write(&format!("{be}/hotplug-status"), "connected")
            .map_err(|e| Error::xs(be, e))?;
        // A removal noticed while starting has already moved the phase to Stopping.
        {
            let mut s = lock(&entry.status);
            if s.phase == Phase::Starting {
                s.phase = Phase::Running;
            }
        }
        tracing::info!(
            device = %key.name(),
            image = %spec.shown(),
            format = %image.format(),
            read_only = image.read_only(),
            %cache,
            "device started"
        );
        // The device owns the image from now on (a live snapshot replaces it there).
        drop(image);
        let stopped = loop {
            match stop.recv_timeout(self.cfg.poll_interval) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break true,
                Err(RecvTimeoutError::Timeout) => {
                    let finished = lock(&entry.device).as_ref().is_none_or(|d| d.is_finished());
                    if finished {
                        break false;
                    }
                    self.follow_resize(entry);
                }
            }
        };
        entry.set_phase(Phase::Stopping);
        let device = lock(&entry.device).take();
        let mut top = None;
        if let Some(d) = device {
            top = Some(d.image());
            let last = d.stats();
            let r = if stopped { d.shutdown() } else { d.wait() };
            let mut s = lock(&entry.status);
            s.counters = last;
            s.xenbus_state = Some(XenbusState::Closed.name().to_owned());
            if let Err(e) = r {
                tracing::warn!(device = %key.name(), "device ended with: {e}");
            }
        }
        // The top image served last (a live snapshot's overlay); the layers under it were
        // closed when they stopped taking writes.
        if let Some(image) = top {
            if let Err(e) = image.close() {
                tracing::warn!(device = %key.name(), "closing the image: {e}");
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Online resize from below: a raw image whose storage changed size elsewhere (an RBD
    /// image resized with `rbd resize`, which librbd's header watch makes `rbd_get_size`
    /// see; a file or block device grown by another program) gets the new size, and the
    /// frontend is told as Linux blkback's `xen_vbd_resize` tells it (`sectors`, then the
    /// state again). Checked at every poll of the host thread.
    fn follow_resize(&self, entry: &Entry) {
        let Some(image) = lock(&entry.device).as_ref().map(|d| d.image()) else {
            return;
        };
        let shown = lock(&entry.spec)
            .as_ref()
            .map(|(s, _)| s.shown())
            .unwrap_or_default();
        let new = match image.refresh_size() {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(device = %entry.key.name(), "cannot size the image: {e}");
                return;
            }
        };
        tracing::info!(device = %entry.key.name(), image = %shown, size = new, "the image was resized: telling the frontend");
        lock(&entry.status).size = Some(new);
        if let Some(d) = lock(&entry.device).as_ref() {
            if let Err(e) = d.resize() {
                tracing::warn!(device = %entry.key.name(), "online resize: {e}");
            }
        }
    }
}

impl Supervisor {
    /// The one device `query` names (as `xdisk stat` names devices: `qdisk/5/51712`,
    /// `5/51712`, `xvda`, `/dev/xvda`, `51712`, the backend path).
    fn find(&self, query: &str) -> Result<Arc<Entry>> {
        let entries: Vec<Arc<Entry>> = lock(&self.inner.entries).values().cloned().collect();
        let found: Vec<Arc<Entry>> = entries
            .into_iter()
            .filter(|e| lock(&e.status).matches(query))
            .collect();
        match found.len() {
            0 => Err(Error::Invalid(format!(
                "no device {query:?} (xdisk stat lists them)"
            ))),
            1 => Ok(found
                .into_iter()
                .next()
                .ok_or_else(|| Error::Invalid("no device".into()))?),
            _ => Err(Error::Invalid(format!(
                "{query:?} names several devices ({}); name one as TYPE/DOMID/DEVID",
                found
                    .iter()
                    .map(|e| e.key.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The running device of `entry`: its handle and the disk as served.
    fn running(entry: &Entry) -> Result<(xdisk_backend::DeviceHandle, DiskSpec, CacheMode)> {
        let name = entry.key.name();
        if entry.phase() != Phase::Running {
            return Err(Error::Invalid(format!(
                "{name} is {}, not running",
                entry.phase().as_str()
            )));
        }
        let handle = lock(&entry.device)
            .as_ref()
            .filter(|d| !d.is_finished())
            .map(|d| d.handle())
            .ok_or_else(|| Error::Invalid(format!("{name} is not running")))?;
        let (spec, cache) = lock(&entry.spec)
            .clone()
            .ok_or_else(|| Error::Invalid(format!("{name} is not running")))?;
        Ok((handle, spec, cache))
    }

    /// A live external snapshot of a running device (see [`crate::control::ControlRequest::Snapshot`]):
    /// the device's queues pause (everything consumed completes against the current top),
    /// the top's metadata is written back and synced, the qcow2 overlay `overlay` is created
    /// over it (backing file: the top's path, with its format; size: the device's) or, with
    /// `no_create`, an existing one is checked to name it, the overlay is opened with the
    /// top as its backing layer, the backend's `params` node is changed to
    /// `qcow2:<overlay>` (so that a restarted daemon opens the overlay), the old top becomes
    /// read-only and the queues resume on the overlay. Any failure before the switch leaves
    /// the device serving its old top, and a file this call created is removed.
    pub fn snapshot(
        &self,
        query: &str,
        overlay: &Path,
        no_create: bool,
    ) -> Result<crate::control::SnapshotReply> {
        let entry = self.find(query)?;
        let _one = lock(&entry.live);
        Self::no_job(&entry)?;
        let (handle, spec, cache) = Self::running(&entry)?;
        let name = entry.key.name();
        if spec.read_only {
            return Err(Error::Invalid(format!(
                "{name} is served read-only: its image cannot take a snapshot overlay"
            )));
        }
        let old_path = spec.path.clone();
        let old_name = old_path.to_string_lossy().into_owned();
        // An overlay over a storage name would make the restarted daemon open that name as
        // a backing file written in a local image (refused under --backing-dirs), and leave
        // the guest's disk half on the host.
        if params::is_rbd_name(&old_name) {
            return Err(Error::Unsupported(format!(
                "{name}: {} is an RBD image: a local overlay over it is not supported; take                  an RBD snapshot instead (xdisk snapshot {name} --rbd-snap NAME: crash-consistent,                  with the queues paused), or xdisk mirror the device to a host file first",
                spec.shown()
            )));
        }
        if params::is_nbd_url(&old_name) {
            return Err(Error::Unsupported(format!(
                "{name}: {} is an NBD export: live snapshots of it are not supported;                  snapshot the image where its server keeps it, or xdisk mirror the device                  to a host file first",
                spec.shown()
            )));
        }
        let overlay_s = overlay.to_str().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the overlay path is not UTF-8",
                overlay.display()
            ))
        })?;
        let new_params = format!("qcow2:{overlay_s}");
        let (_, _, parsed) = params::parse_params(&new_params).map_err(|e| {
            Error::Invalid(format!(
                "overlay {overlay_s:?} cannot be named in params: {e}"
            ))
        })?;
        if params::is_nbd_url(overlay_s) || params::is_rbd_name(overlay_s) || !overlay.is_absolute()
        {
            return Err(Error::Invalid(format!(
                "overlay {overlay_s:?}: expected an absolute path of a host file"
            )));
        }
        if parsed != overlay
            || overlay
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(Error::Invalid(format!(
                "overlay {overlay_s:?}: expected a plain absolute path (no '..')"
            )));
        }
        // A restarted daemon must be allowed to open the old top as the overlay's backing
        // file.
        let backing_opts = OpenOptions {
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        };
        xdisk_image::check_backing_file(&old_path, &backing_opts).map_err(|e| {
            Error::Invalid(format!(
                "{} cannot become a backing file: {e}",
                old_path.display()
            ))
        })?;
        if let (Ok(a), Ok(b)) = (
            std::fs::canonicalize(&old_path),
            std::fs::canonicalize(overlay),
        ) {
            if a == b {
                return Err(Error::Invalid(format!(
                    "{overlay_s} is the device's image itself"
                )));
            }
        }
        let open_opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache,
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        };
        let xs = self.inner.platform.xs.clone();
        let be = entry.be.clone();
        let overlay_buf = overlay.to_path_buf();
        let backing_format = std::sync::Arc::new(Mutex::new(String::new()));
        let bf = backing_format.clone();
        let started = std::time::Instant::now();
        let op: xdisk_backend::QuiesceFn = Box::new(move |old: &Arc<Image>| {
            // The old top as any reader will find it: every write acknowledged so far with
            // its metadata (L2 tables, refcounts) written back and synced, the bitmaps
            // stored (qcow2.txt "Bitmaps extension": `in_use` cleared).
            old.close()?;
            *lock(&bf) = old.format().as_str().to_owned();
            let created = if no_create {
                false
            } else {
                create_overlay(&overlay_buf, &old_name, old.format(), old.size())?;
                true
            };
            let remove = {
                let p = overlay_buf.clone();
                move || {
                    if created {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            };
            let new = match Image::open_overlay(&overlay_buf, &open_opts, old.clone()) {
                Ok(i) => i,
                Err(e) => {
                    remove();
                    return Err(e.into());
                }
            };
            let old = old.clone();
            let commit = Box::new(move || -> xdisk_backend::Result<()> {
                persist_params(&xs, &be, &new_params)?;
                old.seal();
                Ok(())
            });
            Ok(Some(xdisk_backend::Switch {
                image: new,
                commit,
                rollback: Box::new(remove),
            }))
        });
        handle
            .quiesce(op)
            .map_err(|e| Error::Device(format!("snapshot of {name}: {e}")))?;
        let paused_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // The device serves the overlay now.
        let new_spec = DiskSpec {
            path: overlay.to_path_buf(),
            format: Some(Format::Qcow2),
            format_tag: "qcow2".into(),
            ..spec
        };
        let top = handle.image();
        {
            let mut st = lock(&entry.status);
            st.image = Some(new_spec.shown());
            st.format = Some(Format::Qcow2.as_str().to_owned());
            st.chain = ChainLayer::of(&top);
        }
        *lock(&entry.spec) = Some((new_spec, cache));
        tracing::info!(device = %name, overlay = %overlay.display(), backing = %old_path.display(), paused_us, "live snapshot");
        let backing_format = lock(&backing_format).clone();
        Ok(crate::control::SnapshotReply {
            device: name,
            image: overlay.display().to_string(),
            backing: old_path.display().to_string(),
            backing_format,
            paused_us,
        })
    }

    /// A crash-consistent RBD snapshot of a running device served from an RBD image (see
    /// [`crate::control::ControlRequest::RbdSnap`]): with the queues paused (everything
    /// consumed completed), the image is flushed (a qcow2 image in RBD writes its metadata
    /// back) and `rbd_snap_create` runs on the open image; the device goes on serving it.
    pub fn rbd_snap(&self, query: &str, snap: &str) -> Result<crate::control::RbdSnapReply> {
        let entry = self.find(query)?;
        let _one = lock(&entry.live);
        Self::no_job(&entry)?;
        let (handle, spec, _) = Self::running(&entry)?;
        let name = entry.key.name();
        let image = spec.path.to_string_lossy().into_owned();
        if !params::is_rbd_name(&image) {
            return Err(Error::Unsupported(format!(
                "{name}: --rbd-snap snapshots RBD images, and {} is not one (xdisk snapshot \
                 {name} OVERLAY.qcow2 snapshots a host file)",
                spec.shown()
            )));
        }
        if spec.read_only {
            return Err(Error::Invalid(format!(
                "{name} is served read-only: its image cannot take an RBD snapshot here"
            )));
        }
        if snap.is_empty()
            || snap.len() > 128
            || !snap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        {
            return Err(Error::Invalid(format!(
                "--rbd-snap {snap:?}: 1 to 128 characters of A-Z a-z 0-9 . _ - +"
            )));
        }
        let shown = spec.shown();
        let snapshot = match xdisk_image::DiskSource::parse(&image, None) {
            Ok(xdisk_image::DiskSource {
                location: xdisk_image::Location::Rbd(n),
                ..
            }) => format!("rbd:{}@{snap}", n.image_spec()),
            _ => format!("{shown}@{snap}"),
        };
        let started = std::time::Instant::now();
        let s2 = snap.to_owned();
        handle
            .quiesce(Box::new(move |img: &Arc<Image>| {
                img.flush()?;
                img.storage().create_snapshot(&s2).map_err(|e| {
                    xdisk_image::Error::io(
                        format!("rbd snap create {}@{s2}", img.storage().name()),
                        e,
                    )
                })?;
                Ok(None)
            }))
            .map_err(|e| Error::Device(format!("RBD snapshot of {name}: {e}")))?;
        let paused_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(device = %name, %snapshot, paused_us, "live RBD snapshot");
        Ok(crate::control::RbdSnapReply {
            device: name,
            image: shown,
            snapshot,
            paused_us,
        })
    }

    /// A change of the persistent dirty bitmaps of a running device's top image (see
    /// [`crate::control::ControlRequest::Bitmap`]); returns the bitmaps afterwards. Every
    /// change runs with the device's queues paused, so that a bitmap added (or enabled, or
    /// cleared) records every write acknowledged after this returns and no write of before.
    pub fn bitmap(
        &self,
        query: &str,
        req: &crate::control::BitmapRequest,
    ) -> Result<Vec<crate::control::BitmapEntry>> {
        use crate::control::BitmapAction as A;
        for n in [&req.name, &req.source].into_iter().flatten() {
            if req.action != A::List && is_job_bitmap(n) {
                return Err(Error::Invalid(format!(
                    "bitmap {n:?}: names beginning with {JOB_BITMAP_PREFIX}, \
                     {MIRROR_BITMAP_PREFIX} or {BACKUP_BITMAP_PREFIX} are reserved for the \
                     jobs' temporary bitmaps"
                )));
            }
        }
        let entry = self.find(query)?;
        let _one = lock(&entry.live);
        let (handle, _, _) = Self::running(&entry)?;
        let name = entry.key.name();
        let list = |image: &Image| -> Result<Vec<crate::control::BitmapEntry>> {
            let q = image.as_qcow2().ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name}: its image is {}: persistent bitmaps need qcow2",
                    image.format()
                ))
            })?;
            Ok(q.bitmaps()
                .into_iter()
                .map(|b| crate::control::BitmapEntry {
                    name: b.name,
                    granularity: b.granularity,
                    enabled: b.auto,
                    in_use: b.in_use,
                    inconsistent: b.inconsistent,
                })
                .collect())
        };
        if req.action == A::List {
            return list(&handle.image());
        }
        let bitmap = req.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
            Error::Invalid(format!("bitmap {}: no bitmap name", req.action.as_str()))
        })?;
        let req2 = req.clone();
        let op: xdisk_backend::QuiesceFn = Box::new(move |image: &Arc<Image>| {
            let q = image.as_qcow2().ok_or_else(|| {
                xdisk_image::Error::Unsupported(format!(
                    "the image is {}: persistent bitmaps need qcow2",
                    image.format()
                ))
            })?;
            if image.read_only() {
                return Err(xdisk_image::Error::ReadOnly.into());
            }
            let r = match req2.action {
                A::Add => q.add_bitmap(&bitmap, req2.granularity, !req2.disabled),
                A::Remove => q.remove_bitmap(&bitmap),
                A::Clear => q.clear_bitmap(&bitmap),
                A::Enable => q.set_bitmap_enabled(&bitmap, true),
                A::Disable => q.set_bitmap_enabled(&bitmap, false),
                A::Merge => {
                    let src = req2
                        .source
                        .as_deref()
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| {
                            xdisk_image::Error::InvalidArgument(
                                "merge needs a source bitmap".into(),
                            )
                        })?;
                    q.bitmap(src)
                        .and_then(|bits| q.merge_bitmap(&bitmap, &bits))
                }
                A::List => Ok(()),
            };
            r.map_err(|e| {
                xdisk_backend::Error::Live(format!(
                    "Operation {} on bitmap {bitmap} failed: {e}",
                    req2.action.as_str()
                ))
            })?;
            Ok(None)
        });
        handle
            .quiesce(op)
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        tracing::info!(device = %name, action = req.action.as_str(), bitmap = ?req.name, "live bitmap change");
        list(&handle.image())
    }
}

impl Supervisor {
    /// Commits the active layer of a running device (see
    /// [`crate::control::ControlRequest::Commit`]): the top image's data is merged down into
    /// its backing file while the guest keeps writing, then the device pivots to the backing
    /// file. Writes made during the copy are tracked in a temporary persistent bitmap of the
    /// top (added with the queues paused, so it sees every write acknowledged after it) and
    /// copied in further passes; each pass takes the bitmap's bits and clears it with the
    /// queues paused (a write marked but still in flight would otherwise be lost); the last
    /// pass copies what is left with the queues paused, flushes the backing file, changes
    /// `params` to it and switches the device over. Until that switch the chain reads as
    /// before (the backing file only changes where the top has data), so a failure or a
    /// crash at any point leaves a valid chain: `params` names the top until the pivot.
    ///
    /// The checks and the bitmap's creation happen before this returns; the copy runs as a
    /// background job (see [`crate::jobs`]) limited to `speed` bytes per second (0: no
    /// limit), in chunks between which the guest's requests go first. Cancelling it before
    /// the pivot leaves the device on its top and removes the bitmap; while it runs, the
    /// device takes no other live snapshot or commit.
    ///
    /// With `top_layer` naming a layer under the active top (an intermediate
    /// commit), see [`Supervisor::commit_intermediate`].
    pub fn commit(
        &self,
        query: &str,
        speed: u64,
        top_layer: Option<&str>,
        base_layer: Option<&str>,
    ) -> Result<crate::jobs::JobInfo> {
        let entry = self.find(query)?;
        let one = lock(&entry.live);
        let (handle, spec, cache) = Self::for_job(&entry)?;
        let name = entry.key.name();
        let top = handle.image();
        if let Some(t) = top_layer {
            if !layer_matches(&top, t) {
                // The layers above the committed one, top first.
                let mut upper = vec![top.clone()];
                let mut cur = top.backing().cloned();
                while let Some(l) = cur {
                    if layer_matches(&l, t) {
                        return self.commit_intermediate(
                            one, &entry, handle, spec, cache, upper, l, base_layer, speed,
                        );
                    }
                    cur = l.backing().cloned();
                    upper.push(l);
                }
                return Err(Error::Invalid(format!(
                    "{name}: --top {t:?} is not a layer of the chain (xdisk stat shows it)"
                )));
            }
        }
        let base = top.backing().cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "{name}: its image has no backing file: nothing to commit"
            ))
        })?;
        if let Some(b) = base_layer {
            if !layer_matches(&base, b) {
                return Err(Error::Unsupported(format!(
                    "{name}: --base {b:?}: an active commit goes into the top's backing file \
                     only (commit the layer under the top first)"
                )));
            }
        }
        if top.as_qcow2().is_none() {
            return Err(Error::Unsupported(format!(
                "{name}: the top image is not qcow2"
            )));
        }
        let base_path = base
            .storage()
            .local_path()
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name}: the backing file {} is not a host file",
                    base.storage().name()
                ))
            })?;
        if base.size() != top.size() {
            return Err(Error::Unsupported(format!(
                "{name}: the backing file is {} bytes, the top {} bytes",
                base.size(),
                top.size()
            )));
        }
        let base_fmt = base.format();
        let base_s = base_path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", base_path.display())))?;
        let tag = match base_fmt {
            Format::Raw => "aio",
            Format::Qcow2 => "qcow2",
        };
        let new_params = format!("{tag}:{base_s}");
        params::parse_params(&new_params)
            .map_err(|e| Error::Invalid(format!("{base_s} cannot be named in params: {e}")))?;
        // A second, writable instance of the backing file: the chain keeps reading through
        // the current one, which never reads the ranges this one changes (the top has them).
        let base_rw = Image::open(
            &base_path,
            &OpenOptions {
                format: Some(base_fmt),
                read_only: false,
                cache,
                backing_dirs: spec.backing_dirs.clone(),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| Error::Image {
            path: base_path.clone(),
            error: e,
        })?;
        let fail = |e: xdisk_backend::Error| Error::Device(format!("commit of {name}: {e}"));
        let total = run::allocated_bytes(&top).map_err(fail)?;
        let tracker = Self::track(&handle, &top, JOB_BITMAP_PREFIX).map_err(fail)?;
        let body = run::Commit {
            copy: run::TrackedCopy {
                src: top,
                dest: base_rw,
                tracker,
                zeroes: false,
            },
            new_params,
            new_spec: DiskSpec {
                path: base_path,
                format: Some(base_fmt),
                format_tag: tag.into(),
                ..spec.clone()
            },
        };
        let job = self.start_job(
            one,
            &entry,
            (handle, cache),
            (crate::jobs::JobKind::Commit, speed, total, false),
            Box::new(body),
        )?;
        tracing::info!(device = %name, job = job.id, speed, "commit job started");
        Ok(job)
    }

    /// Streams a running device's backing data into its top (see
    /// [`crate::control::ControlRequest::Stream`]) as a background job: every range the top
    /// does not have and a layer above `base` (every layer without `base`) does is copied
    /// into the top, then, with the queues paused, the top's header names `base` (or no
    /// backing file) and the device serves the top opened again over it.
    ///
    /// Guest writes win: each chunk is copied with the device's queues paused, and its
    /// allocation in the top is looked up in that same pause, so a range the guest wrote
    /// (acknowledged, or in flight before the pause: completed by it) is never overwritten
    /// with older backing data. Pauses are one chunk ([`COPY_CHUNK`]) long; between them
    /// the guest runs and the job sleeps for its rate limit. Until the link changes, the
    /// chain reads the same (the top only gains what its backing layers hold), so a cancel,
    /// a failure or a crash at any point leaves a valid chain; `params` never changes (the
    /// top stays the top).
    pub fn stream(
        &self,
        query: &str,
        base: Option<&str>,
        speed: u64,
    ) -> Result<crate::jobs::JobInfo> {
        let entry = self.find(query)?;
        let one = lock(&entry.live);
        let (handle, spec, cache) = Self::for_job(&entry)?;
        let name = entry.key.name();
        let top = handle.image();
        let top_path = qcow2_top_path(&name, &top)?;
        if top.backing().is_none() {
            return Err(Error::Invalid(format!(
                "{name}: its image has no backing file: nothing to stream"
            )));
        }
        // The layers under the top, down to the base (exclusive).
        let mut layers = Vec::new();
        let mut base_img = None;
        let mut cur = top.backing().cloned();
        while let Some(l) = cur {
            if let Some(b) = base {
                if layer_matches(&l, b) {
                    base_img = Some(l);
                    break;
                }
            }
            cur = l.backing().cloned();
            layers.push(l);
        }
        let base_link = match (base, &base_img) {
            (None, _) => None,
            (Some(b), None) => {
                return Err(Error::Invalid(format!(
                    "{name}: --base {b:?} is not a layer under the top (xdisk stat shows the chain)"
                )))
            }
            (Some(_), Some(l)) => {
                let p = l.storage().local_path().ok_or_else(|| {
                    Error::Unsupported(format!(
                        "{name}: the base {} is not a host file",
                        l.storage().name()
                    ))
                })?;
                let p = p
                    .to_str()
                    .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", p.display())))?;
                Some((p.to_owned(), l.format().as_str().to_owned()))
            }
        };
        let fail = |e: xdisk_backend::Error| Error::Device(format!("stream of {name}: {e}"));
        let total = run::stream_ranges(&top, &layers, 0, top.size())
            .map_err(fail)?
            .iter()
            .map(|r| r.1)
            .sum();
        let body = run::Stream {
            top,
            layers,
            base: base_img,
            relink: run::Relink {
                upper: vec![top_path],
                link: base_link,
                top_opts: Self::top_opts(&spec, cache),
            },
        };
        let job = self.start_job(
            one,
            &entry,
            (handle, cache),
            (crate::jobs::JobKind::Stream, speed, total, false),
            Box::new(body),
        )?;
        tracing::info!(device = %name, job = job.id, speed, base, "stream job started");
        Ok(job)
    }

    /// Mirrors a running device's disk to `req.target` (see
    /// [`crate::control::ControlRequest::Mirror`]) as a background job. The target is
    /// created if missing (raw or qcow2 of the device's size; with `sync` `top` a qcow2
    /// whose backing file is the top's) and opened; a temporary persistent bitmap of a
    /// qcow2 top (added with the queues paused), or the image's record in memory for a raw
    /// one, tracks the guest's writes; the first pass copies
    /// what the chain holds (`full`) or the top holds (`top`), later passes what the
    /// bitmap collected (taken and cleared with the queues paused). Once a pass finds at
    /// most 4 MiB dirty, the job is `ready` and keeps copying the writes; on completion
    /// (`pivot`, or [`crate::jobs::JobAction::Complete`]) the last pass runs with the queues
    /// paused, the target is flushed, `params` names it and the device switches to it. A
    /// cancel (or failure) before that leaves the device on its source, the bitmap removed,
    /// and the target as far as it got.
    pub fn mirror(
        &self,
        query: &str,
        req: &crate::control::MirrorRequest,
    ) -> Result<crate::jobs::JobInfo> {
        let entry = self.find(query)?;
        let one = lock(&entry.live);
        let (handle, spec, cache) = Self::for_job(&entry)?;
        let name = entry.key.name();
        let top = handle.image();
        let sync_top = match req.sync.as_deref() {
            None | Some("full") => false,
            Some("top") => true,
            Some(o) => {
                return Err(Error::Invalid(format!(
                    "--sync {o:?}: expected full or top"
                )))
            }
        };
        let fmt = match req.format.as_deref() {
            None | Some("qcow2") => Format::Qcow2,
            Some("raw") if !sync_top => Format::Raw,
            Some("raw") => {
                return Err(Error::Invalid(
                    "--sync top needs a qcow2 target (it gets the top's backing file)".into(),
                ))
            }
            Some(o) => {
                return Err(Error::Invalid(format!(
                    "--format {o:?}: expected raw or qcow2"
                )))
            }
        };
        let target = Path::new(&req.target);
        let target_s = req.target.as_str();
        // A host file, or an RBD image (storage migration into Ceph). An NBD export cannot
        // be created, and a device switched to one would depend on its server.
        let on_rbd = params::is_rbd_name(target_s);
        if params::is_nbd_url(target_s) {
            return Err(Error::Unsupported(format!(
                "target {target_s:?}: mirrors to NBD exports are not supported; mirror to a \
                 host file or an RBD image (rbd:POOL/IMAGE)"
            )));
        }
        if !on_rbd
            && (!target.is_absolute()
                || target
                    .components()
                    .any(|c| c == std::path::Component::ParentDir))
        {
            return Err(Error::Invalid(format!(
                "target {target_s:?}: expected a plain absolute path of a host file or an \
                 RBD image (rbd:POOL/IMAGE)"
            )));
        }
        if on_rbd && sync_top {
            return Err(Error::Unsupported(format!(
                "target {target_s:?}: --sync top needs a qcow2 target with a backing file, \
                 which images on RBD cannot have yet; use --sync full"
            )));
        }
        let source = if on_rbd {
            xdisk_image::DiskSource::parse(target_s, Some(fmt)).map_err(|e| Error::Image {
                path: target.to_path_buf(),
                error: e,
            })?
        } else {
            xdisk_image::DiskSource::path(target, Some(fmt))
        };
        // As messages and the job's result show it (an RBD key hidden).
        let shown = source.to_string();
        let tag = match fmt {
            Format::Raw => "aio",
            Format::Qcow2 => "qcow2",
        };
        let new_params = format!("{tag}:{target_s}");
        let (_, _, parsed) = params::parse_params(&new_params)
            .map_err(|e| Error::Invalid(format!("{shown} cannot be named in params: {e}")))?;
        if parsed != target {
            return Err(Error::Invalid(format!(
                "target {shown:?} cannot be named in params"
            )));
        }
        let target_spec = match &source.location {
            xdisk_image::Location::Rbd(n) => Some(n.image_spec()),
            _ => None,
        };
        let mut layer = Some(top.clone());
        while let Some(l) = layer {
            if layer_matches(&l, target_s)
                || target_spec.as_deref().is_some_and(|t| same_rbd(&l, t))
            {
                return Err(Error::Invalid(format!(
                    "{shown} is an image of the device's chain"
                )));
            }
            layer = l.backing().cloned();
        }
        let backing = if sync_top {
            top.backing().cloned()
        } else {
            None
        };
        let image_err = |error| Error::Image {
            path: shown.clone().into(),
            error,
        };
        let created = !source.exists().map_err(image_err)?;
        if created {
            let (bf, bfmt) = match &backing {
                Some(b) => {
                    let p = b.storage().local_path().ok_or_else(|| {
                        Error::Unsupported(format!(
                            "{name}: the top's backing file {} is not a host file",
                            b.storage().name()
                        ))
                    })?;
                    let p = p
                        .to_str()
                        .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", p.display())))?;
                    (Some(p.to_owned()), Some(b.format().as_str().to_owned()))
                }
                None => (None, None),
            };
            if !on_rbd {
                // Not over a file made meanwhile (create truncates).
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map_err(|e| Error::io(format!("cannot create {target_s}"), e))?;
            }
            let opts = xdisk_image::CreateOptions {
                size: top.size(),
                backing_file: bf,
                backing_format: bfmt,
                ..xdisk_image::CreateOptions::default()
            };
            // On RBD as `img create` makes it (refused if it exists by now).
            if let Err(e) = source.create(fmt, &opts) {
                if !on_rbd {
                    let _ = std::fs::remove_file(target);
                }
                return Err(image_err(e));
            }
        }
        let remove_created = || {
            if created {
                if let Err(e) = source.remove() {
                    tracing::warn!(target = %shown, "cannot remove the mirror target made: {e}");
                }
            }
        };
        let open_opts = OpenOptions {
            format: Some(fmt),
            read_only: false,
            cache,
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        };
        let opened = match &backing {
            Some(b) => Image::open_overlay(target, &open_opts, b.clone()),
            None => source.open(&open_opts),
        };
        let dest = match opened {
            Ok(i) => i,
            Err(e) => {
                remove_created();
                return Err(image_err(e));
            }
        };
        if dest.size() != top.size() || (!sync_top && dest.backing().is_some()) {
            drop(dest);
            remove_created();
            return Err(Error::Invalid(format!(
                "{target_s}: expected {} bytes{}",
                top.size(),
                if sync_top { "" } else { " and no backing file" }
            )));
        }
        let fail = |e: xdisk_backend::Error| Error::Device(format!("mirror of {name}: {e}"));
        // What the first pass copies: the top's ranges, or every layer's; an existing
        // target gets everything (it may hold anything).
        let layers: Vec<Arc<Image>> = if sync_top {
            vec![top.clone()]
        } else {
            let mut v = Vec::new();
            let mut l = Some(top.clone());
            while let Some(x) = l {
                l = x.backing().cloned();
                v.push(x);
            }
            v
        };
        // The guest's writes are tracked from here on, before the first pass's ranges are
        // looked up: a write that allocates a range after the look-up is in the tracking,
        // one before it is in the ranges (tracking started after them would miss a write
        // made in between to a range that was unallocated when looked up).
        let tracker = match Self::track(&handle, &top, MIRROR_BITMAP_PREFIX) {
            Ok(t) => t,
            Err(e) => {
                drop(dest);
                remove_created();
                return Err(fail(e));
            }
        };
        // A new target reads as zeroes where nothing is copied, unless it is an RBD image
        // with librbd's encryption (unwritten parts of objects written in part read as
        // noise there): then all of it is copied, zeroes written as such.
        let first: Vec<(u64, u64)> = if (created && source.zero_initialized()) || sync_top {
            match run::chain_ranges(&layers, top.size()) {
                Ok(r) => r,
                Err(e) => {
                    let t2 = tracker.clone();
                    if let Err(e) = handle.quiesce(Box::new(move |img: &Arc<Image>| {
                        t2.stop(img)?;
                        Ok(None)
                    })) {
                        tracing::warn!(device = %name, "cannot remove the mirror's write tracking: {e} (a daemon opening the image removes a leftover bitmap)");
                    }
                    drop(dest);
                    remove_created();
                    return Err(fail(e));
                }
            }
        } else {
            vec![(0, top.size())]
        };
        let total = first.iter().map(|r| r.1).sum();
        let body = run::Mirror {
            first,
            copy: run::TrackedCopy {
                src: top,
                dest,
                tracker,
                zeroes: true,
            },
            new_params,
            new_spec: DiskSpec {
                path: target.to_path_buf(),
                format: Some(fmt),
                format_tag: tag.into(),
                ..spec.clone()
            },
        };
        let job = self.start_job(
            one,
            &entry,
            (handle, cache),
            (crate::jobs::JobKind::Mirror, req.speed, total, req.pivot),
            Box::new(body),
        )?;
        tracing::info!(device = %name, job = job.id, target = %shown, sync_top, "mirror job started");
        Ok(job)
    }

    /// Commits `mid`, a layer under the active top, and the layers under it above
    /// `base_layer` (default: `mid`'s backing file), into the base, as a background job:
    /// the data those layers hold is copied into a writable instance of the base (the
    /// guest never writes to them, so no tracking is needed; the chain reads the same, as
    /// the base only changes where `mid` or a layer under it has data), the base is
    /// flushed, then with the queues paused the layer right above `mid` (the last of
    /// `upper`, the layers from the top down; the top itself or a read-only layer under it)
    /// names the base as its backing file in its header, and the device serves the chain
    /// opened again (the top and the layers down to that one) over a fresh instance of the
    /// base. The layers dropped from the chain are left in place. A cancel, failure or
    /// crash before the link changes leaves the chain as it was, and after it the chain
    /// reads the same through the base; `params` never changes.
    #[allow(clippy::too_many_arguments)]
    fn commit_intermediate(
        &self,
        one: MutexGuard<'_, ()>,
        entry: &Arc<Entry>,
        handle: xdisk_backend::DeviceHandle,
        spec: DiskSpec,
        cache: CacheMode,
        upper: Vec<Arc<Image>>,
        mid: Arc<Image>,
        base_layer: Option<&str>,
        speed: u64,
    ) -> Result<crate::jobs::JobInfo> {
        let name = entry.key.name();
        let top = upper[0].clone();
        let mut upper_paths = vec![qcow2_top_path(&name, &top)?];
        for l in &upper[1..] {
            // A layer with a backing file is qcow2; its header is rewritten in place.
            let p = l.storage().local_path().filter(|_| l.as_qcow2().is_some());
            let p = p.ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name}: the layer {} above --top is not a qcow2 host file",
                    l.storage().name()
                ))
            })?;
            upper_paths.push(p.to_path_buf());
        }
        let mut layers = Vec::new();
        let mut base = None;
        let mut cur = Some(mid.clone());
        while let Some(l) = cur {
            // Strictly under the committed layer.
            let is_base = !layers.is_empty() && base_layer.is_none_or(|b| layer_matches(&l, b));
            if is_base {
                base = Some(l);
                break;
            }
            cur = l.backing().cloned();
            layers.push(l);
        }
        let base = base.ok_or_else(|| {
            Error::Invalid(match base_layer {
                Some(b) => format!("{name}: --base {b:?} is not a layer under --top"),
                None => format!("{name}: --top has no backing file: nothing to commit into"),
            })
        })?;
        let base_path = base
            .storage()
            .local_path()
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{name}: the base {} is not a host file",
                    base.storage().name()
                ))
            })?;
        let base_s = base_path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: not UTF-8", base_path.display())))?
            .to_owned();
        if base.size() != top.size() {
            return Err(Error::Unsupported(format!(
                "{name}: the base is {} bytes, the top {} bytes",
                base.size(),
                top.size()
            )));
        }
        let base_opts = OpenOptions {
            format: Some(base.format()),
            read_only: false,
            cache,
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        };
        let base_rw = Image::open(&base_path, &base_opts).map_err(|e| Error::Image {
            path: base_path.clone(),
            error: e,
        })?;
        let fail = |e: xdisk_backend::Error| Error::Device(format!("commit of {name}: {e}"));
        let ranges = run::chain_ranges(&layers, top.size()).map_err(fail)?;
        let total = ranges.iter().map(|r| r.1).sum();
        let body = run::CommitBelow {
            top,
            src: mid,
            ranges,
            relink: run::Relink {
                upper: upper_paths,
                link: Some((base_s, base_rw.format().as_str().to_owned())),
                top_opts: Self::top_opts(&spec, cache),
            },
            base_rw,
            base_ro_opts: OpenOptions {
                read_only: true,
                ..base_opts
            },
            base_path,
        };
        let job = self.start_job(
            one,
            entry,
            (handle, cache),
            (crate::jobs::JobKind::Commit, speed, total, false),
            Box::new(body),
        )?;
        tracing::info!(device = %name, job = job.id, speed, "intermediate commit job started");
        Ok(job)
    }

    /// Registers a job on the device of `entry` (holding its live lock `one`, released once
    /// the job is its device's) and starts its thread on `body`; `job` is its kind, speed
    /// limit, bytes to copy as known and whether it completes by itself once ready.
    fn start_job(
        &self,
        one: MutexGuard<'_, ()>,
        entry: &Arc<Entry>,
        (handle, cache): (xdisk_backend::DeviceHandle, CacheMode),
        (kind, speed, total, pivot): (crate::jobs::JobKind, u64, u64, bool),
        body: Box<dyn run::Body>,
    ) -> Result<crate::jobs::JobInfo> {
        let job = self
            .inner
            .jobs
            .create(kind, &entry.key.name(), speed, total);
        if pivot {
            job.request_complete();
        }
        *lock(&entry.job) = Some(job.id());
        drop(one);
        let dev = JobDevice {
            entry: entry.clone(),
            handle,
            xs: self.inner.platform.xs.clone(),
            cache,
        };
        let j2 = job.clone();
        if let Err(e) = self
            .inner
            .jobs
            .spawn(&job, move || run::execute(dev, j2, body))
        {
            // The thread never ran (nor a cleanup: a tracking bitmap is left to the next
            // open of the image).
            *lock(&entry.job) = None;
            job.finish(Err(e.to_string()));
            return Err(e);
        }
        Ok(job.info())
    }

    /// Starts tracking the guest's writes to `top` for a job, with the queues paused (the
    /// caller holds the device's live lock): in a temporary persistent bitmap named
    /// `prefix<pid>-<n>` of a qcow2 top, in memory for another.
    fn track(
        handle: &xdisk_backend::DeviceHandle,
        top: &Image,
        prefix: &str,
    ) -> xdisk_backend::Result<run::Tracker> {
        static JOB: AtomicU64 = AtomicU64::new(0);
        let tracker = match top.as_qcow2() {
            Some(_) => run::Tracker::Bitmap(format!(
                "{prefix}{}-{}",
                std::process::id(),
                JOB.fetch_add(1, Ordering::Relaxed)
            )),
            None => run::Tracker::Memory,
        };
        let gran = top.cluster_size().unwrap_or(65536).clamp(4096, 65536);
        let t2 = tracker.clone();
        handle.quiesce(Box::new(move |img: &Arc<Image>| {
            t2.start(img, gran)?;
            Ok(None)
        }))?;
        Ok(tracker)
    }

    /// How a job opens the device's top again (writable qcow2).
    fn top_opts(spec: &DiskSpec, cache: CacheMode) -> OpenOptions {
        OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            cache,
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        }
    }

    /// The running device of `entry` for a new job: no job runs on it, and it is served
    /// writable.
    fn for_job(entry: &Entry) -> Result<(xdisk_backend::DeviceHandle, DiskSpec, CacheMode)> {
        Self::no_job(entry)?;
        let (handle, spec, cache) = Self::running(entry)?;
        if spec.read_only {
            return Err(Error::Invalid(format!(
                "{} is served read-only",
                entry.key.name()
            )));
        }
        Ok((handle, spec, cache))
    }

    /// Fails if a job runs on the device.
    fn no_job(entry: &Entry) -> Result<()> {
        match *lock(&entry.job) {
            Some(id) => Err(Error::Invalid(format!(
                "{}: job {id} runs on it (xdisk jobs; xdisk job cancel {id})",
                entry.key.name()
            ))),
            None => Ok(()),
        }
    }

    /// The daemon's jobs, running and finished (see [`crate::jobs`]).
    pub fn jobs(&self) -> Vec<crate::jobs::JobInfo> {
        self.inner.jobs.list()
    }

    /// Cancels, pauses or resumes a job.
    pub fn job_control(
        &self,
        id: u64,
        action: crate::jobs::JobAction,
    ) -> Result<crate::jobs::JobInfo> {
        self.inner.jobs.control(id, action)
    }
}

/// Names of the temporary bitmaps of commit jobs (`xdisk-commit-<pid>-<n>`): reserved (the
/// bitmap commands refuse them), and removed from a device's top image when a daemon opens
/// it (one left by a daemon killed mid-commit; it is `in_use` and useless).
pub const JOB_BITMAP_PREFIX: &str = "xdisk-commit-";

/// Names of the temporary bitmaps of mirror jobs (`xdisk-mirror-<pid>-<n>`), reserved and
/// cleaned up as [`JOB_BITMAP_PREFIX`]'s.
pub const MIRROR_BITMAP_PREFIX: &str = "xdisk-mirror-";

/// Whether a bitmap name is a job's temporary bitmap.
fn is_job_bitmap(name: &str) -> bool {
    name.starts_with(JOB_BITMAP_PREFIX)
        || name.starts_with(MIRROR_BITMAP_PREFIX)
        || name.starts_with(BACKUP_BITMAP_PREFIX)
}

/// The path of the device's top, which a job rewrites: a qcow2 host file.
fn qcow2_top_path(name: &str, top: &Image) -> Result<std::path::PathBuf> {
    if top.as_qcow2().is_none() {
        return Err(Error::Unsupported(format!(
            "{name}: the top image is not qcow2"
        )));
    }
    top.storage()
        .local_path()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Unsupported(format!("{name}: the top is not a host file")))
}

/// Whether the chain layer `l` is the RBD image `spec` (`pool/[namespace/]image`) names,
/// on whichever cluster.
fn same_rbd(l: &Image, spec: &str) -> bool {
    let name = l.storage().name();
    params::is_rbd_name(&name)
        && xdisk_image::DiskSource::parse(&name, None).is_ok_and(
            |s| matches!(&s.location, xdisk_image::Location::Rbd(n) if n.image_spec() == spec),
        )
}

/// Whether the chain layer `l` is the image `name` names (its path as given or as the
/// chain shows it, or the same file).
fn layer_matches(l: &Image, name: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    if l.storage().name() == name {
        return true;
    }
    let Some(p) = l.storage().local_path() else {
        return false;
    };
    if p == Path::new(name) {
        return true;
    }
    match (std::fs::metadata(p), std::fs::metadata(name)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// What a job's thread may do to its device ([`crate::jobs::run`]): pause its queues, have
/// `params` rewritten at a switch, record what the device serves afterwards.
pub(crate) struct JobDevice {
    entry: Arc<Entry>,
    handle: xdisk_backend::DeviceHandle,
    xs: Arc<Client>,
    cache: CacheMode,
}

impl JobDevice {
    /// The device's name (`qdisk/5/51712`).
    pub(crate) fn name(&self) -> String {
        self.entry.key.name()
    }

    /// [`Device::quiesce`] with the device's live lock held (one pause at a time).
    pub(crate) fn quiesce(&self, f: xdisk_backend::QuiesceFn) -> xdisk_backend::Result<()> {
        let _one = lock(&self.entry.live);
        self.handle.quiesce(f)
    }

    /// What writes the device's `params` (a switch's commit).
    pub(crate) fn params_writer(
        &self,
        params: String,
    ) -> impl FnOnce() -> xdisk_backend::Result<()> + Send + 'static {
        let (xs, be) = (self.xs.clone(), self.entry.be.clone());
        move || persist_params(&xs, &be, &params)
    }

    /// After a switch: the device's chain as it is now, and with `spec` the disk it serves
    /// (a commit's base, a mirror's target).
    pub(crate) fn served(&self, spec: Option<DiskSpec>) {
        let now = self.handle.image();
        {
            let mut st = lock(&self.entry.status);
            if let Some(s) = &spec {
                st.image = Some(s.shown());
                st.format = s.format.map(|f| f.as_str().to_owned());
            }
            st.chain = ChainLayer::of(&now);
        }
        if let Some(s) = spec {
            *lock(&self.entry.spec) = Some((s, self.cache));
        }
    }

    /// The job has ended: the device takes another one.
    pub(crate) fn release(&self) {
        *lock(&self.entry.job) = None;
    }
}

impl crate::control::LiveOps for Supervisor {
    fn rbd_snap(&self, device: &str, name: &str) -> Result<crate::control::RbdSnapReply> {
        Supervisor::rbd_snap(self, device, name)
    }

    fn commit(
        &self,
        device: &str,
        speed: u64,
        top: Option<&str>,
        base: Option<&str>,
    ) -> Result<crate::jobs::JobInfo> {
        Supervisor::commit(self, device, speed, top, base)
    }

    fn stream(&self, device: &str, base: Option<&str>, speed: u64) -> Result<crate::jobs::JobInfo> {
        Supervisor::stream(self, device, base, speed)
    }

    fn mirror(
        &self,
        device: &str,
        req: &crate::control::MirrorRequest,
    ) -> Result<crate::jobs::JobInfo> {
        Supervisor::mirror(self, device, req)
    }

    fn jobs(&self) -> Vec<crate::jobs::JobInfo> {
        Supervisor::jobs(self)
    }

    fn job(&self, id: u64, action: crate::jobs::JobAction) -> Result<crate::jobs::JobInfo> {
        Supervisor::job_control(self, id, action)
    }

    fn job_set_speed(&self, id: u64, speed: u64) -> Result<crate::jobs::JobInfo> {
        self.inner.jobs.set_speed(id, speed)
    }

    fn snapshot(
        &self,
        device: &str,
        overlay: &Path,
        no_create: bool,
    ) -> Result<crate::control::SnapshotReply> {
        Supervisor::snapshot(self, device, overlay, no_create)
    }

    fn bitmap(
        &self,
        device: &str,
        req: &crate::control::BitmapRequest,
    ) -> Result<Vec<crate::control::BitmapEntry>> {
        Supervisor::bitmap(self, device, req)
    }

    fn backup(
        &self,
        device: &str,
        req: &crate::control::BackupRequest,
    ) -> Result<crate::jobs::JobInfo> {
        Supervisor::backup(self, device, req)
    }

    fn backup_finish(&self, device: &str, clear_bitmap: bool) -> Result<crate::jobs::JobInfo> {
        Supervisor::backup_finish(self, device, clear_bitmap)
    }
}

/// Removes the temporary bitmaps of commit jobs ([`JOB_BITMAP_PREFIX`]) that a daemon
/// stopped mid-commit (killed, or unable to remove them) left in a writable qcow2 image.
fn drop_job_bitmaps(image: &Image) {
    let Some(q) = image.as_qcow2().filter(|_| !image.read_only()) else {
        return;
    };
    for b in q.bitmaps() {
        if is_job_bitmap(&b.name) {
            match q.remove_bitmap(&b.name) {
                Ok(()) => {
                    tracing::info!(bitmap = %b.name, "removed the temporary bitmap of an interrupted job")
                }
                Err(e) => {
                    tracing::warn!(bitmap = %b.name, "cannot remove the temporary bitmap of an interrupted job: {e}")
                }
            }
        }
    }
}

/// Creates the qcow2 overlay of a live snapshot: a new file (an existing one is never
/// replaced), backing file `backing` (absolute) of `format`, `size` bytes (qcow2.txt
/// "Header": `backing_file_offset`/`size`; the format goes into the "Backing file format
/// name" extension).
fn create_overlay(
    path: &Path,
    backing: &str,
    format: Format,
    size: u64,
) -> xdisk_backend::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
                " (an existing overlay is used with --no-create)"
            } else {
                ""
            };
            xdisk_backend::Error::Live(format!("cannot create {}: {e}{hint}", path.display()))
        })?;
    let opts = xdisk_image::CreateOptions {
        size,
        backing_file: Some(backing.to_owned()),
        backing_format: Some(format.as_str().to_owned()),
        ..xdisk_image::CreateOptions::default()
    };
    xdisk_image::create(path, Format::Qcow2, &opts).map_err(|e| {
        let _ = std::fs::remove_file(path);
        xdisk_backend::Error::Image(e)
    })
}

/// Writes a device's new `params` (dom0 owns the backend directory), unless the toolstack
/// removed the directory meanwhile (then the device is going away: an error).
fn persist_params(xs: &Client, be: &str, params: &str) -> xdisk_backend::Result<()> {
    let r = xs.transaction(|tx| {
        match tx.read(&format!("{be}/frontend")) {
            Ok(_) => {}
            Err(e) if e.errno() == Some(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        }
        tx.write(&format!("{be}/params"), params)?;
        Ok(true)
    });
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(xdisk_backend::Error::Live(format!(
            "{be} was removed: the device is going away"
        ))),
        Err(e) => Err(xdisk_backend::Error::Live(format!(
            "cannot write {be}/params: {e}"
        ))),
    }
}

/// Opens a disk's image; a cache mode with O_DIRECT that the file system refuses (tmpfs)
/// falls back to `writeback`, with a warning.
fn open_image(spec: &DiskSpec) -> Result<(Arc<Image>, CacheMode)> {
    let open = |cache| {
        // A path, an NBD URI (params=aio:nbd+unix:///x?socket=...) or an RBD image
        // (params=aio:rbd:pool/img).
        let name = spec.path.to_string_lossy();
        let source = if crate::params::is_nbd_url(&name) || crate::params::is_rbd_name(&name) {
            xdisk_image::DiskSource::parse(&name, spec.format)?
        } else {
            xdisk_image::DiskSource::path(&spec.path, spec.format)
        };
        source.open(&OpenOptions {
            format: spec.format,
            read_only: spec.read_only,
            cache,
            backing_dirs: spec.backing_dirs.clone(),
            ..OpenOptions::default()
        })
    };
    if spec.format.is_none() {
        tracing::warn!(
            image = %spec.shown(),
            "params names no format: probing it (a raw image whose guest writes a qcow2 \
             header would be misread, and a probed image never opens a backing file; prefer \
             aio: or qcow2:)"
        );
    }
    match open(spec.cache) {
        Ok(i) => Ok((i, spec.cache)),
        Err(first) if spec.cache.direct() => match open(CacheMode::WriteBack) {
            Ok(i) => {
                tracing::warn!(
                    image = %spec.shown(),
                    "cannot open with O_DIRECT ({first}); using cache=writeback"
                );
                Ok((i, CacheMode::WriteBack))
            }
            Err(_) => Err(Error::Image {
                path: spec.shown().into(),
                error: first,
            }),
        },
        Err(e) => Err(Error::Image {
            path: spec.shown().into(),
            error: e,
        }),
    }
}

/// `<dom>/<dev>` of a watch event under `<watched>` (`None` for the type directory itself
/// or a domain directory: rescan).
fn parse_event_path(watched: &str, path: &str) -> Option<(DomId, u32)> {
    let rest = path.strip_prefix(watched)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let dom = parts.next()?.parse().ok()?;
    let dev = parts.next()?.parse().ok()?;
    Some((dom, dev))
}

/// After a device stopped: if the toolstack has removed the backend directory (its
/// `frontend` node is gone) but the stopping device wrote into it again (`state`), removes
/// what was recreated, and the parents left empty, up to the backend directory.
pub(crate) fn cleanup_leftovers(xs: &Client, be: &str) {
    let r = xs.transaction(|tx| {
        match tx.read(&format!("{be}/frontend")) {
            Ok(_) => return Ok(()),
            Err(e) if e.errno() == Some(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        match tx.read(be) {
            Ok(_) => crate::attach::rm_with_empty_parents(tx, be),
            Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    });
    if let Err(e) = r {
        tracing::debug!(%be, "cleanup of a removed backend directory: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_paths() {
        let w = "/local/domain/0/backend/qdisk";
        assert_eq!(parse_event_path(w, w), None);
        assert_eq!(parse_event_path(w, &format!("{w}/5")), None);
        assert_eq!(parse_event_path(w, &format!("{w}/5/768")), Some((5, 768)));
        assert_eq!(
            parse_event_path(w, &format!("{w}/5/768/state")),
            Some((5, 768))
        );
        assert_eq!(parse_event_path(w, &format!("{w}x/5/768")), None);
        assert_eq!(parse_event_path(w, &format!("{w}/-1/768")), None);
        assert_eq!(parse_event_path(w, &format!("{w}/99999/768")), None);
        assert_eq!(parse_event_path(w, &format!("{w}/5/abc")), None);
    }
}
