//! The xenstore wire protocol.
//!
//! Every message in either direction is a 16-byte header (`struct xsd_sockmsg` in xs_wire.h:
//! `type`, `req_id`, `tx_id`, `len`, each a little-endian `u32` on the socket and on the xenbus
//! device, which are host-endian and every Xen host is little-endian) followed by `len` bytes of
//! payload, `len <= XENSTORE_PAYLOAD_MAX` (xenstore.txt, introduction: "The payload length ... is
//! limited to 4096 (XENSTORE_PAYLOAD_MAX) in both directions").
//!
//! Payloads are mostly NUL-terminated strings (xenstore.txt, "Xenstore protocol details -
//! introduction": `|` is a NUL byte, `<foo>|*` zero or more strings each followed by a NUL).
//!
//! Everything here that takes bytes from the peer is hostile-input safe: lengths are checked
//! against [`XENSTORE_PAYLOAD_MAX`] before anything is allocated, and malformed payloads become
//! an [`Errno`] (normally `EINVAL`), never a panic.

use std::fmt;
use std::io::{self, Read};

/// Size of the message header (`struct xsd_sockmsg`, xs_wire.h): four `u32`.
pub const HEADER_LEN: usize = 16;
/// Largest payload in either direction (xs_wire.h `XENSTORE_PAYLOAD_MAX`).
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Longest absolute path (xs_wire.h `XENSTORE_ABS_PATH_MAX`).
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// Longest relative path (xs_wire.h `XENSTORE_REL_PATH_MAX`).
pub const XENSTORE_REL_PATH_MAX: usize = 2048;
/// First domid that is not a real domain (`DOMID_FIRST_RESERVED` in xen.h).
pub const DOMID_FIRST_RESERVED: u32 = 0x7FF0;
/// The special watch path fired when a domain is introduced (xenstore.txt, "WATCH").
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// The special watch path fired when a domain is released or dies (xenstore.txt, "WATCH").
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

pub use crate::platform::DomId;

/// Message types (`enum xsd_sockmsg_type` in xs_wire.h). The numeric values are the wire values;
/// `XS_RESTRICT` (20) was removed from the protocol and is reported as [`MsgType::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// `XS_CONTROL` (formerly `XS_DEBUG`), 0.
    Control,
    /// `XS_DIRECTORY`, 1.
    Directory,
    /// `XS_READ`, 2.
    Read,
    /// `XS_GET_PERMS`, 3.
    GetPerms,
    /// `XS_WATCH`, 4.
    Watch,
    /// `XS_UNWATCH`, 5.
    Unwatch,
    /// `XS_TRANSACTION_START`, 6.
    TransactionStart,
    /// `XS_TRANSACTION_END`, 7.
    TransactionEnd,
    /// `XS_INTRODUCE`, 8.
    Introduce,
    /// `XS_RELEASE`, 9.
    Release,
    /// `XS_GET_DOMAIN_PATH`, 10.
    GetDomainPath,
    /// `XS_WRITE`, 11.
    Write,
    /// `XS_MKDIR`, 12.
    Mkdir,
    /// `XS_RM`, 13.
    Rm,
    /// `XS_SET_PERMS`, 14.
    SetPerms,
    /// `XS_WATCH_EVENT`, 15.
    WatchEvent,
    /// `XS_ERROR`, 16.
    Error,
    /// `XS_IS_DOMAIN_INTRODUCED`, 17.
    IsDomainIntroduced,
    /// `XS_RESUME`, 18.
    Resume,
    /// `XS_SET_TARGET`, 19.
    SetTarget,
    /// `XS_RESET_WATCHES`, 21 (`XS_SET_TARGET + 2`).
    ResetWatches,
    /// `XS_DIRECTORY_PART`, 22.
    DirectoryPart,
    /// Any other value (kept so that the reply can echo it and say `ENOSYS`).
    Unknown(u32),
}

