//! Byte transports to xenstored: the daemon's unix socket, or the xenbus character device.
//!
//! Both carry the same framing (xenstore.txt: "Communication with xenstore is via either
//! sockets, or event channel and shared memory, as specified in io/xs_wire.h"; the Linux
//! xenbus device exposes the shared-memory ring as a file with the socket framing).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Where xenstored listens by default (libxenstore: `$XENSTORED_RUNDIR/socket`, the rundir
/// defaulting to `/run/xenstored`).
pub const DEFAULT_SOCKET_PATH: &str = "/run/xenstored/socket";
/// The xenbus device of a Linux domain (used when there is no daemon socket, e.g. in a guest or
/// with xenstored in a stub domain).
pub const DEFAULT_DEVICE_PATH: &str = "/dev/xen/xenbus";

/// A bidirectional byte stream to xenstored. The client keeps one handle for writing requests
/// and gives a [`Transport::try_clone_box`] to its reader thread.
pub trait Transport: Read + Write + Send + 'static {
    /// Another handle on the same connection (for the reader thread).
    fn try_clone_box(&self) -> io::Result<Box<dyn Transport>>;

    /// Wakes up a reader blocked on this connection and makes further I/O fail. Transports that
    /// cannot do that return `ErrorKind::Unsupported` (the client then provokes a reply instead).
    fn shutdown(&self) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Both)
    }
}

/// The xenbus character device (`/dev/xen/xenbus`): requests are written and replies read
/// with the socket framing on one file descriptor.
#[derive(Debug)]
pub struct XenbusDevice {
    file: File,
}

impl XenbusDevice {
    /// Opens the device read-write.
    pub fn open(path: impl AsRef<Path>) -> io::Result<XenbusDevice> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(XenbusDevice { file })
    }

    /// Wraps an already open device file.
    pub fn from_file(file: File) -> XenbusDevice {
        XenbusDevice { file }
    }
}

impl Read for XenbusDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for XenbusDevice {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Transport for XenbusDevice {
    fn try_clone_box(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(XenbusDevice {
            file: self.file.try_clone()?,
        }))
    }

    fn shutdown(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a xenbus device read cannot be interrupted",
        ))
    }
}
