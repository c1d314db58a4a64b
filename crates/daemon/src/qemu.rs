//! A stand-in for QEMU as libxl starts it for a PV guest's `qdisk` disks.
//!
//! libxl starts a per-domain QEMU ("device model") for a PV guest when
//! `libxl__need_xenpv_qemu` says so: a `qdisk` disk (or a vfb, 9pfs, or a channel) whose
//! backend is the toolstack's domain. The binary is `device_model_override` when set
//! (`libxl__domain_device_model`), else QEMU. libxl then (tools/libs/light/libxl_dm.c,
//! `libxl__spawn_local_dm`):
//!
//! * passes `-xen-domid <domid> -no-shutdown -chardev socket,id=libxl-cmd,path=
//!   /run/xen/qmp-libxl-<domid>,server=on,wait=off -mon chardev=libxl-cmd,mode=control
//!   -chardev socket,id=libxenstat-cmd,path=...  -mon ... -nodefaults -no-user-config
//!   -xen-attach -name <name> ... -machine xenpv -m <MiB>`; with `dm_restrict` the QMP
//!   socket is pre-opened and passed as `fd=<n>` together with `-S`;
//! * waits for `/local/domain/0/device-model/<domid>/state` = `running` (or, with the
//!   pre-opened socket, for QMP `query-status` to say `prelaunch`);
//! * then asks QMP `query-chardev` (and `query-vnc` when the guest has a vfb);
//! * on destroy removes `device-model/<domid>` and kills the process (by pid, from
//!   `/local/domain/<domid>/image/device-model-pid`, or by uid), then removes the QMP sockets.
//!
//! [`QemuArgs::parse`] reads that command line; [`QmpServer`] answers the few QMP commands
//! libxl sends. The disks themselves are served by a [`crate::Supervisor`] restricted to the
//! domain (`backend/qdisk/<domid>/*`), as QEMU's xen-bus serves only its `-xen-domid`.

use std::cell::Cell;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use xdisk_xen::platform::DomId;

use crate::error::{Error, Result};

/// The QEMU version announced on QMP (Debian 12's QEMU, what libxl 4.17 is used with).
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// Where a QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEndpoint {
    /// `path=...,server=on`: a socket to create.
    Path(PathBuf),
    /// `fd=N`: a socket libxl pre-opened (with `dm_restrict`).
    Fd(i32),
}

/// What matters of QEMU's command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// `-xen-domid`: the guest whose `qdisk` disks are served (required).
    pub domid: DomId,
    /// `-name`: the guest's name (for the log).
    pub name: Option<String>,
    /// QMP monitors (`-mon chardev=X,mode=control` over `-chardev socket,id=X,...`).
    pub qmp: Vec<QmpEndpoint>,
    /// `-S`: start paused (`query-status` says `prelaunch` until `cont`).
    pub paused: bool,
    /// `-xen-attach`: the domain already exists (libxl always passes it; nothing to do).
    pub xen_attach: bool,
    /// `-machine` (or `-M`): only `xenpv` is accepted, PV guests being all the shim serves.
    pub machine: Option<String>,
    /// `-pidfile`: where `xdisk qemu-shim` writes its pid once QMP listens (removed on exit).
    pub pidfile: Option<PathBuf>,
    /// Options understood but not acted upon (devices the shim does not provide).
    pub unsupported: Vec<String>,
}

/// Options of QEMU that take no value (the others take exactly one).
const FLAGS: &[&str] = &[
    "-xen-attach",
    "-nographic",
    "-nodefaults",
    "-no-user-config",
    "-S",
    "-daemonize",
    "-no-shutdown",
    "-no-reboot",
    "-usb",
    "-enable-kvm",
    "-snapshot",
    "-xen-domid-restrict",
];

fn opts(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect()
}