impl MsgType {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            MsgType::Control => 0,
            MsgType::Directory => 1,
            MsgType::Read => 2,
            MsgType::GetPerms => 3,
            MsgType::Watch => 4,
            MsgType::Unwatch => 5,
            MsgType::TransactionStart => 6,
            MsgType::TransactionEnd => 7,
            MsgType::Introduce => 8,
            MsgType::Release => 9,
            MsgType::GetDomainPath => 10,
            MsgType::Write => 11,
            MsgType::Mkdir => 12,
            MsgType::Rm => 13,
            MsgType::SetPerms => 14,
            MsgType::WatchEvent => 15,
            MsgType::Error => 16,
            MsgType::IsDomainIntroduced => 17,
            MsgType::Resume => 18,
            MsgType::SetTarget => 19,
            MsgType::ResetWatches => 21,
            MsgType::DirectoryPart => 22,
            MsgType::Unknown(v) => v,
        }
    }

    /// Decodes a wire value; never fails (unknown values become [`MsgType::Unknown`]).
    pub fn from_u32(v: u32) -> MsgType {
        match v {
            0 => MsgType::Control,
            1 => MsgType::Directory,
            2 => MsgType::Read,
            3 => MsgType::GetPerms,
            4 => MsgType::Watch,
            5 => MsgType::Unwatch,
            6 => MsgType::TransactionStart,
            7 => MsgType::TransactionEnd,
            8 => MsgType::Introduce,
            9 => MsgType::Release,
            10 => MsgType::GetDomainPath,
            11 => MsgType::Write,
            12 => MsgType::Mkdir,
            13 => MsgType::Rm,
            14 => MsgType::SetPerms,
            15 => MsgType::WatchEvent,
            16 => MsgType::Error,
            17 => MsgType::IsDomainIntroduced,
            18 => MsgType::Resume,
            19 => MsgType::SetTarget,
            21 => MsgType::ResetWatches,
            22 => MsgType::DirectoryPart,
            other => MsgType::Unknown(other),
        }
    }

    /// The C name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Control => "XS_CONTROL",
            MsgType::Directory => "XS_DIRECTORY",
            MsgType::Read => "XS_READ",
            MsgType::GetPerms => "XS_GET_PERMS",
            MsgType::Watch => "XS_WATCH",
            MsgType::Unwatch => "XS_UNWATCH",
            MsgType::TransactionStart => "XS_TRANSACTION_START",
            MsgType::TransactionEnd => "XS_TRANSACTION_END",
            MsgType::Introduce => "XS_INTRODUCE",
            MsgType::Release => "XS_RELEASE",
            MsgType::GetDomainPath => "XS_GET_DOMAIN_PATH",
            MsgType::Write => "XS_WRITE",
            MsgType::Mkdir => "XS_MKDIR",
            MsgType::Rm => "XS_RM",
            MsgType::SetPerms => "XS_SET_PERMS",
            MsgType::WatchEvent => "XS_WATCH_EVENT",
            MsgType::Error => "XS_ERROR",
            MsgType::IsDomainIntroduced => "XS_IS_DOMAIN_INTRODUCED",
            MsgType::Resume => "XS_RESUME",
            MsgType::SetTarget => "XS_SET_TARGET",
            MsgType::ResetWatches => "XS_RESET_WATCHES",
            MsgType::DirectoryPart => "XS_DIRECTORY_PART",
            MsgType::Unknown(_) => "XS_<unknown>",
        }
    }
}

impl From<u32> for MsgType {
    fn from(v: u32) -> MsgType {
        MsgType::from_u32(v)
    }
}

impl From<MsgType> for u32 {
    fn from(t: MsgType) -> u32 {
        t.to_u32()
    }
}

/// Error names carried by `XS_ERROR` replies (`xsd_errors[]` in xs_wire.h; xenstore.txt:
/// "Note that the string name is transmitted, not a numeric value").
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Errno {
    /// Malformed request: wrong number of arguments, bad path syntax, a domid or permission
    /// string that does not parse.
    #[error("EINVAL")]
    EINVAL,
    /// The node's permissions do not give the caller the access it needs, or the request is
    /// reserved to privileged domains.
    #[error("EACCES")]
    EACCES,
    /// Already exists: e.g. a `WATCH` with the path and token of one the connection has.
    #[error("EEXIST")]
    EEXIST,
    /// Is a directory (in `xsd_errors[]`; the simulated xenstored never sends it).
    #[error("EISDIR")]
    EISDIR,
    /// No such node (or transaction, watch or domain).
    #[error("ENOENT")]
    ENOENT,
    /// xenstored ran out of memory.
    #[error("ENOMEM")]
    ENOMEM,
    /// A quota ran out (nodes or transactions of a domain or connection, node size, ...).
    #[error("ENOSPC")]
    ENOSPC,
    /// I/O or internal error of xenstored.
    #[error("EIO")]
    EIO,
    /// Directory not empty (in `xsd_errors[]`; the simulated xenstored never sends it).
    #[error("ENOTEMPTY")]
    ENOTEMPTY,
    /// Unknown or unsupported message type (also what a reply type such as `WATCH_EVENT` gets
    /// when sent as a request).
    #[error("ENOSYS")]
    ENOSYS,
    /// Read-only: xenstored refuses to modify the store (e.g. on a read-only connection).
    #[error("EROFS")]
    EROFS,
    /// Busy: e.g. `TRANSACTION_START` sent inside a transaction (with a non-zero `tx_id`).
    #[error("EBUSY")]
    EBUSY,
    /// A transaction conflicted with another change and was not committed: run it again
    /// ([`crate::xenstore::Client::transaction`] does).
    #[error("EAGAIN")]
    EAGAIN,
    /// Already connected (in `xsd_errors[]`; the simulated xenstored never sends it).
    #[error("EISCONN")]
    EISCONN,
    /// Too big: a payload over [`XENSTORE_PAYLOAD_MAX`], a reply that would be (a long
    /// `DIRECTORY`, for which `DIRECTORY_PART` exists), too many watches on a connection.
    #[error("E2BIG")]
    E2BIG,
    /// Not permitted: e.g. a domain other than dom0 giving a node to another owner in
    /// `SET_PERMS`.
    #[error("EPERM")]
    EPERM,
}

impl Errno {
    /// Every error, in the order of `xsd_errors[]`.
    pub const ALL: [Errno; 16] = [
        Errno::EINVAL,
        Errno::EACCES,
        Errno::EEXIST,
        Errno::EISDIR,
        Errno::ENOENT,
        Errno::ENOMEM,
        Errno::ENOSPC,
        Errno::EIO,
        Errno::ENOTEMPTY,
        Errno::ENOSYS,
        Errno::EROFS,
        Errno::EBUSY,
        Errno::EAGAIN,
        Errno::EISCONN,
        Errno::E2BIG,
        Errno::EPERM,
    ];

