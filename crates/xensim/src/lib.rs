//! A simulated Xen host, all in one process, with Xen's isolation between domains: a frontend
//! and a backend share nothing but granted pages, event channels and xenstore.
//!
//! - Guest memory is a memfd per domain ([`SimDomain::page`] is the guest's own view); a
//!   backend only ever sees it through [`GrantMapper`] mappings of granted pages (mmaps of the
//!   memfd, [`mem`]) or grant copies.
//! - Each domain's grant table is `grant_entry_v1` entries (xen/include/public/grant_table.h)
//!   in its own shared memfd; the guest fills entries ([`SimDomain::grant`], or anything at
//!   all with [`SimDomain::write_grant_entry_raw`]) and the "hypervisor" ([`SimGrantMapper`])
//!   validates a single read of each entry, as Xen does. See [`grant`] for the protocol.
//! - Event channels ([`evtchn`]) are eventfds, one per port, connected as
//!   xen/include/public/event_channel.h describes.
//! - Xenstore is the in-process xenstored ([`xenstored::Server`]) on a unix socket in a
//!   private temporary directory; [`SimXen::xenstore`] gives a connection with a domain's
//!   permissions.
//!
//! It implements the interfaces of [`xdisk_xen::platform`] and speaks the wire protocol of
//! [`xdisk_xen::xenstore`], so the backend runs on it unchanged. Production code does not link
//! this crate: `xdisk-backend` has it as a dev-dependency only, `xdisk-daemon` only with its
//! `sim` feature, which the `xdisk` binary turns on for its simulation modes (`xdisk serve
//! --platform sim`, `xdisk bench`, the demos); `xdisk-blkfront` (tests and benchmarks) is
//! built on it.
//!
//! `unsafe` is denied crate-wide; only [`mem`] (memfd and mmap) allows it.
//!
//! ```no_run
//! # fn main() -> Result<(), xdisk_xensim::SimError> {
//! use xdisk_xen::platform::SharedMem;
//! use xdisk_xensim::SimXen;
//! let xen = SimXen::new()?;
//! let guest = xen.create_domain(1, 64)?;
//! guest.page(3)?.copy_to(0, b"hello")?;
//! let gref = guest.grant(3, 0, true)?;
//! let region = xen.grant_mapper(0).map(1, &[gref], false)?;
//! let mut buf = [0u8; 5];
//! region.copy_from(0, &mut buf)?;
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod evtchn;
pub mod grant;
pub mod mem;
pub mod xenstored;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use xdisk_xen::platform::{
    DomId, EventChannels, GrantMapper, GrantRef, MappedRegion, PlatformError,
};
use xdisk_xen::xenstore::wire::DOMID_FIRST_RESERVED;
use xdisk_xen::xenstore::{Access, Client, Errno, Perm};
use xenstored::Server;

pub use evtchn::{SimEventChannels, SimPort, MAX_PORTS};
pub use grant::{
    GrantEntry, SimGrantMapper, DEFAULT_GRANT_ENTRIES, GNTTAB_NR_RESERVED_ENTRIES,
    GTF_ACCEPT_TRANSFER, GTF_INVALID, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_SUB_PAGE,
    GTF_TRANSITIVE, GTF_TYPE_MASK, GTF_WRITING, MAX_MAP_PAGES,
};

use evtchn::EvtchnHub;
use grant::{DomainMem, Hypervisor};

