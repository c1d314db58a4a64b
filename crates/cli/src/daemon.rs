//! `xdisk serve`, `xdisk attach`, `xdisk detach`, `xdisk stat` and `xdisk qemu-shim`: the
//! command-line side of the xdisk-daemon crate.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use xdisk_backend::DeviceStats;
use xdisk_daemon::attach::{self, AttachOptions};
use xdisk_daemon::control::{self, ControlServer, DEFAULT_SOCKET};
use xdisk_daemon::dm;
use xdisk_daemon::metrics::MetricsServer;
use xdisk_daemon::params::ParamsDefaults;
use xdisk_daemon::platform::PlatformKind;
use xdisk_daemon::qemu::{QemuArgs, QmpServer, QmpState};
use xdisk_daemon::simguest::SimGuest;
use xdisk_daemon::status::DaemonStatus;
use xdisk_daemon::{Platform, Supervisor, SupervisorConfig};
use xdisk_image::{CacheMode, Format};
use xdisk_xen::xenstore::Client;
use xdisk_xensim::SimXen;

#[derive(Args)]
pub struct ServeArgs {
    /// `xen`: this domain's xenstore, /dev/xen/gntdev and /dev/xen/evtchn. `sim`: an
    /// all-in-one demo on the simulation (its own xenstored and simulated guests).
    #[arg(long, default_value = "xen")]
    platform: PlatformKind,
    /// Backend type to serve, under /local/domain/<own domid>/backend/<type> (repeatable).
    /// `qdisk` is what libxl writes for backendtype=qdisk; `xdisk` is private to
    /// `xdisk attach`.
    #[arg(long = "backend-type", default_values_t = vec!["qdisk".to_string()])]
    backend_types: Vec<String>,
    /// Serve only these frontend domains (repeatable; default: all). `--domain 0` replaces
    /// the QEMU that Debian starts as dom0's disk backend.
    #[arg(long = "domain")]
    domains: Vec<u16>,
    /// The control socket (for `xdisk stat`, `xdisk attach`).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    /// Accepted for compatibility: xdisk never forks; it always runs in the foreground
    /// (under systemd, `Type=notify`).
    #[arg(long)]
    foreground: bool,
    /// Host cache mode for every disk, overriding `direct-io-safe` (none, directsync,
    /// writethrough, writeback, unsafe).
    #[arg(long)]
    cache: Option<CacheMode>,
    /// Queues (rings) offered per device.
    #[arg(long)]
    max_queues: Option<u32>,
    /// Busy-poll each queue's completions and ring for up to this many microseconds before
    /// it sleeps (0: never; at most 10000), as QEMU's iothread poll-max-ns: lower latency at
    /// low queue depth for a CPU that spins while a disk is busy. `xdisk stat --json` counts
    /// the windows that paid (poll_hits) and those that did not (poll_misses).
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = poll_us_parser())]
    poll_us: u32,
    /// On the simulation: guest domains to create, each with a blkfront that connects to
    /// the disks given to it (the first one is where `xdisk attach` attaches).
    #[arg(long = "sim-guest", default_values_t = vec![1u16])]
    sim_guests: Vec<u16>,
    /// Do not register as this domain's device model. By default, serving `qdisk` disks of
    /// its own domain, xdisk writes /local/domain/<own domid>/image/device-model-pid (unless a
    /// live process, e.g. a QEMU, is registered there): libxl's `xl block-attach 0
    /// 'backendtype=qdisk,...'` refuses to add a disk without it.
    #[arg(long)]
    no_dm_registration: bool,
    /// Backing files of served images must lie in one of these directories (comma
    /// separated; symbolic links resolved). Default: anywhere (regular files and block
    /// devices outside /proc and /sys; a probed image never opens one).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: 127.0.0.1:PORT).
    /// Default: off.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    metrics: Option<SocketAddr>,
}

