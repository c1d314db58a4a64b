//! The daemon's control socket: a unix stream socket (default [`DEFAULT_SOCKET`], mode 0600)
//! speaking one JSON request per line and one JSON reply per line.
//!
//! Requests: `{"cmd":"ping"}` → `{"ok":true}`; `{"cmd":"status"}` →
//! `{"ok":true,"status":DaemonStatus}`. Errors: `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::status::DaemonStatus;

/// Where `xdisk serve` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/xdisk/control.sock";

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    Status,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
}

/// What the server asks its owner.
pub type StatusFn = Arc<dyn Fn() -> DaemonStatus + Send + Sync>;

/// A running control socket server. Dropping it closes the socket and removes its file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlServer {
    /// Listens on `path` (its directory is created with mode 0700 if missing). A stale
    /// socket file is replaced; a socket where another daemon answers is an error.
    pub fn start(path: &Path, status: StatusFn) -> Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Invalid(format!(
                    "another xdisk daemon already listens on {}",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("xdisk-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(s) => {
                            if let Err(e) = serve_one(s, &status) {
                                tracing::debug!("control connection: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("control socket accept: {e}"),
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the control thread", e))?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; if the socket file was removed under us, nothing can, and
        // the thread ends with the process.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(stream: UnixStream, status: &StatusFn) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(std::io::Read::take(stream.try_clone()?, MAX_REQUEST));
    let mut w = stream;
    let mut line = String::new();
    // One connection may carry several requests.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Ping) => Reply {
                ok: true,
                error: None,
                status: None,
            },
            Ok(Request::Status) => Reply {
                ok: true,
                error: None,
                status: Some(status()),
            },
            Err(e) => Reply {
                ok: false,
                error: Some(format!("bad request: {e}")),
                status: None,
            },
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out)?;
        if !reply.ok {
            return Ok(());
        }
    }
}

/// Sends one request to the daemon at `path`.
pub fn request(path: &Path, req: &Request) -> Result<Reply> {
    let stream = UnixStream::connect(path).map_err(|error| Error::NotRunning {
        path: path.to_owned(),
        error,
    })?;
    let ctl = |e: std::io::Error| Error::Control(e.to_string());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(ctl)?;
    let mut w = stream.try_clone().map_err(ctl)?;
    let mut line = serde_json::to_string(req).map_err(|e| Error::Control(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes()).map_err(ctl)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(ctl)?;
    let r: Reply = serde_json::from_str(reply.trim())
        .map_err(|e| Error::Control(format!("bad reply: {e}")))?;
    if !r.ok {
        return Err(Error::Control(r.error.unwrap_or_else(|| "error".into())));
    }
    Ok(r)
}

/// The daemon's status (fails clearly when it is not running).
pub fn status(path: &Path) -> Result<DaemonStatus> {
    request(path, &Request::Status)?
        .status
        .ok_or_else(|| Error::Control("reply without status".into()))
}