    /// The name sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Errno::EINVAL => "EINVAL",
            Errno::EACCES => "EACCES",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOENT => "ENOENT",
            Errno::ENOMEM => "ENOMEM",
            Errno::ENOSPC => "ENOSPC",
            Errno::EIO => "EIO",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::ENOSYS => "ENOSYS",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EISCONN => "EISCONN",
            Errno::E2BIG => "E2BIG",
            Errno::EPERM => "EPERM",
        }
    }

    /// Parses a wire name (without the trailing NUL).
    pub fn from_name(name: &[u8]) -> Option<Errno> {
        Errno::ALL
            .into_iter()
            .find(|e| e.as_str().as_bytes() == name)
    }

    /// The Linux errno value.
    pub fn errno(self) -> i32 {
        match self {
            Errno::EINVAL => libc::EINVAL,
            Errno::EACCES => libc::EACCES,
            Errno::EEXIST => libc::EEXIST,
            Errno::EISDIR => libc::EISDIR,
            Errno::ENOENT => libc::ENOENT,
            Errno::ENOMEM => libc::ENOMEM,
            Errno::ENOSPC => libc::ENOSPC,
            Errno::EIO => libc::EIO,
            Errno::ENOTEMPTY => libc::ENOTEMPTY,
            Errno::ENOSYS => libc::ENOSYS,
            Errno::EROFS => libc::EROFS,
            Errno::EBUSY => libc::EBUSY,
            Errno::EAGAIN => libc::EAGAIN,
            Errno::EISCONN => libc::EISCONN,
            Errno::E2BIG => libc::E2BIG,
            Errno::EPERM => libc::EPERM,
        }
    }

    /// The payload of an `XS_ERROR` reply: the name and a NUL (xenstore.txt, "ERROR").
    pub fn to_payload(self) -> Vec<u8> {
        let mut v = self.as_str().as_bytes().to_vec();
        v.push(0);
        v
    }

    /// Decodes an `XS_ERROR` payload; an unknown name becomes `EINVAL` (as libxenstore does).
    pub fn from_payload(payload: &[u8]) -> Errno {
        let name = payload.split(|&b| b == 0).next().unwrap_or_default();
        Errno::from_name(name).unwrap_or(Errno::EINVAL)
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}

/// The message header (`struct xsd_sockmsg`, xs_wire.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The message type (`type`): in a request, what it asks; in a reply, the request's type
    /// or `ERROR`; `WATCH_EVENT` for a watch event.
    pub msg_type: MsgType,
    /// Echoed by the daemon in its reply; 0 in watch events (xenstore.txt, "WATCH_EVENT").
    pub req_id: u32,
    /// Transaction id, 0 outside transactions.
    pub tx_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Encodes the header (little-endian, see the module comment).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.msg_type.to_u32().to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a header. The length is *not* checked here; see [`Header::check_len`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            msg_type: MsgType::from_u32(word(0)),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }

    /// The payload length, if it is within [`XENSTORE_PAYLOAD_MAX`].
    pub fn check_len(&self) -> Result<usize, WireError> {
        let len = self.len as usize;
        if len > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::TooLong(self.len));
        }
        Ok(len)
    }
}

/// Framing errors (as opposed to [`Errno`], which is a well-formed "no").
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A header's `len` over [`XENSTORE_PAYLOAD_MAX`]: the stream cannot be trusted further.
    #[error("payload length {0} exceeds XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})")]
    TooLong(u32),
    /// The stream ended inside a header or payload.
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// Reading the socket or device failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// One message: header and payload. `header.len` always equals `payload.len()` for messages
/// built with [`Message::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The `xsd_sockmsg` header.
    pub header: Header,
    /// The `header.len` payload bytes (NUL-terminated strings, mostly).
    pub payload: Vec<u8>,
}

impl Message {
    /// Builds a message; fails with `E2BIG` if the payload is over [`XENSTORE_PAYLOAD_MAX`]
    /// (sending it would get the connection killed, xenstore.txt introduction).
    pub fn new(
        msg_type: MsgType,
        req_id: u32,
        tx_id: u32,
        payload: Vec<u8>,
    ) -> Result<Message, Errno> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(Errno::E2BIG);
        }
        Ok(Message {
            header: Header {
                msg_type,
                req_id,
                tx_id,
                len: payload.len() as u32,
            },
            payload,
        })
    }

    /// Header followed by payload, ready to be written in one go.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header.encode());
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Reads one message from a stream. Returns `Ok(None)` on a clean end of stream (before the
/// first header byte). The payload buffer is allocated only after the length was checked.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Option<Message>, WireError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = Header::decode(&hdr);
    let len = header.check_len()?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    })?;
    Ok(Some(Message { header, payload }))
}

// ---------------------------------------------------------------------------------------------
// Payload encoding.

/// Encodes strings each followed by a NUL (`<foo>|*`, xenstore.txt introduction).
pub fn join_strings<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.as_ref().len() + 1).sum());
    for p in parts {
        v.extend_from_slice(p.as_ref());
        v.push(0);
    }
    v
}

