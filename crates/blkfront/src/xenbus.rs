//! The xenbus side of the frontend: negotiation ([`FrontConfig`], [`DiskInfo`]), the handshake
//! through the `state` nodes (Linux blkfront's `talk_to_blkback`, `blkfront_connect` and
//! `blkback_changed`), the backend's xenstore nodes, and teardown and reconnection.

use std::time::{Duration, Instant};

use xdisk_blkif::xenbus::{keys, parse_bool, parse_u64};
use xdisk_blkif::{Abi, XenbusState};
use xdisk_xen::platform::DomId;
use xdisk_xen::xenstore::{Client, Errno};

use crate::error::xs_err;
use crate::misbehave::Misbehave;
use crate::{Error, Frontend, Result};

/// How the frontend negotiates.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Backend directory; `None` reads the frontend's `backend` node.
    pub backend_dir: Option<String>,
    /// Backend domain; `None` reads the frontend's `backend-id` node.
    pub backend_domid: Option<DomId>,
    /// Largest ring page order wanted (the backend's maximum applies).
    pub max_ring_page_order: u32,
    /// Queues wanted (the backend's maximum applies).
    pub max_queues: u32,
    /// Largest indirect request wanted, in segments (0: never indirect).
    pub max_indirect_segments: u16,
    /// Offer and use persistent grants.
    pub persistent: bool,
    /// Persistent grants (pages) per queue at most.
    pub max_persistent_grants: usize,
    /// The ring ABI; `None` writes no `protocol` node (the backend's native ABI).
    pub protocol: Option<Abi>,
    /// Start each request's data this many sectors into its first page (0..=7).
    pub first_sect: u8,
    /// How long to wait for the backend.
    pub timeout: Duration,
    /// Hostile behaviours.
    pub misbehave: Misbehave,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            backend_dir: None,
            backend_domid: None,
            max_ring_page_order: 4,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent: true,
            max_persistent_grants: 1056,
            protocol: Some(Abi::Native),
            first_sect: 0,
            timeout: Duration::from_secs(20),
            misbehave: Misbehave::default(),
        }
    }
}