impl QemuArgs {
    /// Parses the arguments (without the program name).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<QemuArgs> {
        let mut a = QemuArgs::default();
        let mut domid = None;
        let mut chardevs: Vec<(String, QmpEndpoint)> = Vec::new();
        let mut monitors: Vec<String> = Vec::new();
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(arg) = it.next() {
            // QEMU accepts --opt as -opt.
            let opt = if arg.starts_with("--") {
                &arg[1..]
            } else {
                arg
            };
            if !opt.starts_with('-') {
                return Err(Error::Invalid(format!("unexpected argument {arg:?}")));
            }
            if FLAGS.contains(&opt) {
                match opt {
                    "-S" => a.paused = true,
                    "-xen-attach" => a.xen_attach = true,
                    "-daemonize" => a.unsupported.push(opt.into()),
                    _ => {}
                }
                continue;
            }
            let val = it
                .next()
                .ok_or_else(|| Error::Invalid(format!("{arg} needs a value")))?;
            match opt {
                "-xen-domid" => {
                    domid = Some(val.parse::<DomId>().map_err(|_| {
                        Error::Invalid(format!("-xen-domid: invalid domain {val:?}"))
                    })?)
                }
                "-name" => a.name = Some(opts(val)[0].0.to_owned()),
                "-M" | "-machine" => a.machine = Some(opts(val)[0].0.to_owned()),
                "-pidfile" => a.pidfile = Some(PathBuf::from(val)),
                "-chardev" => {
                    let o = opts(val);
                    if o[0].0 != "socket" {
                        continue;
                    }
                    let get = |k: &str| o.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
                    let Some(id) = get("id") else { continue };
                    let ep =
                        if let Some(p) = get("path") {
                            QmpEndpoint::Path(PathBuf::from(p))
                        } else if let Some(fd) = get("fd") {
                            QmpEndpoint::Fd(fd.parse().map_err(|_| {
                                Error::Invalid(format!("-chardev: invalid fd {fd:?}"))
                            })?)
                        } else {
                            continue;
                        };
                    chardevs.push((id.to_owned(), ep));
                }
                "-mon" => {
                    let o = opts(val);
                    let get = |k: &str| o.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
                    if get("mode") == Some("control") {
                        if let Some(c) = get("chardev") {
                            monitors.push(c.to_owned());
                        }
                    }
                }
                "-vnc" | "-display" | "-monitor" | "-serial" | "-parallel"
                    if matches!(val, "none" | "/dev/null") => {}
                "-m"
                | "-D"
                | "-k"
                | "-smp"
                | "-runas"
                | "-chroot"
                | "-sandbox"
                | "-global"
                | "-xen-domid-restrict"
                | "-trace"
                | "-d"
                | "-vnc"
                | "-display"
                | "-monitor"
                | "-serial"
                | "-parallel" => {
                    if matches!(opt, "-vnc" | "-serial" | "-parallel") {
                        a.unsupported.push(format!("{opt} {val}"));
                    }
                }
                _ => a.unsupported.push(format!("{opt} {val}")),
            }
        }
        a.domid = domid.ok_or_else(|| Error::Invalid("no -xen-domid".into()))?;
        if let Some(m) = &a.machine {
            if m != "xenpv" {
                return Err(Error::Unsupported(format!(
                    "machine {m:?}: the xdisk qemu-shim serves PV guests only (-machine xenpv); \
                     HVM guests need QEMU's device emulation"
                )));
            }
        }
        for m in monitors {
            if let Some((_, ep)) = chardevs.iter().find(|(id, _)| *id == m) {
                a.qmp.push(ep.clone());
            }
        }
        Ok(a)
    }
}

/// What the QMP server shares with its owner.
#[derive(Debug)]
pub struct QmpState {
    paused: AtomicBool,
    /// Told when a client asks to `quit`.
    quit: Mutex<Option<Sender<()>>>,
}

impl QmpState {
    /// The state of a shim started paused (`-S`) or not; `quit` is told when a client sends
    /// `quit`.
    pub fn new(paused: bool, quit: Option<Sender<()>>) -> Arc<QmpState> {
        Arc::new(QmpState {
            paused: AtomicBool::new(paused),
            quit: Mutex::new(quit),
        })
    }

    /// `query-status`'s `status`.
    pub fn status(&self) -> &'static str {
        if self.paused.load(Ordering::SeqCst) {
            "prelaunch"
        } else {
            "running"
        }
    }
}