/// Errors of the simulation's management calls.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// [`SimXen::create_domain`] with the id of a live domain.
    #[error("domain {0} already exists")]
    DomainExists(DomId),
    /// [`SimXen::destroy_domain`] of a domain that does not exist (or was destroyed).
    #[error("no domain {0}")]
    NoSuchDomain(DomId),
    /// A domain id that cannot be created: 0 (dom0 is the host itself) or from
    /// `DOMID_FIRST_RESERVED` (0x7FF0) up.
    #[error("invalid domain id {0}")]
    InvalidDomId(DomId),
    /// A page index (or range) past the end of the domain's memory. From
    /// [`SimXen::create_domain`]: a page count over `u32::MAX` (`page` is then the count
    /// asked for, `pages` the limit).
    #[error("page {page} is outside the domain's {pages} pages")]
    BadPage {
        /// The page index (the last of a range) asked for.
        page: usize,
        /// Pages the domain has.
        pages: usize,
    },
    /// A grant reference past the end of the domain's grant table.
    #[error("grant reference {gref} is outside the {entries}-entry grant table")]
    BadGrantRef {
        /// The reference.
        gref: GrantRef,
        /// Entries in the table.
        entries: u32,
    },
    /// [`SimDomain::grant`] found no free grant reference: every entry past the
    /// [`GNTTAB_NR_RESERVED_ENTRIES`] is in use.
    #[error("grant table of domain {0} is full")]
    GrantTableFull(DomId),
    /// A xenstore operation of the simulation failed (connecting as a domain, writing a new
    /// domain's nodes).
    #[error("xenstore: {0}")]
    Xenstore(#[from] xdisk_xen::xenstore::Error),
    /// The in-process xenstored refused a domain operation (introducing or releasing it).
    #[error("xenstore: {0}")]
    Xs(#[from] Errno),
    /// A system call failed: creating the simulation's directory or its xenstored socket, a
    /// domain's memfds, an mmap of its pages.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `memory of domain 5`.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A grant or event channel operation failed (for `?` in code that mixes them with the
    /// management calls).
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// An out-of-bounds access to a page or mapping (for `?` on [`SharedMem`] accessors, as
    /// in the crate example).
    ///
    /// [`SharedMem`]: xdisk_xen::platform::SharedMem
    #[error(transparent)]
    Mem(#[from] xdisk_xen::platform::MemError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let context = context.into();
    move |source| SimError::Io { context, source }
}

/// A private temporary directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = base.join(format!("xdisk-sim-{}-{n}-{nanos:x}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One simulated Xen host: the hypervisor's domains and grant tables, event channels and
/// xenstored. Dom0 (domid 0) exists from the start (no memory of its own: it is the usual
/// backend domain). Dropping the last `Arc` stops xenstored.
#[derive(Debug)]
pub struct SimXen {
    hyp: Arc<Hypervisor>,
    evt: Arc<EvtchnHub>,
    /// Dom0's toolstack connection.
    admin: Client,
    // Field order: the server stops before its directory is removed.
    server: Server,
    _dir: TempDir,
}

impl SimXen {
    /// Starts xenstored on a unix socket in a new temporary directory and creates dom0
    /// (`/local/domain/0/{name,domid}`).
    pub fn new() -> Result<Arc<SimXen>, SimError> {
        let dir = TempDir::new().map_err(io_err("creating the simulation directory"))?;
        let sock = dir.0.join("xenstored.sock");
        let server = Server::bind(&sock).map_err(io_err("starting xenstored"))?;
        let admin = server.client_as(0)?;
        admin.write("/local/domain/0/name", "Domain-0")?;
        admin.write("/local/domain/0/domid", "0")?;
        let evt = Arc::new(EvtchnHub::default());
        evt.add_domain(0);
        Ok(Arc::new(SimXen {
            hyp: Arc::new(Hypervisor::default()),
            evt,
            admin,
            server,
            _dir: dir,
        }))
    }

    /// The xenstored socket (connections there act as dom0; `XENSTORED_PATH` for xl tools).
    pub fn xenstore_path(&self) -> &Path {
        self.server
            .socket_path()
            .expect("the simulation's xenstored listens on a socket")
    }

    /// The in-process xenstored.
    pub fn xenstore_server(&self) -> &Server {
        &self.server
    }

    /// A new xenstore connection acting as `domid` (its permissions and quotas, relative paths
    /// under `/local/domain/<domid>`).
    pub fn xenstore(&self, domid: DomId) -> Result<Client, SimError> {
        Ok(self.server.client_as(domid)?)
    }

    /// Creates domain `domid` with `pages` 4 KiB pages of zeroed memory and a grant table of
    /// [`DEFAULT_GRANT_ENTRIES`] entries; writes `/local/domain/<domid>/{name,domid}` owned by
    /// the domain and fires `@introduceDomain`.
    pub fn create_domain(
        self: &Arc<Self>,
        domid: DomId,
        pages: usize,
    ) -> Result<Arc<SimDomain>, SimError> {
        self.create_domain_with(domid, pages, DEFAULT_GRANT_ENTRIES)
    }

    /// [`SimXen::create_domain`] with a grant table of `grant_entries` entries.
    pub fn create_domain_with(
        self: &Arc<Self>,
        domid: DomId,
        pages: usize,
        grant_entries: u32,
    ) -> Result<Arc<SimDomain>, SimError> {
        if domid == 0 || u32::from(domid) >= DOMID_FIRST_RESERVED {
            return Err(SimError::InvalidDomId(domid));
        }
        if pages > u32::MAX as usize {
            return Err(SimError::BadPage {
                page: pages,
                pages: u32::MAX as usize,
            });
        }
        let mem = {
            let mut doms = self
                .hyp
                .domains
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if doms.contains_key(&domid) {
                return Err(SimError::DomainExists(domid));
            }
            let mem = Arc::new(
                DomainMem::new(domid, pages, grant_entries)
                    .map_err(io_err(format!("memory of domain {domid}")))?,
            );
            doms.insert(domid, mem.clone());
            mem
        };
        self.evt.add_domain(domid);
        let path = format!("/local/domain/{domid}");
        let setup = || -> Result<(), SimError> {
            self.admin.mkdir(&path)?;
            self.admin
                .set_perms(&path, &[Perm::new(Access::None, domid)])?;
            self.admin
                .write(&format!("{path}/name"), format!("sim-{domid}"))?;
            self.admin
                .write(&format!("{path}/domid"), domid.to_string())?;
            self.server.introduce_domain(domid)?;
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = self.destroy_domain(domid);
            return Err(e);
        }
        Ok(Arc::new(SimDomain {
            mem,
            xen: self.clone(),
        }))
    }

    /// Destroys a domain: its event channels close (peers become unbound), its grants can no
    /// longer be mapped or copied (`BadDomain`; existing mappings stay valid memory until
    /// dropped, as with Xen), `/local/domain/<domid>` is removed and `@releaseDomain` fires.
    pub fn destroy_domain(&self, domid: DomId) -> Result<(), SimError> {
        let mem = self
            .hyp
            .domains
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&domid)
            .ok_or(SimError::NoSuchDomain(domid))?;
        mem.alive.store(false, Ordering::Release);
        self.evt.remove_domain(domid);
        let _ = self.admin.rm(&format!("/local/domain/{domid}"));
        match self.server.release_domain(domid) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `domid` exists (dom0 always does).
    pub fn domain_exists(&self, domid: DomId) -> bool {
        domid == 0 || self.hyp.domain(domid).is_some()
    }

    /// The grant mapper of backend domain `backend_domid` (maps grants made to that domain).
    pub fn grant_mapper(&self, backend_domid: DomId) -> Arc<dyn GrantMapper> {
        Arc::new(SimGrantMapper::new(self.hyp.clone(), backend_domid))
    }

    /// The event channel operations of `domid`.
    pub fn event_channels(&self, domid: DomId) -> Arc<dyn EventChannels> {
        Arc::new(SimEventChannels::new(self.evt.clone(), domid))
    }

    /// Open event channel ports of `domid` (for leak checks in tests).
    pub fn event_channel_count(&self, domid: DomId) -> usize {
        self.evt.port_count(domid)
    }
}

/// A simulated guest: its memory, its grant table and its view of event channels and xenstore
/// (what a frontend driver in that guest uses). Dropping it does not destroy the domain
/// ([`SimXen::destroy_domain`] does).
#[derive(Debug)]
pub struct SimDomain {
    mem: Arc<DomainMem>,
    xen: Arc<SimXen>,
}

impl SimDomain {
    /// The domain's id: the `domid` with which a backend maps this guest's grants and binds
    /// its event channels.
    pub fn domid(&self) -> DomId {
        self.mem.domid
    }

    /// Number of 4 KiB pages of memory.
    pub fn pages(&self) -> usize {
        self.mem.pages
    }

    /// Number of grant table entries.
    pub fn grant_entries(&self) -> u32 {
        self.mem.entries
    }

    /// Whether the domain has not been destroyed.
    pub fn is_alive(&self) -> bool {
        self.mem.alive.load(Ordering::Acquire)
    }

    /// The simulated host.
    pub fn xen(&self) -> &Arc<SimXen> {
        &self.xen
    }

    /// The guest's own writable view of page `idx` (to fill or read buffers it grants).
    pub fn page(&self, idx: usize) -> Result<Arc<dyn MappedRegion>, SimError> {
        self.pages_region(idx, 1)
    }

    /// The guest's own writable view of pages `first..first + count`, contiguous.
    pub fn pages_region(
        &self,
        first: usize,
        count: usize,
    ) -> Result<Arc<dyn MappedRegion>, SimError> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.mem.pages && count > 0);
        if end.is_none() {
            return Err(SimError::BadPage {
                page: first.saturating_add(count.max(1) - 1),
                pages: self.mem.pages,
            });
        }
        let region = self
            .mem
            .mem
            .map(first as u64, count, true)
            .map_err(io_err(format!("mapping pages of domain {}", self.domid())))?;
        Ok(Arc::new(region))
    }

    /// Grants page `page_idx` to domain `to` (read-only or writable), like Linux's
    /// `gnttab_grant_foreign_access`; returns the reference.
    pub fn grant(&self, page_idx: usize, to: DomId, readonly: bool) -> Result<GrantRef, SimError> {
        if page_idx >= self.mem.pages {
            return Err(SimError::BadPage {
                page: page_idx,
                pages: self.mem.pages,
            });
        }
        self.mem
            .grant(page_idx as u32, to, readonly)
            .ok_or(SimError::GrantTableFull(self.domid()))
    }

    /// Revokes a grant, like `gnttab_end_foreign_access_ref`: `Ok(false)` (and the grant
    /// stays) while the entry is mapped or being copied (`GTF_reading`/`GTF_writing` set);
    /// `Ok(true)` once revoked (the reference returns to the allocator).
    pub fn end_grant(&self, gref: GrantRef) -> Result<bool, SimError> {
        self.mem.end_grant(gref).ok_or_else(|| self.bad_ref(gref))
    }

    /// Reads a grant table entry (one atomic load).
    pub fn grant_entry(&self, gref: GrantRef) -> Result<GrantEntry, SimError> {
        self.mem.load_entry(gref).ok_or_else(|| self.bad_ref(gref))
    }

    /// Writes an arbitrary grant table entry (hostile guests): any flags, domid and frame,
    /// including frames past the end of memory. Does not touch the reference allocator.
    pub fn write_grant_entry_raw(
        &self,
        gref: GrantRef,
        flags: u16,
        domid: DomId,
        frame: u32,
    ) -> Result<(), SimError> {
        if self.mem.store_entry(
            gref,
            GrantEntry {
                flags,
                domid,
                frame,
            },
        ) {
            Ok(())
        } else {
            Err(self.bad_ref(gref))
        }
    }

    /// Pins the hypervisor holds on `gref` (mappings and copies in progress).
    pub fn grant_pin_count(&self, gref: GrantRef) -> u32 {
        self.mem.pin_count(gref)
    }

    /// The guest's event channel operations (`alloc_unbound` for a frontend).
    pub fn events(&self) -> Arc<dyn EventChannels> {
        self.xen.event_channels(self.domid())
    }

    /// A new xenstore connection as this domain.
    pub fn xenstore(&self) -> Result<Client, SimError> {
        self.xen.xenstore(self.domid())
    }

    fn bad_ref(&self, gref: GrantRef) -> SimError {
        SimError::BadGrantRef {
            gref,
            entries: self.mem.entries,
        }
    }
}