/// What was negotiated and what the backend says of the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// `sectors`.
    pub sectors: u64,
    /// `sector-size`.
    pub sector_size: u32,
    /// `physical-sector-size` (absent: `sector-size`).
    pub physical_sector_size: u32,
    /// `info` (VDISK_* bits).
    pub info: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity` (bytes).
    pub discard_granularity: u32,
    /// `discard-secure`.
    pub discard_secure: bool,
    /// Indirect segments per request in use (0: none).
    pub max_indirect_segments: u16,
    /// Persistent grants in use.
    pub persistent: bool,
    /// Ring page order in use.
    pub ring_page_order: u32,
    /// Queues in use.
    pub queues: usize,
    /// Entries per ring.
    pub ring_size: u32,
}

pub(crate) fn read_opt(xs: &Client, path: &str) -> Result<Option<String>> {
    match xs.read_string(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(xs_err(path)(e)),
    }
}

impl Frontend {
    fn path(&self, key: &str) -> String {
        format!("{}/{key}", self.fe)
    }

    fn be_path(&self, key: &str) -> String {
        format!("{}/{key}", self.be)
    }

    fn read_be(&self, key: &str) -> Result<Option<String>> {
        read_opt(&self.xs, &self.be_path(key))
    }

    fn be_u64(&self, key: &str, default: u64) -> Result<u64> {
        match self.read_be(key)? {
            None => Ok(default),
            Some(v) => parse_u64(&v).map_err(|e| Error::Node {
                node: self.be_path(key),
                reason: e.to_string(),
            }),
        }
    }

    fn be_bool(&self, key: &str) -> Result<bool> {
        match self.read_be(key)? {
            None => Ok(false),
            Some(v) => parse_bool(&v).map_err(|e| Error::Node {
                node: self.be_path(key),
                reason: e.to_string(),
            }),
        }
    }

    /// The backend's state (`Unknown` if the node is absent or invalid).
    pub fn backend_state(&self) -> Result<XenbusState> {
        Ok(self
            .read_be(keys::STATE)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(XenbusState::Unknown))
    }

    /// Waits until the backend's state satisfies `want`; fails on timeout, or when `fail`
    /// says the state is an error.
    pub fn wait_backend(
        &self,
        what: &str,
        want: impl Fn(XenbusState) -> bool,
        fail: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            let s = self.backend_state()?;
            if want(s) {
                return Ok(s);
            }
            if fail(s) {
                return Err(Error::BackendState(s, what.to_owned()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!("{what} (backend is {})", s.name())));
            }
            let _ = self.be_watch.recv_timeout(deadline - now);
        }
    }

    fn set_state(&self, s: XenbusState) -> Result<()> {
        let p = self.path(keys::STATE);
        self.xs.write(&p, s.to_string()).map_err(xs_err(&p))
    }

    /// Linux blkfront's `talk_to_blkback` and `blkfront_connect`.
    pub(crate) fn talk_to_backend(&mut self) -> Result<()> {
        // A backend still Closed from a previous connection moves to InitWait once it sees
        // our Initialising.
        self.wait_backend(
            "the backend's InitWait",
            |s| s == XenbusState::InitWait,
            |s| s == XenbusState::Closing,
        )?;
        let max_order = self.be_u64(keys::MAX_RING_PAGE_ORDER, 0)?;
        let order = (self.cfg.max_ring_page_order as u64).min(max_order) as u32;
        let max_queues = self.be_u64(keys::MULTI_QUEUE_MAX_QUEUES, 1)?.max(1);
        let nr_queues = (self.cfg.max_queues.max(1) as u64).min(max_queues) as usize;
        let be_persistent = self.be_bool(keys::FEATURE_PERSISTENT)?;
        let persistent = self.cfg.persistent && be_persistent;

        let mut queues = Vec::with_capacity(nr_queues);
        for _ in 0..nr_queues {
            match self.setup_queue(order) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    for q in queues {
                        self.free_queue(q);
                    }
                    return Err(e);
                }
            }
        }
        self.queues = queues;
        let ring_size = self.queues.first().map_or(0, |q| q.ring.size());

        // The nodes, then Initialised (blkif.h "Feature and Parameter Negotiation").
        let mb = self.cfg.misbehave.clone();
        let mut nodes: Vec<(String, String)> = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            let dir = if nr_queues == 1 {
                String::new()
            } else {
                keys::queue_dir(i as u32)
            };
            for (j, g) in q.ring_grants.iter().enumerate() {
                let key = if order == 0 {
                    keys::RING_REF.to_owned()
                } else {
                    keys::ring_ref(j as u32)
                };
                let v = match (&mb.ring_ref, i, j) {
                    (Some(bad), 0, 0) => bad.clone(),
                    _ => g.to_string(),
                };
                nodes.push((format!("{dir}{key}"), v));
            }
            let port = match (&mb.event_channel, i) {
                (Some(bad), 0) => bad.clone(),
                _ => q.evtchn.local_port().to_string(),
            };
            nodes.push((format!("{dir}{}", keys::EVENT_CHANNEL), port));
        }
        if order > 0 {
            nodes.push((keys::RING_PAGE_ORDER.into(), order.to_string()));
        }
        if nr_queues > 1 {
            nodes.push((keys::MULTI_QUEUE_NUM_QUEUES.into(), nr_queues.to_string()));
        }
        if let Some(p) = mb.protocol.clone() {
            nodes.push((keys::PROTOCOL.into(), p));
        } else if let Some(abi) = self.cfg.protocol {
            nodes.push((keys::PROTOCOL.into(), abi.protocol_name().into()));
        }
        nodes.push((
            keys::FEATURE_PERSISTENT.into(),
            if self.cfg.persistent { "1" } else { "0" }.into(),
        ));
        nodes.extend(mb.extra_nodes.iter().cloned());
        let fe = self.fe.clone();
        self.xs
            .transaction(|tx| {
                for (k, v) in &nodes {
                    tx.write(&format!("{fe}/{k}"), v)?;
                }
                tx.write(
                    &format!("{fe}/{}", keys::STATE),
                    XenbusState::Initialised.to_string(),
                )
            })
            .map_err(xs_err(&fe))?;

        self.wait_backend(
            "the backend's Connected",
            |s| s == XenbusState::Connected,
            |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
        )?;
        self.read_disk_info()?;
        let max_indirect = self.be_u64(keys::FEATURE_MAX_INDIRECT_SEGMENTS, 0)?;
        self.info.max_indirect_segments =
            (self.cfg.max_indirect_segments as u64).min(max_indirect) as u16;
        self.info.persistent = persistent;
        self.info.ring_page_order = order;
        self.info.queues = nr_queues;
        self.info.ring_size = ring_size;
        self.set_state(XenbusState::Connected)?;
        self.connected = true;
        Ok(())
    }

    /// Re-reads `sectors`, `info`, sector sizes and features (after a resize, too).
    pub fn read_disk_info(&mut self) -> Result<()> {
        let sector_size = self.be_u64(keys::SECTOR_SIZE, 512)? as u32;
        self.info.sectors = self.be_u64(keys::SECTORS, 0)?;
        self.info.sector_size = sector_size;
        self.info.physical_sector_size =
            self.be_u64(keys::PHYSICAL_SECTOR_SIZE, u64::from(sector_size))? as u32;
        self.info.info = self.be_u64(keys::INFO, 0)? as u32;
        self.info.flush = self.be_bool(keys::FEATURE_FLUSH_CACHE)?;
        self.info.barrier = self.be_bool(keys::FEATURE_BARRIER)?;
        self.info.discard = self.be_bool(keys::FEATURE_DISCARD)?;
        self.info.discard_granularity = self.be_u64(keys::DISCARD_GRANULARITY, 512)? as u32;
        self.info.discard_secure = self.be_bool(keys::DISCARD_SECURE)?;
        Ok(())
    }

    // ---- Teardown and reconnection ----

    /// Closes the device: `Closing`, waits for the backend to close, revokes every grant
    /// (counting those the backend still holds in [`Frontend::leaked_grants`]), frees the
    /// rings and event channels, `Closed`.
    pub fn disconnect(&mut self) -> Result<()> {
        self.set_state(XenbusState::Closing)?;
        let r = self.wait_backend(
            "the backend to close",
            |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
            |_| false,
        );
        // Late responses (the backend answers everything it consumed before closing).
        for qi in 0..self.queues.len() {
            let _ = self.reap(qi);
        }
        self.free_all();
        self.set_state(XenbusState::Closed)?;
        r.map(drop)
    }

    fn free_all(&mut self) {
        self.connected = false;
        for q in std::mem::take(&mut self.queues) {
            self.free_queue(q);
        }
    }

    /// After [`Frontend::disconnect`] (or a backend-initiated close): `Initialising`, waits
    /// for the backend's `InitWait`, and negotiates and connects again.
    pub fn reconnect(&mut self) -> Result<()> {
        if !self.queues.is_empty() {
            self.free_all();
        }
        // [`Frontend::disconnect`] returns once the backend is Closing: it goes Closed when
        // it sees our Closed. Initialising before that would find it Closing, which
        // talk_to_backend takes as a refusal.
        self.wait_backend(
            "the backend to finish closing",
            |s| s != XenbusState::Closing,
            |_| false,
        )?;
        self.set_state(XenbusState::Initialising)?;
        self.talk_to_backend()
    }

    /// Linux blkfront's `blkback_changed` while connected: takes the events of the watch on
    /// the backend's `state` and, if there were any and the backend is still `Connected`,
    /// re-reads the disk properties (an online resize rewrites `sectors`, then `state`).
    /// Returns the new size in sectors when it changed. Cheap when nothing happened.
    pub fn check_backend(&mut self) -> Result<Option<u64>> {
        let mut fired = false;
        while self.be_watch.try_recv().is_some() {
            fired = true;
        }
        if !fired || !self.connected || self.backend_state()? != XenbusState::Connected {
            return Ok(None);
        }
        let before = self.info.sectors;
        self.read_disk_info()?;
        Ok((self.info.sectors != before).then_some(self.info.sectors))
    }
}