/// The QMP greeting.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
        "package": "xdisk qemu-shim"}, "capabilities": []}})
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "query-version",
    "query-commands",
    "query-chardev",
    "query-vnc",
    "cont",
    "stop",
    "quit",
];

/// The answer to one QMP command (`None`: no answer, e.g. an event-only message).
pub fn answer(state: &QmpState, msg: &Value) -> Option<Value> {
    let id = msg.get("id").cloned();
    let with_id = |mut v: Value| {
        if let Some(id) = &id {
            v["id"] = id.clone();
        }
        v
    };
    let Some(cmd) = msg.get("execute").and_then(Value::as_str) else {
        return Some(with_id(json!({"error": {"class": "GenericError",
            "desc": "QMP input must be an object with an 'execute' member"}})));
    };
    let ret = match cmd {
        "qmp_capabilities" | "cont" | "stop" | "quit" => {
            match cmd {
                "cont" => state.paused.store(false, Ordering::SeqCst),
                "stop" => state.paused.store(true, Ordering::SeqCst),
                "quit" => {
                    if let Some(tx) = state.quit.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
            json!({})
        }
        "query-status" => {
            let s = state.status();
            json!({"status": s, "running": s == "running", "singlestep": false})
        }
        "query-version" => {
            let (major, minor, micro) = QEMU_VERSION;
            json!({"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": "xdisk qemu-shim"})
        }
        "query-commands" => Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect()),
        "query-chardev" => json!([]),
        "query-vnc" => json!({"enabled": false}),
        other if other.starts_with("xen-") => {
            return Some(with_id(json!({"error": {"class": "GenericError",
                "desc": format!("{other} is not supported by the xdisk qemu-shim \
                    (no save/restore or migration of PV disks through QEMU)")}})));
        }
        other => {
            return Some(with_id(json!({"error": {"class": "CommandNotFound",
                "desc": format!("The command {other} has not been found")}})));
        }
    };
    Some(with_id(json!({ "return": ret })))
}

/// Longest QMP message accepted (libxl's are a few hundred bytes).
pub const MAX_QMP_MESSAGE: u64 = 64 * 1024;

/// QMP connections served at once per server (libxl uses one or two).
pub const MAX_QMP_CONNECTIONS: usize = 8;

/// A reader that fails once `max` bytes were read since the count was last reset (after
/// each message): a peer cannot make the parser buffer an endless message.
struct Limited<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    max: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.max.saturating_sub(self.count.get());
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("QMP message longer than {} bytes", self.max),
            ));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        self.count.set(self.count.get() + got as u64);
        Ok(got)
    }
}

fn serve_conn(stream: UnixStream, state: &QmpState) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut out = serde_json::to_vec(&greeting()).map_err(std::io::Error::other)?;
    out.extend_from_slice(b"\r\n");
    w.write_all(&out)?;
    let count = Rc::new(Cell::new(0));
    let reader = Limited {
        inner: BufReader::new(stream),
        count: count.clone(),
        max: MAX_QMP_MESSAGE,
    };
    for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        count.set(0);
        let msg = match msg {
            Ok(m) => m,
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) => {
                let v = json!({"error": {"class": "GenericError", "desc": format!("JSON parse error: {e}")}});
                let mut out = serde_json::to_vec(&v).map_err(std::io::Error::other)?;
                out.extend_from_slice(b"\r\n");
                w.write_all(&out)?;
                return Ok(());
            }
        };
        if let Some(reply) = answer(state, &msg) {
            let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
            out.extend_from_slice(b"\r\n");
            w.write_all(&out)?;
        }
    }
    Ok(())
}

/// QMP monitors on unix sockets. Dropping the server removes the socket files.
pub struct QmpServer {
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("paths", &self.paths)
            .finish()
    }
}