/// `ADDR:PORT`, `[v6]:PORT`, `:PORT` or `PORT` (the last two on 127.0.0.1).
fn parse_metrics_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let t = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse::<SocketAddr>()
        .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT or PORT)"))
}

#[derive(Args)]
pub struct AttachArgs {
    /// The image (raw or qcow2): a file or block device, an NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbd:unix:PATH) or an RBD image
    /// (rbd:POOL/IMAGE[:KEY=VALUE...]), which the daemon then opens.
    image: String,
    /// The image format (default: probed once, here, and written explicitly; a probed qcow2
    /// that names a backing file is refused: give --format qcow2).
    #[arg(long)]
    format: Option<Format>,
    #[arg(long)]
    read_only: bool,
    /// Device number or name (51728, xvdb), or `auto` for the first free one.
    #[arg(long, default_value = "auto")]
    devid: String,
    /// Backend type (default: `xdisk` if the daemon serves it, else `qdisk`).
    #[arg(long)]
    backend_type: Option<String>,
    /// Write direct-io-safe=1: the daemon opens the image with O_DIRECT (cache=none).
    #[arg(long)]
    direct_io: bool,
    /// Do not offer discard to the frontend.
    #[arg(long)]
    no_discard: bool,
    /// Seconds to wait for the frontend to connect.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    /// The frontend domain (default: what the daemon says, 0 on Xen).
    #[arg(long, hide = true)]
    frontend_domid: Option<u16>,
}

#[derive(Args)]
pub struct DetachArgs {
    /// The device: xvdb, /dev/xvdb or its number (51728).
    device: String,
    /// Seconds to wait for the backend to close and the daemon to close the image.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Remove the nodes even if the backend does not close in time.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
    #[arg(long, hide = true)]
    frontend_domid: Option<u16>,
}

#[derive(Args)]
pub struct StatArgs {
    /// One device: qdisk/5/51712, 5/51712, xvda, 51712 or its backend path.
    device: Option<String>,
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// Report every SECS seconds (default 1) until Ctrl-C, like `iostat -x`: per device
    /// r/s, w/s, rMB/s, wMB/s, r_await and w_await (ms, mean latency from consumption to
    /// response over the interval), aqu-sz (mean requests in flight, from the latency sums)
    /// in-flight now and %util (the share of the interval with a request in flight).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1",
          conflicts_with = "json")]
    watch: Option<f64>,
    /// With --watch: stop after N reports.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    control: PathBuf,
}

#[derive(Args)]
pub struct QemuShimArgs {
    /// The QEMU command line libxl passes (-xen-domid N -chardev ... -machine xenpv ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `--poll-us`'s values: 0 to [`xdisk_backend::MAX_POLL_US`].
pub(crate) fn poll_us_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(0..=i64::from(xdisk_backend::MAX_POLL_US))
}

/// What the daemon's options change in each device's configuration (none: the defaults).
fn device_hook(
    max_queues: Option<u32>,
    poll_us: u32,
) -> Option<xdisk_daemon::supervisor::DeviceHook> {
    (max_queues.is_some() || poll_us > 0).then(|| {
        Arc::new(move |c: &mut xdisk_backend::DeviceConfig, _: &_| {
            if let Some(q) = max_queues {
                c.max_queues = q;
            }
            c.poll_us = poll_us;
        }) as xdisk_daemon::supervisor::DeviceHook
    })
}

/// Tells systemd (Type=notify) something, if it listens.
pub(crate) fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Waits for SIGTERM/SIGINT/SIGHUP, or until `alive` says no (then returns false).
fn wait_for_signal(
    signals: &mut Signals,
    mut alive: impl FnMut() -> bool,
    quit: Option<&mpsc::Receiver<()>>,
) -> Result<bool> {
    loop {
        if let Some(sig) = signals.pending().next() {
            tracing::info!(signal = sig, "stopping");
            return Ok(true);
        }
        if quit.is_some_and(|q| q.try_recv().is_ok()) {
            tracing::info!("QMP quit: stopping");
            return Ok(true);
        }
        if !alive() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The signals that stop the daemon, caught from the start: a SIGTERM that arrives while it
/// starts (systemd stopping it right after READY=1, libxl destroying a domain) must still
/// lead to a clean stop, not the default action.
fn stop_signals() -> Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGHUP]).context("signal handlers")
}

