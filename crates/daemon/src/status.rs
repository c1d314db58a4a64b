//! What the daemon reports about its devices (control socket, `xdisk stat`).

use serde::{Deserialize, Serialize};
use xdisk_backend::{DeviceStats, Histogram, LATENCY_BUCKETS};

/// Counters of one device, as Linux blkback's sysfs `statistics/` (`rd_req`, `wr_req`,
/// `f_req`, `ds_req`, `rd_sect`, `wr_sect`, ...) plus xdisk's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rd_req: u64,
    pub wr_req: u64,
    pub f_req: u64,
    pub barrier_req: u64,
    pub ds_req: u64,
    pub indirect_req: u64,
    pub rd_sect: u64,
    pub wr_sect: u64,
    pub ds_sect: u64,
    pub errors: u64,
    pub eopnotsupp: u64,
    pub in_flight: u64,
    pub responses: u64,
    pub persistent_grants: u64,
    pub mappings: u64,
    pub queues: u64,
    pub connects: u64,
    pub protocol_errors: u64,
    /// Queues that outlived a disconnection (I/O in flight), queues whose I/O could never be
    /// reaped (the device was failed), and whether the image is broken (a flush failed).
    #[serde(default)]
    pub lingering_queues: u64,
    #[serde(default)]
    pub stuck_queues: u64,
    #[serde(default)]
    pub image_broken: u64,
    /// Microseconds with at least one request in flight (`%util` is its rate).
    #[serde(default)]
    pub busy_us: u64,
    /// Persistent-grant cache lookups that found the grant mapped, and those that mapped it.
    #[serde(default)]
    pub persistent_grant_hits: u64,
    #[serde(default)]
    pub persistent_grant_misses: u64,
    /// Latency of reads, writes, flushes (and barriers), consumption to response.
    #[serde(default)]
    pub rd_lat: Latency,
    #[serde(default)]
    pub wr_lat: Latency,
    #[serde(default)]
    pub f_lat: Latency,
}

/// A latency histogram: per-bucket counts (not cumulative) over the bounds
/// [`xdisk_backend::LATENCY_BOUNDS_US`] then `+Inf`, the sum (µs) and the count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub sum_us: u64,
    pub count: u64,
}

impl From<Histogram> for Latency {
    fn from(h: Histogram) -> Latency {
        Latency {
            buckets: h.buckets,
            sum_us: h.sum_us,
            count: h.count,
        }
    }
}

impl From<DeviceStats> for Counters {
    fn from(s: DeviceStats) -> Counters {
        Counters {
            rd_req: s.rd_req,
            wr_req: s.wr_req,
            f_req: s.f_req,
            barrier_req: s.barrier_req,
            ds_req: s.ds_req,
            indirect_req: s.indirect_req,
            rd_sect: s.rd_sect,
            wr_sect: s.wr_sect,
            ds_sect: s.ds_sect,
            errors: s.errors,
            eopnotsupp: s.eopnotsupp,
            in_flight: s.in_flight,
            responses: s.responses,
            persistent_grants: s.persistent_grants,
            mappings: s.mappings,
            queues: s.queues,
            connects: s.connects,
            protocol_errors: s.protocol_errors,
            lingering_queues: s.lingering_queues,
            stuck_queues: s.stuck_queues,
            image_broken: s.image_broken,
            busy_us: s.busy_us,
            persistent_grant_hits: s.pgrant_hits,
            persistent_grant_misses: s.pgrant_misses,
            rd_lat: s.rd_lat.into(),
            wr_lat: s.wr_lat.into(),
            f_lat: s.f_lat.into(),
        }
    }
}

/// Where a device is in the daemon's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Opening the image and starting the backend.
    Starting,
    /// The backend runs (see `xenbus_state` for the handshake).
    Running,
    /// Shutting down (frontend gone, nodes removed, daemon stopping).
    Stopping,
    /// Refused (bad nodes, bad image): `hotplug-status` is `error`.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