impl QmpServer {
    /// Listens on every endpoint. Pre-opened descriptors (`fd=`, libxl's `dm_restrict`) are
    /// refused: adopting a descriptor number is outside safe Rust.
    pub fn start(endpoints: &[QmpEndpoint], state: Arc<QmpState>) -> Result<QmpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = QmpServer {
            paths: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for ep in endpoints {
            let path = match ep {
                QmpEndpoint::Path(p) => p.clone(),
                QmpEndpoint::Fd(fd) => {
                    return Err(Error::Unsupported(format!(
                        "QMP on a pre-opened descriptor (fd={fd}, libxl's dm_restrict) is not \
                         supported by the xdisk qemu-shim; set dm_restrict=0 for this guest"
                    )))
                }
            };
            // Private from the start (0600, bound in a 0700 directory and renamed into
            // place); a stale socket is replaced, anything else refused.
            crate::control::check_socket_path(&path)?;
            let listener = crate::control::bind_private(&path)?;
            server.paths.push(path.clone());
            let (st, stop2) = (state.clone(), stop.clone());
            let conns = Arc::new(AtomicUsize::new(0));
            let t = std::thread::Builder::new()
                .name("xdisk-qmp".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop2.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(s) = conn {
                            if conns.fetch_add(1, Ordering::SeqCst) >= MAX_QMP_CONNECTIONS {
                                conns.fetch_sub(1, Ordering::SeqCst);
                                tracing::warn!("too many QMP connections: one refused");
                                continue;
                            }
                            let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
                            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                            let (st, count) = (st.clone(), conns.clone());
                            // libxl keeps a connection open while it waits: one thread each,
                            // at most MAX_QMP_CONNECTIONS.
                            let spawned = std::thread::Builder::new()
                                .name("xdisk-qmp-conn".into())
                                .spawn(move || {
                                    if let Err(e) = serve_conn(s, &st) {
                                        tracing::debug!("qmp connection: {e}");
                                    }
                                    count.fetch_sub(1, Ordering::SeqCst);
                                });
                            if spawned.is_err() {
                                conns.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
                .map_err(|e| Error::io("cannot start the QMP thread", e))?;
            server.threads.push(t);
        }
        Ok(server)
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake each accept loop with a connection. libxl removes the socket files when it
        // destroys the domain: then nothing can wake that loop, and its thread is left to
        // end with the process instead of being joined.
        for (p, t) in self.paths.iter().zip(self.threads.drain(..)) {
            if UnixStream::connect(p).is_ok() {
                let _ = t.join();
            }
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn libxl_pv_args(domid: u32) -> Vec<String> {
        format!(
            "-xen-domid {domid} -no-shutdown \
             -chardev socket,id=libxl-cmd,path=/run/xen/qmp-libxl-{domid},server=on,wait=off \
             -mon chardev=libxl-cmd,mode=control \
             -chardev socket,id=libxenstat-cmd,path=/run/xen/qmp-libxenstat-{domid},server=on,wait=off \
             -mon chardev=libxenstat-cmd,mode=control \
             -nodefaults -no-user-config -xen-attach -name guest1 -vnc none -display none \
             -nographic -machine xenpv -m 513"
        )
        .split_whitespace()
        .map(String::from)
        .collect()
    }

    #[test]
    fn parses_libxl_pv_command_line() {
        let a = QemuArgs::parse(&libxl_pv_args(7)).unwrap();
        assert_eq!(a.domid, 7);
        assert_eq!(a.name.as_deref(), Some("guest1"));
        assert!(a.xen_attach && !a.paused);
        assert_eq!(
            a.qmp,
            vec![
                QmpEndpoint::Path("/run/xen/qmp-libxl-7".into()),
                QmpEndpoint::Path("/run/xen/qmp-libxenstat-7".into())
            ]
        );
        assert!(a.unsupported.is_empty(), "{:?}", a.unsupported);
        // dm_restrict: a pre-opened descriptor, -S and -xen-domid-restrict (a flag).
        let r = QemuArgs::parse(&[
            "-xen-domid",
            "3",
            "-xen-domid-restrict",
            "-chardev",
            "socket,id=libxl-cmd,fd=19,server=on,wait=off",
            "-S",
            "-mon",
            "chardev=libxl-cmd,mode=control",
            "-machine",
            "xenpv",
        ])
        .unwrap();
        assert_eq!(r.qmp, vec![QmpEndpoint::Fd(19)]);
        assert!(r.paused);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(QemuArgs::parse(&["-machine", "xenpv"]).is_err(), "no domid");
        assert!(QemuArgs::parse(&["-xen-domid", "x"]).is_err());
        assert!(QemuArgs::parse(&["-xen-domid"]).is_err());
        assert!(QemuArgs::parse(&["-xen-domid", "1", "stray"]).is_err());
        let e = QemuArgs::parse(&["-xen-domid", "1", "-machine", "xenfv,max-ram-below-4g=1"])
            .unwrap_err();
        assert!(e.to_string().contains("PV guests only"), "{e}");
        let a =
            QemuArgs::parse(&["-xen-domid", "1", "-vnc", "127.0.0.1:0", "-device", "x"]).unwrap();
        assert_eq!(a.unsupported.len(), 2);
    }

    #[test]
    fn qmp_as_libxl_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp-libxl-7");
        let (tx, rx) = std::sync::mpsc::channel();
        let state = QmpState::new(true, Some(tx));
        let server = QmpServer::start(&[QmpEndpoint::Path(path.clone())], state.clone()).unwrap();
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        let mut next = |r: &mut std::io::BufReader<UnixStream>| -> Value {
            line.clear();
            r.read_line(&mut line).unwrap();
            serde_json::from_str(line.trim()).unwrap()
        };
        let g = next(&mut r);
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
        for (cmd, check) in [
            ("qmp_capabilities", json!({})),
            (
                "query-status",
                json!({"status": "prelaunch", "running": false, "singlestep": false}),
            ),
            ("cont", json!({})),
            ("query-chardev", json!([])),
            ("query-vnc", json!({"enabled": false})),
        ] {
            w.write_all(format!("{{\"execute\":\"{cmd}\",\"id\":42}}\r\n").as_bytes())
                .unwrap();
            let v = next(&mut r);
            assert_eq!(v["return"], check, "{cmd}: {v}");
            assert_eq!(v["id"], 42);
        }
        assert_eq!(state.status(), "running");
        w.write_all(b"{\"execute\":\"device_add\",\"id\":1}")
            .unwrap();
        assert_eq!(next(&mut r)["error"]["class"], "CommandNotFound");
        w.write_all(b"{\"execute\":\"xen-save-devices-state\"}")
            .unwrap();
        assert_eq!(next(&mut r)["error"]["class"], "GenericError");
        w.write_all(b"{\"execute\":\"quit\"}").unwrap();
        assert_eq!(next(&mut r)["return"], json!({}));
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(server);
        assert!(!path.exists());
    }

    fn greeted(path: &std::path::Path) -> Option<std::io::BufReader<UnixStream>> {
        let s = UnixStream::connect(path).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => Some(r),
            _ => None,
        }
    }

    #[test]
    fn qmp_socket_is_private_and_bounded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp-libxl-3");
        let _server = QmpServer::start(
            &[QmpEndpoint::Path(path.clone())],
            QmpState::new(false, None),
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A message that never ends is cut off with an error, not buffered.
        let mut r = greeted(&path).unwrap();
        let mut w = r.get_ref().try_clone().unwrap();
        let _ = w.write_all(b"{\"execute\":\"");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..4 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["error"]["class"], "GenericError", "{v}");
        drop((r, w));
        std::thread::sleep(Duration::from_millis(100));
        // Connections are bounded: the ones beyond the limit are closed without a greeting.
        let open: Vec<_> = (0..MAX_QMP_CONNECTIONS)
            .map(|_| greeted(&path).expect("greeting"))
            .collect();
        assert!(greeted(&path).is_none(), "connection beyond the limit");
        drop(open);
        std::thread::sleep(Duration::from_millis(100));
        assert!(greeted(&path).is_some(), "served again");
    }

    #[test]
    fn stops_when_libxl_removed_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp-libxl-9");
        let server = QmpServer::start(
            &[QmpEndpoint::Path(path.clone())],
            QmpState::new(false, None),
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("dropping the server does not hang");
    }
}