pub fn serve(a: ServeArgs) -> Result<i32> {
    let _ = a.foreground;
    let mut signals = stop_signals()?;
    let mut sim: Option<Arc<SimXen>> = None;
    let mut guests = Vec::new();
    let platform = match a.platform {
        PlatformKind::Xen => Platform::xen().context(
            "cannot use real Xen (run in dom0 with xenfs mounted, xenstored running and the \
             xen-gntdev and xen-evtchn modules loaded; for a demo without Xen: --platform=sim)",
        )?,
        PlatformKind::Sim => {
            let xen = SimXen::new().context("starting the simulation")?;
            sim = Some(xen.clone());
            Platform::sim(&xen, 0)?
        }
    };
    let (max_queues, poll_us) = (a.max_queues, a.poll_us);
    let cfg = SupervisorConfig {
        backend_types: a.backend_types.clone(),
        domains: (!a.domains.is_empty()).then(|| a.domains.clone()),
        params: ParamsDefaults {
            cache_override: a.cache,
            backing_dirs: a.backing_dirs.clone(),
        },
        device_hook: device_hook(max_queues, poll_us),
        ..SupervisorConfig::default()
    };
    let sup = Arc::new(Supervisor::start(cfg, platform).context("starting the supervisor")?);
    if let Some(xen) = &sim {
        for &d in &a.sim_guests {
            guests.push(SimGuest::start(xen, d).with_context(|| format!("sim guest {d}"))?);
        }
    }
    let attach_domid = if sim.is_some() {
        a.sim_guests.first().copied().unwrap_or(0)
    } else {
        sup.platform().domid
    };
    let s2 = sup.clone();
    let status = Arc::new(move || {
        let mut s = s2.status();
        s.attach_frontend_domid = attach_domid;
        s
    });
    let live: Arc<dyn control::LiveOps> = sup.clone();
    let server = ControlServer::start_with(&a.control, status.clone(), Some(live))?;
    let metrics = match a.metrics {
        Some(addr) => {
            let m = MetricsServer::start(addr, status)?;
            tracing::info!(address = %m.local_addr(), "metrics on http://{}/metrics", m.local_addr());
            Some(m)
        }
        None => None,
    };
    let own = sup.platform().domid;
    let serves_own_qdisk = a.backend_types.iter().any(|t| t == "qdisk")
        && (a.domains.is_empty() || a.domains.contains(&own));
    let dm_registration = if serves_own_qdisk && !a.no_dm_registration {
        match dm::register(&sup.platform().xs, own, std::process::id()) {
            Ok((dm::Outcome::Registered, reg)) => {
                tracing::info!(
                    path = dm::pid_path(own),
                    "registered as this domain's device model (for xl block-attach {own} ... backendtype=qdisk)"
                );
                reg
            }
            Ok((dm::Outcome::Other(pid), _)) => {
                tracing::warn!(
                    pid,
                    path = dm::pid_path(own),
                    "another process is registered as this domain's device model (a QEMU?): \
                     both may race for backend/qdisk/{own}"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not register as this domain's device model");
                None
            }
        }
    } else {
        None
    };
    if let Some(xen) = &sim {
        println!(
            "xdisk serve: simulated Xen; xenstored {}; guests {:?}; control {}",
            xen.xenstore_path().display(),
            a.sim_guests,
            a.control.display()
        );
    }
    tracing::info!(control = %a.control.display(), platform = a.platform.as_str(), "serving");
    sd_notify("READY=1");
    let clean = wait_for_signal(&mut signals, || sup.is_running(), None)?;
    sd_notify("STOPPING=1");
    if let Some(r) = dm_registration {
        if let Err(e) = r.release() {
            tracing::warn!(error = %e, "could not remove the device-model registration");
        }
    }
    drop(metrics);
    drop(server);
    drop(guests);
    match Arc::try_unwrap(sup) {
        Ok(s) => s.shutdown(),
        Err(s) => drop(s),
    }
    drop(sim);
    if clean {
        Ok(0)
    } else {
        eprintln!("xdisk serve: the supervisor stopped (xenstore connection lost?)");
        Ok(1)
    }
}

fn daemon_status(control: &Path) -> Result<DaemonStatus> {
    Ok(control::status(control)?)
}

fn xenstore_for(status: &DaemonStatus) -> Result<Client> {
    match &status.xenstore_path {
        Some(p) => Client::connect(p).with_context(|| format!("xenstore at {p}")),
        None => Client::open().context("cannot reach xenstore"),
    }
}

fn dev_node_exists(name: &str) -> bool {
    Path::new("/dev").join(name).exists()
}

pub fn attach(a: AttachArgs) -> Result<i32> {
    let status = daemon_status(&a.control)?;
    let fe = a.frontend_domid.unwrap_or(status.attach_frontend_domid);
    let t = match &a.backend_type {
        Some(t) => t.clone(),
        None if status.serves("xdisk", fe) => "xdisk".into(),
        None => "qdisk".into(),
    };
    if !status.serves(&t, fe) {
        bail!(
            "the daemon (pid {}) does not serve backend type {t} for domain {fe} (it serves \
             {:?}{}); restart it with --backend-type {t}",
            status.pid,
            status.backend_types,
            status
                .domains
                .as_ref()
                .map(|d| format!(" for domains {d:?}"))
                .unwrap_or_default()
        );
    }
    let devid = match a.devid.as_str() {
        "auto" => None,
        d => Some(
            xdisk_daemon::devid::parse_device(d)
                .ok_or_else(|| anyhow!("--devid {d:?}: expected a number, an xvd name or auto"))?,
        ),
    };
    let real = status.platform == "xen";
    let source = xdisk_image::DiskSource::parse(&a.image, None)?;
    let mut opts = AttachOptions::of(source.location, t);
    opts.format = a.format;
    opts.read_only = a.read_only;
    opts.devid = devid;
    opts.backend_domid = status.backend_domid;
    opts.frontend_domid = fe;
    opts.direct_io_safe = a.direct_io;
    opts.discard = !a.no_discard;
    if real {
        opts.skip = dev_node_exists;
    }
    let xs = xenstore_for(&status)?;
    let att = attach::attach(&xs, &opts, Duration::from_secs(a.timeout))?;
    let vdev = att.vdev.clone().unwrap_or_else(|| att.devid.to_string());
    if real && fe == status.backend_domid {
        let node = Path::new("/dev").join(&vdev);
        let until = Instant::now() + Duration::from_secs(5);
        while !node.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if node.exists() {
            println!("{}", node.display());
        } else {
            println!(
                "{vdev} (connected; {} has not appeared yet)",
                node.display()
            );
        }
    } else {
        println!(
            "{vdev} (devid {}): frontend {} Connected ({} platform: no /dev node here)",
            att.devid, fe, status.platform
        );
    }
    Ok(0)
}

pub fn detach(a: DetachArgs) -> Result<i32> {
    let status = match daemon_status(&a.control) {
        Ok(s) => s,
        Err(e) if a.force => {
            eprintln!(
                "xdisk detach: {}; removing the nodes anyway (--force)",
                crate::error_text(&e)
            );
            DaemonStatus {
                pid: 0,
                version: String::new(),
                platform: "xen".into(),
                backend_domid: 0,
                backend_types: Vec::new(),
                domains: None,
                attach_frontend_domid: 0,
                xenstore_path: None,
                devices: Vec::new(),
            }
        }
        Err(e) => return Err(e),
    };
    let fe = a.frontend_domid.unwrap_or(status.attach_frontend_domid);
    let xs = xenstore_for(&status)?;
    let att = attach::find(&xs, fe, &a.device)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    attach::detach(&xs, &att, Duration::from_secs(a.timeout), a.force)?;
    if status.pid != 0 {
        match wait_image_closed(&a.control, &att.backend_path, deadline) {
            Err(e) if a.force => eprintln!("xdisk detach: {}", crate::error_text(&e)),
            r => r?,
        }
    }
    println!(
        "detached {}",
        att.vdev.clone().unwrap_or_else(|| att.devid.to_string())
    );
    Ok(0)
}

/// After the backend reached Closed the daemon still writes the image's metadata back and
/// closes it: waits until it has (the device is no longer listed, or listed as failed), so
/// that whatever comes after `xdisk detach` (stopping the daemon, even with SIGKILL, copying
/// or checking the image) finds the image closed. A daemon that stops answering has nothing
/// open any more.
fn wait_image_closed(control: &Path, backend_path: &str, deadline: Instant) -> Result<()> {
    loop {
        let Ok(status) = daemon_status(control) else {
            return Ok(());
        };
        let open = status.devices.iter().any(|d| {
            d.backend_path == backend_path && d.phase != xdisk_daemon::status::Phase::Failed
        });
        if !open {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the frontend and backend closed, but the daemon has not closed the image of \
                 {backend_path} yet (see xdisk stat)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stat(a: StatArgs) -> Result<i32> {
    if let Some(secs) = a.watch {
        return stat_watch(&a, secs);
    }
    let mut status = daemon_status(&a.control)?;
    if let Some(q) = &a.device {
        status.devices.retain(|d| d.matches(q));
        if status.devices.is_empty() {
            bail!("no device {q:?} (xdisk stat lists them all)");
        }
    }
    if a.json {
        if a.device.is_some() {
            println!("{}", serde_json::to_string_pretty(&status.devices)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        return Ok(0);
    }
    if a.device.is_none() {
        println!(
            "xdisk daemon pid {} ({} platform), backend domain {}, types {:?}, domains {}, {} device(s)",
            status.pid,
            status.platform,
            status.backend_domid,
            status.backend_types,
            status
                .domains
                .as_ref()
                .map_or("all".to_string(), |d| format!("{d:?}")),
            status.devices.len()
        );
    }
    for d in &status.devices {
        print!("{}", d.render());
    }
    Ok(0)
}

pub fn qemu_shim(a: QemuShimArgs) -> Result<i32> {
    let mut signals = stop_signals()?;
    let qa = QemuArgs::parse(&a.args)?;
    for u in &qa.unsupported {
        tracing::warn!(
            domid = qa.domid,
            "ignored (not provided by the xdisk qemu-shim): {u}"
        );
    }
    let platform = Platform::xen().context("the qemu-shim runs in dom0 on real Xen")?;
    let own = platform.domid;
    let xs = platform.xs.clone();
    // XDISK_SHIM_SERVE=0: the disks are served by a central `xdisk serve` watching
    // backend/qdisk for every domain; the shim only satisfies libxl.
    let serve_here = std::env::var("XDISK_SHIM_SERVE").map_or(true, |v| v != "0");
    let sup = if serve_here {
        // libxl gives the shim QEMU's command line: the backing-file policy comes from the
        // environment (dist/xen/xdisk-qemu-shim reads /etc/default/xdisk).
        let backing_dirs = std::env::var(xdisk_daemon::params::BACKING_DIRS_ENV)
            .map(|v| xdisk_daemon::params::parse_dir_list(&v))
            .unwrap_or_default();
        if !backing_dirs.is_empty() {
            tracing::info!(domid = qa.domid, ?backing_dirs, "backing files confined");
        }
        // XDISK_POLL_US: as `xdisk serve --poll-us` (unset or 0: no polling).
        let poll_us = match std::env::var("XDISK_POLL_US") {
            Ok(v) => v.trim().parse::<u32>().map_or_else(
                |_| {
                    tracing::warn!(value = %v, "XDISK_POLL_US is not a number of microseconds: no polling");
                    0
                },
                |us| us.min(xdisk_backend::MAX_POLL_US),
            ),
            Err(_) => 0,
        };
        let cfg = SupervisorConfig {
            backend_types: vec!["qdisk".into()],
            domains: Some(vec![qa.domid]),
            params: ParamsDefaults {
                backing_dirs,
                ..ParamsDefaults::default()
            },
            device_hook: device_hook(None, poll_us),
            ..SupervisorConfig::default()
        };
        Some(Supervisor::start(cfg, platform)?)
    } else {
        let st = daemon_status(Path::new(DEFAULT_SOCKET))
            .context("XDISK_SHIM_SERVE=0 needs a running `xdisk serve`")?;
        if !st.serves("qdisk", qa.domid) {
            bail!(
                "XDISK_SHIM_SERVE=0, but the running daemon does not serve qdisk disks of \
                 domain {}",
                qa.domid
            );
        }
        None
    };
    let (quit_tx, quit_rx) = mpsc::channel();
    let qmp = QmpServer::start(&qa.qmp, QmpState::new(qa.paused, Some(quit_tx)))?;
    if let Some(p) = &qa.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("pidfile {}", p.display()))?;
    }
    if !qa.paused {
        // What QEMU writes once it runs; libxl waits for it.
        let p = format!("/local/domain/{own}/device-model/{}/state", qa.domid);
        xs.write(&p, "running").with_context(|| p.clone())?;
    }
    tracing::info!(domid = qa.domid, name = ?qa.name, "qemu-shim serving the domain's qdisk disks");
    let clean = wait_for_signal(
        &mut signals,
        || sup.as_ref().is_none_or(|s| s.is_running()),
        Some(&quit_rx),
    )?;
    drop(qmp);
    if let Some(s) = sup {
        s.shutdown();
    }
    if let Some(p) = &qa.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(if clean { 0 } else { 1 })
}

/// `xdisk stat --watch`: a report every `secs` seconds, each on the interval before it (the
/// first one after `secs` seconds: no report of totals since start).
fn stat_watch(a: &StatArgs, secs: f64) -> Result<i32> {
    if !(secs.is_finite() && secs >= 0.1) {
        bail!("--watch: the interval must be at least 0.1 seconds");
    }
    let interval = Duration::from_secs_f64(secs);
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("signal handlers")?;
    let fetch = || -> Result<DaemonStatus> {
        let mut status = daemon_status(&a.control)?;
        if let Some(q) = &a.device {
            status.devices.retain(|d| d.matches(q));
        }
        Ok(status)
    };
    let mut prev = (Instant::now(), fetch()?);
    let mut printed = 0u64;
    loop {
        let until = Instant::now() + interval;
        while Instant::now() < until {
            if signals.pending().next().is_some() {
                return Ok(0);
            }
            std::thread::sleep(
                Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
            );
        }
        let status = fetch()?;
        let now = Instant::now();
        print!(
            "{}",
            watch_report(now.duration_since(prev.0), &prev.1, &status)
        );
        std::io::Write::flush(&mut std::io::stdout()).ok();
        printed += 1;
        if a.count.is_some_and(|n| printed >= n) {
            return Ok(0);
        }
        prev = (now, status);
    }
}

/// One `--watch` report: rates over the interval `dt` since `prev` (a device new since then
/// counts from zero).
fn watch_report(dt: Duration, prev: &DaemonStatus, status: &DaemonStatus) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "\n{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6}\n",
        "Device",
        "r/s",
        "w/s",
        "rMB/s",
        "wMB/s",
        "r_await",
        "w_await",
        "aqu-sz",
        "inflight",
        "%util"
    );
    let dt = dt.as_secs_f64().max(1e-3);
    let zero = DeviceStats::default();
    for d in &status.devices {
        let c = &d.counters;
        let b = prev
            .devices
            .iter()
            .find(|x| x.name == d.name)
            .map_or(&zero, |x| &x.counters);
        let rate = |now: u64, was: u64| -> f64 { now.saturating_sub(was) as f64 / dt };
        let await_ms = |sum: u64, sum0: u64, n: u64, n0: u64| -> f64 {
            let n = n.saturating_sub(n0);
            if n == 0 {
                0.0
            } else {
                sum.saturating_sub(sum0) as f64 / n as f64 / 1000.0
            }
        };
        let lat_sum = |c: &DeviceStats| {
            c.rd_lat
                .sum_us
                .saturating_add(c.wr_lat.sum_us)
                .saturating_add(c.f_lat.sum_us)
        };
        // Little's law: time spent by requests in the interval / the interval.
        let aqu = lat_sum(c).saturating_sub(lat_sum(b)) as f64 / 1e6 / dt;
        let name = d
            .vdev
            .as_deref()
            .map_or(d.name.clone(), |v| format!("{} ({v})", d.name));
        let _ = writeln!(
            out,
            "{:<24} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7.2} {:>8} {:>6.1}",
            name,
            rate(c.rd_req, b.rd_req),
            rate(c.wr_req, b.wr_req),
            rate(c.rd_sect, b.rd_sect) * 512.0 / 1e6,
            rate(c.wr_sect, b.wr_sect) * 512.0 / 1e6,
            await_ms(
                c.rd_lat.sum_us,
                b.rd_lat.sum_us,
                c.rd_lat.count,
                b.rd_lat.count
            ),
            await_ms(
                c.wr_lat.sum_us,
                b.wr_lat.sum_us,
                c.wr_lat.count,
                b.wr_lat.count
            ),
            aqu,
            c.in_flight,
            // Busy time over the interval, as iostat's %util (at most 100).
            (rate(c.busy_us, b.busy_us) / 1e4).min(100.0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use xdisk_daemon::status::{DeviceStatus, Phase};

    fn status(c: DeviceStats) -> DaemonStatus {
        DaemonStatus {
            pid: 1,
            version: "0".into(),
            platform: "sim".into(),
            backend_domid: 0,
            backend_types: vec!["qdisk".into()],
            domains: None,
            attach_frontend_domid: 0,
            xenstore_path: None,
            devices: vec![DeviceStatus {
                name: "qdisk/1/51712".into(),
                backend_type: "qdisk".into(),
                frontend_domid: 1,
                devid: 51712,
                vdev: Some("xvda".into()),
                backend_path: String::new(),
                frontend_path: None,
                image: None,
                format: None,
                chain: Vec::new(),
                read_only: false,
                cache: None,
                phase: Phase::Running,
                xenbus_state: None,
                size: None,
                error: None,
                counters: c,
            }],
        }
    }

    #[test]
    fn watch_report_rates_and_await() {
        let before = status(DeviceStats::default());
        let mut c = DeviceStats {
            rd_req: 200,
            rd_sect: 4096,
            wr_req: 10,
            in_flight: 3,
            busy_us: 1_500_000, // busy 1.5 s of 2
            ..DeviceStats::default()
        };
        c.rd_lat.count = 200;
        c.rd_lat.sum_us = 100_000; // 0.5 ms each
        c.wr_lat.count = 10;
        c.wr_lat.sum_us = 20_000; // 2 ms each
        let r = watch_report(Duration::from_secs(2), &before, &status(c));
        let line = r
            .lines()
            .find(|l| l.starts_with("qdisk/1/51712 (xvda)"))
            .unwrap();
        let f: Vec<&str> = line.split_whitespace().skip(2).collect();
        // r/s w/s rMB/s wMB/s r_await w_await aqu-sz inflight %util
        assert_eq!(
            f,
            ["100.0", "5.0", "1.05", "0.00", "0.50", "2.00", "0.06", "3", "75.0"],
            "{r}"
        );
        assert!(r.contains("r_await"), "{r}");
    }
}
