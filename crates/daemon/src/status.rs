//! What the daemon reports about its devices (control socket, `xdisk stat`).

use serde::{Deserialize, Serialize};
use xdisk_backend::DeviceStats;

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
    /// The phase's name, as in the JSON and in `xdisk stat`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Failed => "failed",
        }
    }
}

/// One layer of a device's backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLayer {
    /// The layer's storage (a path, an NBD URI or an RBD name).
    pub image: String,
    /// Its format.
    pub format: String,
    /// Whether it takes writes (only the top does).
    pub read_only: bool,
}

impl ChainLayer {
    /// The chain of `image`, top first (bounded by the chain depth the image engine
    /// allows).
    pub fn of(image: &xdisk_image::Image) -> Vec<ChainLayer> {
        let mut out = Vec::new();
        let mut layer = Some(image);
        while let Some(l) = layer {
            out.push(ChainLayer {
                image: l.storage().name().into_owned(),
                format: l.format().as_str().to_owned(),
                read_only: l.read_only(),
            });
            layer = l.backing().map(|b| &**b);
        }
        out
    }
}

/// One device of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// `<type>/<frontend domid>/<devid>`, e.g. `qdisk/5/51712`.
    pub name: String,
    /// The backend type directory it was found in (`qdisk`, `xdisk`).
    pub backend_type: String,
    /// The guest's domain (`frontend-id`).
    pub frontend_domid: u16,
    /// The virtual device number (51712 is `xvda`).
    pub devid: u32,
    /// `xvdX` when the number is an xvd whole disk.
    pub vdev: Option<String>,
    /// The backend directory, `/local/domain/<own domid>/backend/<type>/<domid>/<devid>`.
    pub backend_path: String,
    /// The frontend directory (the backend's `frontend` node).
    pub frontend_path: Option<String>,
    /// The image file (the path of `params`), once the image is open.
    pub image: Option<String>,
    /// The image format (`raw`, `qcow2`), once the image is open.
    pub format: Option<String>,
    /// The backing chain under the image, top first (after a live snapshot: the former
    /// tops, read-only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainLayer>,
    /// Served read-only (`mode` `r` or a CD-ROM); set once the image is open.
    pub read_only: bool,
    /// The host cache mode the image was opened with (`none`, or `writeback` when
    /// `direct-io-safe` is not set or O_DIRECT was refused), once open.
    pub cache: Option<String>,
    /// Where the device is in its life cycle.
    pub phase: Phase,
    /// The backend's xenbus state (name), while running.
    pub xenbus_state: Option<String>,
    /// Disk size in bytes, once open.
    pub size: Option<u64>,
    /// Why the device failed (what its `error` node says).
    pub error: Option<String>,
    /// The backend's counters, as Linux blkback's sysfs `statistics/` (`rd_req`, `wr_req`,
    /// `f_req`, `ds_req`, `rd_sect`, `wr_sect`, ...) plus xdisk's own.
    pub counters: DeviceStats,
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
        if self.chain.len() > 1 {
            let layers: Vec<String> = self
                .chain
                .iter()
                .map(|l| {
                    format!(
                        "{} ({}{})",
                        l.image,
                        l.format,
                        if l.read_only { ", ro" } else { "" }
                    )
                })
                .collect();
            s += &format!("  chain (top first): {}\n", layers.join(", "));
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
        if c.image_broken != 0
            || c.lingering_queues != 0
            || c.stuck_queues != 0
            || c.detached_pages != 0
        {
            s += &format!(
                "  health: image_broken {} lingering_queues {} stuck_queues {} detached_pages {}{}{}\n",
                c.image_broken,
                c.lingering_queues,
                c.stuck_queues,
                c.detached_pages,
                if c.image_broken != 0 {
                    " (a flush failed: writes fail until the disk is reattached)"
                } else {
                    ""
                },
                if c.detached_pages != 0 {
                    " (requests outlived their storage deadline: their guest pages were unmapped before the error answer)"
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
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's version (the xdisk crates' version).
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
    /// Every device the supervisor knows, by name, whatever its phase.
    pub devices: Vec<DeviceStatus>,
}

impl DaemonStatus {
    /// Whether the daemon serves disks of `domid` under `backend_type`.
    pub fn serves(&self, backend_type: &str, domid: u16) -> bool {
        self.backend_types.iter().any(|t| t == backend_type)
            && self.domains.as_ref().is_none_or(|d| d.contains(&domid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xdisk_backend::Histogram;

    /// `counters` of `xdisk stat --json` as the daemon wrote it when it had its own
    /// `Counters` struct (every field, each with a distinct value).
    const COUNTERS_JSON: &str = r#"{"rd_req":1,"wr_req":2,"f_req":3,"barrier_req":4,"ds_req":5,"indirect_req":6,"rd_sect":7,"wr_sect":8,"ds_sect":9,"errors":10,"eopnotsupp":11,"in_flight":12,"responses":13,"persistent_grants":14,"mappings":15,"queues":16,"connects":17,"protocol_errors":18,"lingering_queues":19,"stuck_queues":20,"image_broken":21,"busy_us":22,"persistent_grant_hits":23,"persistent_grant_misses":24,"rd_lat":{"buckets":[100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116,117,118,119],"sum_us":1007,"count":2190},"wr_lat":{"buckets":[200,201,202,203,204,205,206,207,208,209,210,211,212,213,214,215,216,217,218,219],"sum_us":2007,"count":4190},"f_lat":{"buckets":[300,301,302,303,304,305,306,307,308,309,310,311,312,313,314,315,316,317,318,319],"sum_us":3007,"count":6190}}"#;

    #[test]
    fn counters_json_is_unchanged() {
        let c: DeviceStats = serde_json::from_str(COUNTERS_JSON).unwrap();
        // The renamed fields land where they belong.
        assert_eq!(c.rd_req, 1);
        assert_eq!(c.protocol_errors, 18);
        assert_eq!(c.busy_us, 22);
        assert_eq!(c.pgrant_hits, 23);
        assert_eq!(c.pgrant_misses, 24);
        assert_eq!(c.rd_lat.buckets[19], 119);
        assert_eq!(c.wr_lat.sum_us, 2007);
        assert_eq!(c.f_lat.count, 6190);
        // Fields the old JSON did not have read as 0.
        assert_eq!(
            (
                c.events_pending_max,
                c.events,
                c.throttled,
                c.merged_req,
                c.detached_pages
            ),
            (0, 0, 0, 0, 0)
        );
        // Written back: the same keys, in the same order, with the same values; then the
        // backend-only counters, as additions at the end.
        let back = serde_json::to_string(&c).unwrap();
        let old = COUNTERS_JSON.strip_suffix('}').unwrap();
        assert_eq!(
            back,
            format!(
                "{old},\"events_pending_max\":0,\"events\":0,\"throttled\":0,\"merged_req\":0,\"detached_pages\":0,\"poll_hits\":0,\"poll_misses\":0}}"
            )
        );
    }

    #[test]
    fn counters_json_of_an_older_daemon_still_reads() {
        // JSON without the fields that have always been optional (`#[serde(default)]` in
        // both the old `Counters` and `DeviceStats`).
        let v: serde_json::Value = serde_json::from_str(COUNTERS_JSON).unwrap();
        let mut m = v.as_object().unwrap().clone();
        for k in [
            "lingering_queues",
            "stuck_queues",
            "image_broken",
            "busy_us",
            "persistent_grant_hits",
            "persistent_grant_misses",
            "rd_lat",
            "wr_lat",
            "f_lat",
        ] {
            m.remove(k);
        }
        let c: DeviceStats = serde_json::from_value(serde_json::Value::Object(m)).unwrap();
        assert_eq!(c.ds_sect, 9);
        assert_eq!((c.pgrant_hits, c.rd_lat), (0, Histogram::default()));
    }

    fn device(counters: DeviceStats) -> DeviceStatus {
        DeviceStatus {
            name: "qdisk/5/51712".into(),
            backend_type: "qdisk".into(),
            frontend_domid: 5,
            devid: 51712,
            vdev: Some("xvda".into()),
            backend_path: "/local/domain/0/backend/qdisk/5/51712".into(),
            frontend_path: None,
            image: Some("rbd:pool/vm".into()),
            format: Some("raw".into()),
            chain: Vec::new(),
            read_only: false,
            cache: Some("none".into()),
            phase: Phase::Running,
            xenbus_state: Some("Connected".into()),
            size: Some(1 << 30),
            error: None,
            counters,
        }
    }

    #[test]
    fn the_health_line_shows_only_when_something_went_wrong_and_says_what() {
        let quiet = device(DeviceStats::default()).render();
        assert!(!quiet.contains("health:"), "{quiet}");
        let late = device(DeviceStats {
            detached_pages: 16,
            ..DeviceStats::default()
        })
        .render();
        assert!(
            late.contains(
                "health: image_broken 0 lingering_queues 0 stuck_queues 0 detached_pages 16"
            ),
            "{late}"
        );
        assert!(late.contains("outlived their storage deadline"), "{late}");
        let broken = device(DeviceStats {
            image_broken: 1,
            ..DeviceStats::default()
        })
        .render();
        assert!(broken.contains("a flush failed"), "{broken}");
        assert!(!broken.contains("deadline"), "{broken}");
    }
}