/// Splits a payload of NUL-terminated strings. Every string must be terminated: a payload that
/// does not end with NUL (and is not empty) is `EINVAL`.
pub fn split_strings(payload: &[u8]) -> Result<Vec<&[u8]>, Errno> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    if payload.last() != Some(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(payload[..payload.len() - 1].split(|&b| b == 0).collect())
}

/// The payload of a watch event: `<epath>|<token>|` (xenstore.txt, "WATCH_EVENT").
pub fn watch_event_payload(path: &str, token: &[u8]) -> Vec<u8> {
    join_strings(&[path.as_bytes(), token])
}

/// The payload of a plain success reply: `OK|` (xenstore.txt introduction).
pub fn ok_payload() -> Vec<u8> {
    b"OK\0".to_vec()
}

fn utf8(b: &[u8]) -> Result<&str, Errno> {
    std::str::from_utf8(b).map_err(|_| Errno::EINVAL)
}

/// Exactly one NUL-terminated string and nothing else.
fn one_arg(payload: &[u8]) -> Result<&[u8], Errno> {
    match payload.iter().position(|&b| b == 0) {
        Some(i) if i + 1 == payload.len() => Ok(&payload[..i]),
        _ => Err(Errno::EINVAL),
    }
}

/// Parses a decimal domid (xenstore.txt introduction, `<domid>`: "decimal number 0..65535").
/// Stricter than xenstored: anything but plain digits is `EINVAL`.
pub fn parse_domid(s: &[u8]) -> Result<DomId, Errno> {
    parse_decimal(s).and_then(|v| DomId::try_from(v).map_err(|_| Errno::EINVAL))
}

fn parse_decimal(s: &[u8]) -> Result<u64, Errno> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return Err(Errno::EINVAL);
    }
    utf8(s)?.parse::<u64>().map_err(|_| Errno::EINVAL)
}

// ---------------------------------------------------------------------------------------------
// Paths.

/// Characters allowed in a path (xenstore.txt: "ASCII alphanumerics and plus the four
/// punctuation characters -/_@").
pub fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@')
}

/// Checks a node path as sent by a client (xenstore.txt, paths paragraph, and `<path>` in the
/// protocol introduction): non-empty, allowed characters only, no doubled slash, no trailing
/// slash except the root itself; absolute paths at most [`XENSTORE_ABS_PATH_MAX`] bytes,
/// relative ones at most [`XENSTORE_REL_PATH_MAX`]. Special `@` paths are not node paths.
pub fn check_path(path: &str) -> Result<(), Errno> {
    let b = path.as_bytes();
    if b.is_empty() || b[0] == b'@' || !b.iter().all(|&c| is_path_char(c)) {
        return Err(Errno::EINVAL);
    }
    let absolute = b[0] == b'/';
    let max = if absolute {
        XENSTORE_ABS_PATH_MAX
    } else {
        XENSTORE_REL_PATH_MAX
    };
    if b.len() > max {
        return Err(Errno::EINVAL);
    }
    if path == "/" {
        return Ok(());
    }
    if path.contains("//") || b[b.len() - 1] == b'/' {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// Checks a watch path: a node path (see [`check_path`]) or `@<wspecial>` (xenstore.txt,
/// "WATCH": "`<wspecial>` may have any syntax"; we still require UTF-8 and bound its length by
/// [`XENSTORE_REL_PATH_MAX`], as xenstored does).
pub fn check_watch_path(path: &str) -> Result<(), Errno> {
    if let Some(rest) = path.strip_prefix('@') {
        if rest.is_empty() || path.len() > XENSTORE_REL_PATH_MAX {
            return Err(Errno::EINVAL);
        }
        return Ok(());
    }
    check_path(path)
}

/// `true` if `child` is `parent` or below it (xenstore.txt: "two paths being `<child>` and
/// `<parent>` ... if they're identical, or if `<parent>` is /, or if `<parent>/` is an initial
/// substring of `<child>`"). The root only contains absolute paths, not `@` names.
pub fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    match child.strip_prefix(parent) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The home path of a domain (xenstore.txt, "GET_DOMAIN_PATH").
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

// ---------------------------------------------------------------------------------------------
// Permissions.

/// The access granted by one permission entry (xenstore.txt, "GET_PERMS"/"SET_PERMS").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n<domid>`: no access.
    None,
    /// `r<domid>`: read only.
    Read,
    /// `w<domid>`: write only.
    Write,
    /// `b<domid>`: both read and write.
    Both,
}

impl Access {
    fn letter(self) -> u8 {
        match self {
            Access::None => b'n',
            Access::Read => b'r',
            Access::Write => b'w',
            Access::Both => b'b',
        }
    }

    /// Whether reading is allowed.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    /// Whether writing is allowed.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry. In a node's list, the first entry names the owner and the access of
/// every domain not listed further on; later entries grant access to one domain each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain the entry is about (the owner, in a list's first entry).
    pub domid: DomId,
    /// What it may do (for the first entry: what every unlisted domain may do).
    pub access: Access,
}

impl Perm {
    /// The entry giving `access` to `domid` (`Perm::new(Access::Read, 5)` is `r5`).
    pub fn new(access: Access, domid: DomId) -> Perm {
        Perm { domid, access }
    }

    /// Parses `n0`, `r1`, `w2`, `b3`... (`EINVAL` for anything else).
    pub fn parse(s: &[u8]) -> Result<Perm, Errno> {
        let (&letter, rest) = s.split_first().ok_or(Errno::EINVAL)?;
        let access = match letter {
            b'n' => Access::None,
            b'r' => Access::Read,
            b'w' => Access::Write,
            b'b' => Access::Both,
            _ => return Err(Errno::EINVAL),
        };
        Ok(Perm {
            domid: parse_domid(rest)?,
            access,
        })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter() as char, self.domid)
    }
}

