//! [`EvtchnDev`]: [`EventChannels`] over Linux's `/dev/xen/evtchn` (evtchn.h).
//!
//! Each bound channel gets its own open file: the driver's bindings, pending-port queue and
//! NOTIFY/UNBIND checks are per file, so one file per channel makes [`EventChannel::fd`]
//! readable exactly when *that* channel has an event, and [`EventChannel::clear`] consume only
//! its own. The driver's protocol on the file: `read` returns pending ports as native `u32`s
//! (the port is masked until acknowledged), `write` of ports unmasks them; the file is opened
//! `O_NONBLOCK` so a read with nothing pending returns `EAGAIN`.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::gntdev::{io_err, open_device};
use super::sys;
use crate::platform::{DomId, EventChannel, EventChannels, PlatformError, Port};

/// Where Linux puts the event channel device.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// The event channel device: binds channels, each on its own open file.
#[derive(Debug, Clone)]
pub struct EvtchnDev {
    path: PathBuf,
}

impl EvtchnDev {
    /// Checks that [`EVTCHN_PATH`] opens (fails with [`PlatformError::Io`], kind `NotFound`,
    /// where there is no Xen or `xen-evtchn` is not loaded).
    pub fn open() -> Result<EvtchnDev, PlatformError> {
        EvtchnDev::open_path(EVTCHN_PATH)
    }

    /// Like [`EvtchnDev::open`] for the device at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<EvtchnDev, PlatformError> {
        let path = path.as_ref().to_owned();
        drop(open_device(&path, true)?);
        Ok(EvtchnDev { path })
    }

    fn file(&self) -> Result<OwnedFd, PlatformError> {
        open_device(&self.path, true)
    }

    /// [`EventChannels::bind_interdomain`] with the concrete type.
    pub fn bind_interdomain_port(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<EvtchnPort, PlatformError> {
        let fd = self.file()?;
        let port = sys::evtchn_bind_interdomain(fd.as_fd(), domid, remote_port).map_err(|e| {
            io_err(
                format!("IOCTL_EVTCHN_BIND_INTERDOMAIN to port {remote_port} of domain {domid}"),
                e,
            )
        })?;
        Ok(EvtchnPort::new(fd, port))
    }

    /// [`EventChannels::alloc_unbound`] with the concrete type.
    pub fn alloc_unbound_port(&self, remote: DomId) -> Result<EvtchnPort, PlatformError> {
        let fd = self.file()?;
        let port = sys::evtchn_bind_unbound_port(fd.as_fd(), remote).map_err(|e| {
            io_err(
                format!("IOCTL_EVTCHN_BIND_UNBOUND_PORT for domain {remote}"),
                e,
            )
        })?;
        Ok(EvtchnPort::new(fd, port))
    }
}

impl EventChannels for EvtchnDev {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        Ok(Box::new(self.bind_interdomain_port(domid, remote_port)?))
    }

    fn alloc_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, PlatformError> {
        Ok(Box::new(self.alloc_unbound_port(remote)?))
    }
}

/// One bound port on its own `/dev/xen/evtchn` file; unbound (IOCTL_EVTCHN_UNBIND) on drop.
#[derive(Debug)]
pub struct EvtchnPort {
    file: File,
    port: Port,
}

impl EvtchnPort {
    fn new(fd: OwnedFd, port: Port) -> EvtchnPort {
        EvtchnPort {
            file: File::from(fd),
            port,
        }
    }

    /// Waits up to `timeout` (`None`: forever) for an event; returns whether one is pending.
    /// Does not consume it (see [`EventChannel::clear`]).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, PlatformError> {
        sys::poll_readable(self.file.as_fd(), timeout)
            .map_err(|e| io_err(format!("poll of event channel port {}", self.port), e))
    }
}

impl EventChannel for EvtchnPort {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> Result<(), PlatformError> {
        sys::evtchn_port_op(self.file.as_fd(), self.port, false)
            .map_err(|e| io_err(format!("IOCTL_EVTCHN_NOTIFY on port {}", self.port), e))
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn clear(&self) -> Result<bool, PlatformError> {
        let mut any = false;
        let mut buf = [0u8; 64];
        loop {
            let n = match (&self.file).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(io_err(
                        format!("reading event channel port {}", self.port),
                        e,
                    ))
                }
            };
            for p in buf[..n].chunks_exact(4) {
                let p = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                if p == self.port {
                    any = true;
                } else {
                    tracing::warn!(port = p, ours = self.port, "event on a foreign port");
                }
            }
            // A short read took everything pending: no second read (a syscall per wake-up)
            // just to be told EAGAIN. The file has one port, masked from its event until the
            // unmask below, so one read normally finds all there is.
            if n < buf.len() {
                break;
            }
        }
        if any {
            // Unmask: writing the port back re-enables its delivery.
            (&self.file)
                .write_all(&self.port.to_ne_bytes())
                .map_err(|e| io_err(format!("unmasking event channel port {}", self.port), e))?;
        }
        Ok(any)
    }
}

impl Drop for EvtchnPort {
    fn drop(&mut self) {
        if let Err(e) = sys::evtchn_port_op(self.file.as_fd(), self.port, true) {
            tracing::warn!(error = %e, port = self.port, "IOCTL_EVTCHN_UNBIND failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fails_cleanly_without_the_device() {
        let dir = tempfile::tempdir().unwrap();
        match EvtchnDev::open_path(dir.path().join("evtchn")).unwrap_err() {
            PlatformError::Io { source, .. } => assert_eq!(source.kind(), ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
        if !Path::new("/dev/xen").exists() {
            assert!(EvtchnDev::open().is_err());
        }
    }

    #[test]
    fn ioctls_on_a_non_xen_device_fail_cleanly() {
        let dev = EvtchnDev::open_path("/dev/null").unwrap();
        assert!(matches!(
            dev.alloc_unbound(0),
            Err(PlatformError::Io { .. })
        ));
        assert!(matches!(
            dev.bind_interdomain(0, 5),
            Err(PlatformError::Io { .. })
        ));
    }
}
