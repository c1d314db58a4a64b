//! How a device is set up: what the backend advertises and how it moves data.

use std::time::Duration;

use xdisk_blkif::wire::DEFAULT_MAX_INDIRECT_SEGMENTS;
use xdisk_blkif::xenbus::Mode;
use xdisk_image::queue::QueueConfig;
use xdisk_xen::platform::DomId;

/// How request data moves between guest pages and the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPath {
    /// Map the granted data pages into the backend ([`GrantMapper::map`]) and hand them to the
    /// image engine as they are (zero copy). With persistent grants (when both ends offer
    /// `feature-persistent`) mappings are cached per queue.
    ///
    /// [`GrantMapper::map`]: xdisk_xen::platform::GrantMapper::map
    #[default]
    Map,
    /// Copy data through a bounce buffer with grant copies ([`GrantMapper::copy`]); nothing of
    /// the guest stays mapped while the I/O runs. Persistent grants are not used.
    ///
    /// [`GrantMapper::copy`]: xdisk_xen::platform::GrantMapper::copy
    Copy,
}

/// Linux blkback's default `max_persistent_grants` per ring (xen-blkback/blkback.c).
pub const DEFAULT_MAX_PERSISTENT_GRANTS: usize = 1056;

/// Configuration of one device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The backend directory, e.g. `/local/domain/0/backend/vbd/5/768`. The toolstack has
    /// written `frontend` and `frontend-id` there (and usually `mode`, `online`).
    pub backend_dir: String,
    /// Frontend domain; `None` reads the backend's `frontend-id` node.
    pub frontend_domid: Option<DomId>,
    /// Frontend directory; `None` reads the backend's `frontend` node.
    pub frontend_dir: Option<String>,
    /// Access mode; `None` reads the backend's `mode` node (missing: read-write, unless the
    /// image is read-only).
    pub mode: Option<Mode>,
    /// Add `VDISK_REMOVABLE` to `info`.
    pub removable: bool,
    /// Advertised `multi-queue-max-queues` (1: node not written).
    pub max_queues: u32,
    /// Advertised `max-ring-page-order` (at most 4).
    pub max_ring_page_order: u32,
    /// Advertised `feature-max-indirect-segments` (0: no indirect requests).
    pub max_indirect_segments: u16,
    /// Advertise `feature-persistent` (used only with [`DataPath::Map`]).
    pub persistent: bool,
    /// Persistent grants kept mapped per queue (LRU beyond).
    pub max_persistent_grants: usize,
    /// How data moves.
    pub data_path: DataPath,
    /// Advertise `feature-flush-cache`.
    pub flush: bool,
    /// Advertise `feature-barrier`.
    pub barrier: bool,
    /// Offer discard (still subject to the toolstack's `discard-enable` and a writable image).
    pub discard: bool,
    /// Advertise `discard-secure` (secure discards become write-zeroes).
    pub discard_secure: bool,
    /// `physical-sector-size` to advertise; falls back to 512 when the disk size is not a
    /// multiple of it.
    pub physical_sector_size: u32,
    /// I/O engine settings of each queue's [`xdisk_image::queue::ImageQueue`].
    pub queue: QueueConfig,
    /// Connections allowed in a row before the rate limit applies.
    pub connect_burst: u32,
    /// Then one connection per this interval: a frontend cycling Closed -> Initialising ->
    /// Initialised faster is held back (XSA-349 class).
    pub connect_interval: Duration,
    /// How long a disconnection waits for the queues' I/O in flight before the device moves
    /// on (Closing/Closed) and leaves them to finish in the background. libxl gives a backend
    /// 10 s to close.
    pub teardown_timeout: Duration,
    /// Grant mappings (pages: rings, persistent grants, data of requests in flight) the
    /// device may hold at once; a request that would exceed it is answered with an error.
    pub max_mapped_grants: u64,
    /// How long [`crate::Device::quiesce`] waits for every queue to complete its requests
    /// in flight and pause before it gives up (and the queues go on unchanged).
    pub quiesce_timeout: Duration,
    /// Microseconds each queue busy-polls its completions and its ring before it sleeps
    /// (0: never; at most [`MAX_POLL_US`]), as QEMU's iothreads do (`poll-max-ns`). Work
    /// that arrives within the window costs no wake-up: in the Xen lab (PV dom0 under TCG)
    /// 2,000 us took 4k reads at queue depth 1 from 0.61 to 0.91 of blkback's IOPS, writes
    /// from 0.76 to 0.93. The price is a CPU that spins while a disk is busy and for the
    /// window after its last request.
    pub poll_us: u32,
}

/// The longest [`DeviceConfig::poll_us`] honoured (10 ms).
pub const MAX_POLL_US: u32 = 10_000;

/// Default [`DeviceConfig::max_mapped_grants`]: room for 4 queues of order-4 rings with
/// their persistent grants and 128 in-flight requests of 11 segments each, several times
/// over (64 Ki pages: 256 MiB of guest memory).
pub const DEFAULT_MAX_MAPPED_GRANTS: u64 = 65536;

impl DeviceConfig {
    /// Defaults for a device whose backend directory is `backend_dir`.
    pub fn new(backend_dir: impl Into<String>) -> DeviceConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        DeviceConfig {
            backend_dir: backend_dir.into(),
            frontend_domid: None,
            frontend_dir: None,
            mode: None,
            removable: false,
            max_queues: cores.clamp(1, 4),
            max_ring_page_order: xdisk_blkif::ring::MAX_RING_PAGE_ORDER,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            persistent: true,
            max_persistent_grants: DEFAULT_MAX_PERSISTENT_GRANTS,
            data_path: DataPath::Map,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            physical_sector_size: 4096,
            queue: QueueConfig {
                queue_depth: 128,
                ..QueueConfig::default()
            },
            connect_burst: 8,
            connect_interval: Duration::from_secs(1),
            teardown_timeout: Duration::from_secs(2),
            max_mapped_grants: DEFAULT_MAX_MAPPED_GRANTS,
            quiesce_timeout: Duration::from_secs(30),
            poll_us: 0,
        }
    }
}