impl std::str::FromStr for Perm {
    type Err = Errno;
    fn from_str(s: &str) -> Result<Perm, Errno> {
        Perm::parse(s.as_bytes())
    }
}

/// Parses a list of permission strings (at least one).
pub fn parse_perms<S: AsRef<[u8]>>(parts: &[S]) -> Result<Vec<Perm>, Errno> {
    if parts.is_empty() {
        return Err(Errno::EINVAL);
    }
    parts.iter().map(|p| Perm::parse(p.as_ref())).collect()
}

/// Encodes permissions as `<perm-as-string>|+`.
pub fn perms_payload(perms: &[Perm]) -> Vec<u8> {
    let strs: Vec<String> = perms.iter().map(Perm::to_string).collect();
    join_strings(&strs)
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A decoded xenstore request (the client-to-daemon direction of xenstore.txt, "Xenstore
/// protocol details"). Paths are syntax-checked but not resolved (relative paths stay relative).
/// Named `XsRequest` apart from the blkif ring's `xdisk_blkif::wire::Request`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XsRequest {
    /// `READ <path>|`
    Read {
        /// The node whose value to read.
        path: String,
    },
    /// `WRITE <path>|<value|>`
    Write {
        /// The node to write (created with its missing parents).
        path: String,
        /// The new value: the rest of the payload, bytes and not NUL-terminated.
        value: Vec<u8>,
    },
    /// `MKDIR <path>|`
    Mkdir {
        /// The node to create (with an empty value) if it does not exist.
        path: String,
    },
    /// `RM <path>|`
    Rm {
        /// The node to remove, with everything below it.
        path: String,
    },
    /// `DIRECTORY <path>|`
    Directory {
        /// The node whose children to list.
        path: String,
    },
    /// `DIRECTORY_PART <path>|<offset>|`: byte offset into the child list.
    DirectoryPart {
        /// The node whose children to list.
        path: String,
        /// Where this part starts, in bytes into the NUL-separated list of child names.
        offset: u32,
    },
    /// `GET_PERMS <path>|` (`<path>` may be a special `@` name).
    GetPerms {
        /// The node, or `@introduceDomain`/`@releaseDomain`.
        path: String,
    },
    /// `SET_PERMS <path>|<perm-as-string>|+` (`<path>` may be a special `@` name).
    SetPerms {
        /// The node, or `@introduceDomain`/`@releaseDomain`.
        path: String,
        /// The new list, at least one entry: the owner (and default access) first.
        perms: Vec<Perm>,
    },
    /// `WATCH <wpath>|<token>|?`
    Watch {
        /// The path to watch: a node (events for it and everything below) or a special `@`
        /// name.
        path: String,
        /// The caller's tag for the watch, sent back in each `WATCH_EVENT`; any bytes.
        token: Vec<u8>,
    },
    /// `UNWATCH <wpath>|<token>|?`
    Unwatch {
        /// The path the watch was set with.
        path: String,
        /// The token it was set with (path and token together name the watch).
        token: Vec<u8>,
    },
    /// `TRANSACTION_START |`
    TransactionStart,
    /// `TRANSACTION_END T|` (commit) or `F|` (abort).
    TransactionEnd {
        /// `T`: apply the transaction's changes (or fail with `EAGAIN` on a conflict); `F`:
        /// discard them.
        commit: bool,
    },
    /// `GET_DOMAIN_PATH <domid>|`
    GetDomainPath {
        /// The domain whose home path (`/local/domain/<domid>`) is asked for.
        domid: DomId,
    },
    /// `INTRODUCE <domid>|<mfn>|<evtchn>|?`
    Introduce {
        /// The domain to connect to xenstored.
        domid: DomId,
        /// The frame of the domain's xenstore ring page (`<mfn>`, sent in signed decimal; a
        /// negative value keeps its two's complement bits).
        mfn: u64,
        /// The domain's event channel port for its xenstore ring.
        evtchn: u32,
    },
    /// `RELEASE <domid>|`
    Release {
        /// The domain whose connection xenstored drops (it has gone away).
        domid: DomId,
    },
    /// `IS_DOMAIN_INTRODUCED <domid>|`
    IsDomainIntroduced {
        /// The domain asked about.
        domid: DomId,
    },
    /// `RESUME <domid>|`
    Resume {
        /// The domain that resumed (after suspend or migration).
        domid: DomId,
    },
    /// `SET_TARGET <domid>|<tdomid>|`
    SetTarget {
        /// The domain given privilege over `target` (e.g. a device-model stub domain).
        domid: DomId,
        /// The domain it serves (`<tdomid>`): `domid` gets full access to its nodes.
        target: DomId,
    },
    /// `RESET_WATCHES |`
    ResetWatches,
    /// `CONTROL <command>|[<parameters>|]`
    Control {
        /// The command and its parameters, each as sent (at least the command).
        args: Vec<Vec<u8>>,
    },
}

fn path_arg(b: &[u8]) -> Result<String, Errno> {
    let s = utf8(b)?;
    check_path(s)?;
    Ok(s.to_owned())
}

/// A node path or a special `@` name (GET_PERMS/SET_PERMS accept both).
fn node_or_special_arg(b: &[u8]) -> Result<String, Errno> {
    let s = utf8(b)?;
    check_watch_path(s)?;
    Ok(s.to_owned())
}

fn watch_args(payload: &[u8]) -> Result<(String, Vec<u8>), Errno> {
    let parts = split_strings(payload)?;
    if parts.len() < 2 {
        return Err(Errno::EINVAL);
    }
    let path = utf8(parts[0])?;
    check_watch_path(path)?;
    Ok((path.to_owned(), parts[1].to_vec()))
}

impl XsRequest {
    /// Decodes the payload of a request of type `msg_type`. Unknown types, and types that are
    /// never requests (`WATCH_EVENT`, `ERROR`), are `ENOSYS`; malformed payloads `EINVAL`.
    pub fn decode(msg_type: MsgType, payload: &[u8]) -> Result<XsRequest, Errno> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(Errno::E2BIG);
        }
        Ok(match msg_type {
            MsgType::Read => XsRequest::Read {
                path: path_arg(one_arg(payload)?)?,
            },
            MsgType::Mkdir => XsRequest::Mkdir {
                path: path_arg(one_arg(payload)?)?,
            },
            MsgType::Rm => XsRequest::Rm {
                path: path_arg(one_arg(payload)?)?,
            },
            MsgType::Directory => XsRequest::Directory {
                path: path_arg(one_arg(payload)?)?,
            },
            MsgType::GetPerms => XsRequest::GetPerms {
                path: node_or_special_arg(one_arg(payload)?)?,
            },
            MsgType::Write => {
                // "Extra strings can be created by binary data": the path is up to the first
                // NUL, everything after it is the value.
                let nul = payload.iter().position(|&b| b == 0).ok_or(Errno::EINVAL)?;
                XsRequest::Write {
                    path: path_arg(&payload[..nul])?,
                    value: payload[nul + 1..].to_vec(),
                }
            }
            MsgType::DirectoryPart => {
                let parts = split_strings(payload)?;
                if parts.len() != 2 {
                    return Err(Errno::EINVAL);
                }
                let offset = u32::try_from(parse_decimal(parts[1])?).map_err(|_| Errno::EINVAL)?;
                XsRequest::DirectoryPart {
                    path: path_arg(parts[0])?,
                    offset,
                }
            }
            MsgType::SetPerms => {
                let parts = split_strings(payload)?;
                if parts.len() < 2 {
                    return Err(Errno::EINVAL);
                }
                XsRequest::SetPerms {
                    path: node_or_special_arg(parts[0])?,
                    perms: parse_perms(&parts[1..])?,
                }
            }
            MsgType::Watch => {
                let (path, token) = watch_args(payload)?;
                XsRequest::Watch { path, token }
            }
            MsgType::Unwatch => {
                let (path, token) = watch_args(payload)?;
                XsRequest::Unwatch { path, token }
            }
            // The payload is a reserved empty string; its content is ignored.
            MsgType::TransactionStart => XsRequest::TransactionStart,
            MsgType::TransactionEnd => match one_arg(payload)? {
                b"T" => XsRequest::TransactionEnd { commit: true },
                b"F" => XsRequest::TransactionEnd { commit: false },
                _ => return Err(Errno::EINVAL),
            },
            MsgType::GetDomainPath => XsRequest::GetDomainPath {
                domid: parse_domid(one_arg(payload)?)?,
            },
            MsgType::Release => XsRequest::Release {
                domid: parse_domid(one_arg(payload)?)?,
            },
            MsgType::IsDomainIntroduced => XsRequest::IsDomainIntroduced {
                domid: parse_domid(one_arg(payload)?)?,
            },
            MsgType::Resume => XsRequest::Resume {
                domid: parse_domid(one_arg(payload)?)?,
            },
            MsgType::Introduce => {
                let parts = split_strings(payload)?;
                if parts.len() < 3 {
                    return Err(Errno::EINVAL);
                }
                let domid = parse_domid(parts[0])?;
                // "<mfn> must be a machine page ... represented in signed decimal (!)": accept
                // a leading '-' and keep the two's complement bits.
                let mfn = match parts[1].strip_prefix(b"-") {
                    Some(digits) => (parse_decimal(digits)? as i64).wrapping_neg() as u64,
                    None => parse_decimal(parts[1])?,
                };
                let evtchn = u32::try_from(parse_decimal(parts[2])?).map_err(|_| Errno::EINVAL)?;
                XsRequest::Introduce { domid, mfn, evtchn }
            }
            MsgType::SetTarget => {
                let parts = split_strings(payload)?;
                if parts.len() != 2 {
                    return Err(Errno::EINVAL);
                }
                XsRequest::SetTarget {
                    domid: parse_domid(parts[0])?,
                    target: parse_domid(parts[1])?,
                }
            }
            // "RESET_WATCHES |": content ignored.
            MsgType::ResetWatches => XsRequest::ResetWatches,
            MsgType::Control => {
                let parts = split_strings(payload)?;
                if parts.is_empty() || parts[0].is_empty() {
                    return Err(Errno::EINVAL);
                }
                XsRequest::Control {
                    args: parts.into_iter().map(<[u8]>::to_vec).collect(),
                }
            }
            MsgType::WatchEvent | MsgType::Error | MsgType::Unknown(_) => {
                return Err(Errno::ENOSYS)
            }
        })
    }

    /// The message type and payload of this request.
    pub fn encode(&self) -> (MsgType, Vec<u8>) {
        fn one(s: &str) -> Vec<u8> {
            join_strings(&[s])
        }
        match self {
            XsRequest::Read { path } => (MsgType::Read, one(path)),
            XsRequest::Write { path, value } => {
                let mut v = one(path);
                v.extend_from_slice(value);
                (MsgType::Write, v)
            }
            XsRequest::Mkdir { path } => (MsgType::Mkdir, one(path)),
            XsRequest::Rm { path } => (MsgType::Rm, one(path)),
            XsRequest::Directory { path } => (MsgType::Directory, one(path)),
            XsRequest::DirectoryPart { path, offset } => (
                MsgType::DirectoryPart,
                join_strings(&[path.clone(), offset.to_string()]),
            ),
            XsRequest::GetPerms { path } => (MsgType::GetPerms, one(path)),
            XsRequest::SetPerms { path, perms } => {
                let mut v = one(path);
                v.extend_from_slice(&perms_payload(perms));
                (MsgType::SetPerms, v)
            }
            XsRequest::Watch { path, token } => (
                MsgType::Watch,
                join_strings(&[path.as_bytes(), token.as_slice()]),
            ),
            XsRequest::Unwatch { path, token } => (
                MsgType::Unwatch,
                join_strings(&[path.as_bytes(), token.as_slice()]),
            ),
            XsRequest::TransactionStart => (MsgType::TransactionStart, vec![0]),
            XsRequest::TransactionEnd { commit } => (
                MsgType::TransactionEnd,
                one(if *commit { "T" } else { "F" }),
            ),
            XsRequest::GetDomainPath { domid } => (MsgType::GetDomainPath, one(&domid.to_string())),
            XsRequest::Introduce { domid, mfn, evtchn } => (
                MsgType::Introduce,
                join_strings(&[domid.to_string(), mfn.to_string(), evtchn.to_string()]),
            ),
            XsRequest::Release { domid } => (MsgType::Release, one(&domid.to_string())),
            XsRequest::IsDomainIntroduced { domid } => {
                (MsgType::IsDomainIntroduced, one(&domid.to_string()))
            }
            XsRequest::Resume { domid } => (MsgType::Resume, one(&domid.to_string())),
            XsRequest::SetTarget { domid, target } => (
                MsgType::SetTarget,
                join_strings(&[domid.to_string(), target.to_string()]),
            ),
            XsRequest::ResetWatches => (MsgType::ResetWatches, vec![0]),
            XsRequest::Control { args } => (MsgType::Control, join_strings(args)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages as a xenstored parses them (the in-process one of the simulation does exactly this;
// fuzzed).

/// Framing errors: a xenstored closes the connection on these.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Fewer than [`HEADER_LEN`] bytes (how many there are).
    #[error("{0} bytes are not a full header")]
    ShortHeader(usize),
    /// The header's `len`, over [`XENSTORE_PAYLOAD_MAX`].
    #[error("payload length {0} exceeds XENSTORE_PAYLOAD_MAX")]
    TooLong(u32),
    /// The bytes end before the payload the header announces.
    #[error("header announces {expected} payload bytes, only {got} present")]
    ShortPayload {
        /// The header's `len`.
        expected: usize,
        /// Bytes present after the header.
        got: usize,
    },
}

/// One message parsed the way a xenstored parses what it reads.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedMessage {
    /// The decoded header.
    pub header: Header,
    /// The decoded request, or the error a xenstored replies with (the connection stays).
    pub request: Result<XsRequest, Errno>,
    /// Bytes used (header and payload): where the next message starts.
    pub consumed: usize,
}

/// Parses the first message of `bytes` exactly as a xenstored does with each message it reads
/// (header, length check, payload decoding). Never panics; meant to be fuzzed.
pub fn parse_message(bytes: &[u8]) -> Result<ParsedMessage, MessageError> {
    let hdr: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(MessageError::ShortHeader(bytes.len()))?;
    let header = Header::decode(hdr);
    let len = header
        .check_len()
        .map_err(|_| MessageError::TooLong(header.len))?;
    let payload = bytes
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(MessageError::ShortPayload {
            expected: len,
            got: bytes.len() - HEADER_LEN,
        })?;
    Ok(ParsedMessage {
        header,
        request: XsRequest::decode(header.msg_type, payload),
        consumed: HEADER_LEN + len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_numbers_match_xs_wire_h() {
        assert_eq!(MsgType::Control.to_u32(), 0);
        assert_eq!(MsgType::Read.to_u32(), 2);
        assert_eq!(MsgType::Write.to_u32(), 11);
        assert_eq!(MsgType::WatchEvent.to_u32(), 15);
        assert_eq!(MsgType::Error.to_u32(), 16);
        assert_eq!(MsgType::SetTarget.to_u32(), 19);
        assert_eq!(MsgType::from_u32(20), MsgType::Unknown(20));
        assert_eq!(MsgType::ResetWatches.to_u32(), 21);
        assert_eq!(MsgType::DirectoryPart.to_u32(), 22);
        for v in 0..64 {
            assert_eq!(MsgType::from_u32(v).to_u32(), v);
        }
    }

    #[test]
    fn header_is_little_endian() {
        let h = Header {
            msg_type: MsgType::Write,
            req_id: 0x01020304,
            tx_id: 7,
            len: 5,
        };
        let b = h.encode();
        assert_eq!(&b[..4], &[11, 0, 0, 0]);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn paths() {
        for ok in ["/", "/a", "/a/b-c_d@e", "a", "a/b", "/local/domain/0"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in ["", "//", "/a/", "/a//b", "a/", "/a.b", "/a b", "@foo", "/ä"] {
            assert_eq!(check_path(bad), Err(Errno::EINVAL), "{bad}");
        }
        let long_abs = format!("/{}", "a".repeat(XENSTORE_ABS_PATH_MAX - 1));
        assert_eq!(check_path(&long_abs), Ok(()));
        assert_eq!(check_path(&format!("{long_abs}a")), Err(Errno::EINVAL));
        let long_rel = "a".repeat(XENSTORE_REL_PATH_MAX);
        assert_eq!(check_path(&long_rel), Ok(()));
        assert_eq!(check_path(&format!("{long_rel}a")), Err(Errno::EINVAL));
        assert_eq!(check_watch_path("@releaseDomain"), Ok(()));
        assert_eq!(check_watch_path("@"), Err(Errno::EINVAL));
    }

    #[test]
    fn children() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/ab", "/"));
        assert!(!is_child("@releaseDomain", "/"));
        assert!(is_child("@releaseDomain", "@releaseDomain"));
    }

    #[test]
    fn perms() {
        assert_eq!(Perm::parse(b"n0"), Ok(Perm::new(Access::None, 0)));
        assert_eq!(Perm::parse(b"r1"), Ok(Perm::new(Access::Read, 1)));
        assert_eq!(Perm::parse(b"w2"), Ok(Perm::new(Access::Write, 2)));
        assert_eq!(Perm::parse(b"b3"), Ok(Perm::new(Access::Both, 3)));
        for bad in [&b""[..], b"x1", b"r", b"r-1", b"r65536", b"r1a", b" r1"] {
            assert_eq!(Perm::parse(bad), Err(Errno::EINVAL));
        }
        assert_eq!(Perm::new(Access::Both, 65535).to_string(), "b65535");
    }

    #[test]
    fn errors() {
        for e in Errno::ALL {
            assert_eq!(Errno::from_payload(&e.to_payload()), e);
        }
        assert_eq!(Errno::from_payload(b"EWHAT\0"), Errno::EINVAL);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(XsRequest::decode(MsgType::Read, b"/a"), Err(Errno::EINVAL));
        assert_eq!(
            XsRequest::decode(MsgType::Read, b"/a\0/b\0"),
            Err(Errno::EINVAL)
        );
        assert_eq!(XsRequest::decode(MsgType::Write, b"/a"), Err(Errno::EINVAL));
        assert_eq!(
            XsRequest::decode(MsgType::TransactionEnd, b"X\0"),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            XsRequest::decode(MsgType::Unknown(999), b""),
            Err(Errno::ENOSYS)
        );
        assert_eq!(
            XsRequest::decode(MsgType::Error, b"EINVAL\0"),
            Err(Errno::ENOSYS)
        );
        assert_eq!(
            XsRequest::decode(MsgType::Write, b"/a\0x\0y"),
            Ok(XsRequest::Write {
                path: "/a".into(),
                value: b"x\0y".to_vec()
            })
        );
    }

    #[test]
    fn read_message_checks_length_before_allocating() {
        let h = Header {
            msg_type: MsgType::Read,
            req_id: 1,
            tx_id: 0,
            len: u32::MAX,
        };
        let bytes = h.encode();
        assert!(matches!(
            read_message(&mut &bytes[..]),
            Err(WireError::TooLong(u32::MAX))
        ));
        assert!(matches!(
            read_message(&mut &bytes[..5]),
            Err(WireError::Truncated)
        ));
        assert!(matches!(read_message(&mut &b""[..]), Ok(None)));
    }

    #[test]
    fn parse_message_framing() {
        assert_eq!(parse_message(b"short"), Err(MessageError::ShortHeader(5)));
        let mut m = Header {
            msg_type: MsgType::Read,
            req_id: 1,
            tx_id: 0,
            len: 5000,
        }
        .encode()
        .to_vec();
        assert_eq!(parse_message(&m), Err(MessageError::TooLong(5000)));
        m = Header {
            msg_type: MsgType::Read,
            req_id: 1,
            tx_id: 0,
            len: 3,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(b"/a");
        assert_eq!(
            parse_message(&m),
            Err(MessageError::ShortPayload {
                expected: 3,
                got: 2
            })
        );
        m.push(0);
        m.extend_from_slice(b"next");
        let p = parse_message(&m).unwrap();
        assert_eq!(p.request, Ok(XsRequest::Read { path: "/a".into() }));
        assert_eq!(p.consumed, HEADER_LEN + 3);
    }
}
