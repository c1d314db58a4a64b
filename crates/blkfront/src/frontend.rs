//! The [`Frontend`]: its state, [`Frontend::connect`] and what it tells of itself.

use std::collections::VecDeque;
use std::sync::Arc;

use xdisk_blkif::xenbus::parse_u32;
use xdisk_blkif::Abi;
use xdisk_xen::platform::{DomId, MappedRegion};
use xdisk_xen::xenstore::{Client, Watch};
use xdisk_xensim::SimDomain;

use crate::error::xs_err;
use crate::grants::{Grant, PageAlloc};
use crate::queue::Queue;
use crate::xenbus::read_opt;
use crate::{Completion, DiskInfo, Error, FrontConfig, Result};

/// A connected (or disconnected) frontend.
pub struct Frontend {
    pub(crate) dom: Arc<SimDomain>,
    pub(crate) mem: Arc<dyn MappedRegion>,
    pub(crate) xs: Client,
    pub(crate) fe: String,
    pub(crate) be: String,
    pub(crate) be_domid: DomId,
    pub(crate) cfg: FrontConfig,
    pub(crate) alloc: PageAlloc,
    pub(crate) queues: Vec<Queue>,
    pub(crate) info: DiskInfo,
    pub(crate) be_watch: Watch,
    pub(crate) next_tag: u64,
    pub(crate) ready: VecDeque<Completion>,
    pub(crate) leaked: usize,
    pub(crate) connected: bool,
    pub(crate) abi: Abi,
    /// Byte buffers for read data and write data, reused ([`Frontend::buffer`],
    /// [`Frontend::recycle`]).
    pub(crate) bufs: Vec<Vec<u8>>,
    /// Spare `Shadow` page lists (no allocation per request).
    pub(crate) spare_grants: Vec<Vec<Grant>>,
    /// [`Frontend::plug`]ged: requests are published in batches.
    pub(crate) plugged: bool,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("fe", &self.fe)
            .field("be", &self.be)
            .field("info", &self.info)
            .finish()
    }
}

impl Frontend {
    /// Connects to the backend of the device whose frontend directory is `fe_dir` (e.g.
    /// `/local/domain/5/device/vbd/768`), as the guest `dom` with its xenstore connection
    /// `xs`. Returns once both ends are `Connected`.
    pub fn connect(
        xs: Client,
        dom: Arc<SimDomain>,
        fe_dir: &str,
        cfg: FrontConfig,
    ) -> Result<Frontend> {
        let fe = fe_dir.trim_end_matches('/').to_owned();
        let be = match &cfg.backend_dir {
            Some(b) => b.clone(),
            None => read_opt(&xs, &format!("{fe}/backend"))?.ok_or_else(|| Error::Node {
                node: format!("{fe}/backend"),
                reason: "missing".into(),
            })?,
        };
        let be_domid = match cfg.backend_domid {
            Some(d) => d,
            None => {
                let p = format!("{fe}/backend-id");
                let v = read_opt(&xs, &p)?.unwrap_or_else(|| "0".into());
                parse_u32(&v)
                    .ok()
                    .and_then(|d| DomId::try_from(d).ok())
                    .ok_or(Error::Node {
                        node: p,
                        reason: format!("invalid {v:?}"),
                    })?
            }
        };
        let token = format!("xdisk-blkfront:{fe}");
        let be_watch = xs
            .watch(&format!("{be}/state"), &token)
            .map_err(xs_err(&be))?;
        let mem = dom.pages_region(0, dom.pages())?;
        let abi = cfg.protocol.unwrap_or(Abi::Native);
        let mut f = Frontend {
            alloc: PageAlloc::new(dom.pages()),
            dom,
            mem,
            xs,
            fe,
            be,
            be_domid,
            cfg,
            queues: Vec::new(),
            info: DiskInfo::default(),
            be_watch,
            next_tag: 1,
            ready: VecDeque::new(),
            leaked: 0,
            connected: false,
            abi,
            bufs: Vec::new(),
            spare_grants: Vec::new(),
            plugged: false,
        };
        f.talk_to_backend()?;
        Ok(f)
    }

    /// What was negotiated.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The frontend directory.
    pub fn frontend_dir(&self) -> &str {
        &self.fe
    }

    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        &self.be
    }

    /// The guest.
    pub fn domain(&self) -> &Arc<SimDomain> {
        &self.dom
    }

    /// The xenstore connection.
    pub fn xenstore(&self) -> &Client {
        &self.xs
    }

    /// Whether the rings are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Grants the backend still held when the frontend tried to revoke them (0 for a backend
    /// that unmaps everything it should).
    pub fn leaked_grants(&self) -> usize {
        self.leaked
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.shadow.iter().filter(|s| s.is_some()).count())
            .sum()
    }

    /// Persistent grants held by the frontend (all queues).
    pub fn persistent_grants(&self) -> usize {
        self.queues.iter().map(|q| q.pool_total).sum()
    }
}