/// One device of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// `<type>/<frontend domid>/<devid>`, e.g. `qdisk/5/51712`.
    pub name: String,
    pub backend_type: String,
    pub frontend_domid: u16,
    pub devid: u32,
    /// `xvdX` when the number is an xvd whole disk.
    pub vdev: Option<String>,
    pub backend_path: String,
    pub frontend_path: Option<String>,
    pub image: Option<String>,
    pub format: Option<String>,
    pub read_only: bool,
    pub cache: Option<String>,
    pub phase: Phase,
    /// The backend's xenbus state (name), while running.
    pub xenbus_state: Option<String>,
    /// Disk size in bytes, once open.
    pub size: Option<u64>,
    pub error: Option<String>,
    pub counters: Counters,
}

impl DeviceStatus {
    /// Whether `query` designates this device: its name (`qdisk/5/51712`), `5/51712`, the
    /// backend path, the devid or vdev (`51712`, `xvda`, `/dev/xvda`), optionally for one
    /// frontend domain.
    pub fn matches(&self, query: &str) -> bool {
        let q = query.trim_end_matches('/');
        if q == self.name
            || q == self.backend_path
            || q == format!("{}/{}", self.frontend_domid, self.devid)
        {
            return true;
        }
        crate::devid::parse_device(q) == Some(self.devid)
    }

    /// Human-readable report, in the spirit of blkback's sysfs statistics.
    pub fn render(&self) -> String {
        let c = &self.counters;
        let mut s = format!(
            "{}{}: {}{}\n",
            self.name,
            self.vdev
                .as_deref()
                .map(|v| format!(" ({v})"))
                .unwrap_or_default(),
            self.phase.as_str(),
            self.xenbus_state
                .as_deref()
                .map(|x| format!(", {x}"))
                .unwrap_or_default(),
        );
        if let Some(img) = &self.image {
            s += &format!(
                "  image: {img} ({}{}, {}, cache={})\n",
                self.format.as_deref().unwrap_or("?"),
                self.size
                    .map(|b| format!(", {} bytes", b))
                    .unwrap_or_default(),
                if self.read_only { "ro" } else { "rw" },
                self.cache.as_deref().unwrap_or("?"),
            );
        }
        s += &format!("  backend: {}\n", self.backend_path);
        if let Some(e) = &self.error {
            s += &format!("  error: {e}\n");
        }
        s += &format!(
            "  requests: rd_req {} wr_req {} f_req {} barrier_req {} ds_req {} indirect_req {}\n",
            c.rd_req, c.wr_req, c.f_req, c.barrier_req, c.ds_req, c.indirect_req
        );
        s += &format!(
            "  sectors: rd_sect {} wr_sect {} ds_sect {}\n",
            c.rd_sect, c.wr_sect, c.ds_sect
        );
        s += &format!(
            "  errors {} eopnotsupp {} protocol_errors {} in_flight {} connects {} queues {} \
             mappings {} persistent_grants {}\n",
            c.errors,
            c.eopnotsupp,
            c.protocol_errors,
            c.in_flight,
            c.connects,
            c.queues,
            c.mappings,
            c.persistent_grants
        );
        if c.image_broken != 0 || c.lingering_queues != 0 || c.stuck_queues != 0 {
            s += &format!(
                "  health: image_broken {} lingering_queues {} stuck_queues {}{}\n",
                c.image_broken,
                c.lingering_queues,
                c.stuck_queues,
                if c.image_broken != 0 {
                    " (a flush failed: writes fail until the disk is reattached)"
                } else {
                    ""
                }
            );
        }
        s
    }
}

/// The daemon as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    /// `xen` or `sim`.
    pub platform: String,
    /// The backend domain (this one).
    pub backend_domid: u16,
    /// The backend types watched (`qdisk`, `xdisk`, ...).
    pub backend_types: Vec<String>,
    /// Frontend domains served (`None`: all).
    pub domains: Option<Vec<u16>>,
    /// The frontend domain `xdisk attach` attaches to: 0 on Xen (dom0 itself); on the
    /// simulation, a simulated guest playing dom0's blkfront.
    #[serde(default)]
    pub attach_frontend_domid: u16,
    /// The xenstored to use when it is not the system's (the simulation's socket).
    #[serde(default)]
    pub xenstore_path: Option<String>,
    pub devices: Vec<DeviceStatus>,
}

impl DaemonStatus {
    /// Whether the daemon serves disks of `domid` under `backend_type`.
    pub fn serves(&self, backend_type: &str, domid: u16) -> bool {
        self.backend_types.iter().any(|t| t == backend_type)
            && self.domains.as_ref().is_none_or(|d| d.contains(&domid))
    }
}
