//! The simulated host: a Xen simulation with the guest's domain, the vbd as libxl writes it,
//! the backend serving the image and the guest's frontend connected to it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use xdisk_backend::{Device, DeviceConfig, DeviceStats};
use xdisk_blkfront::{FrontConfig, Frontend};
use xdisk_blkif::wire::{BLKIF_MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE, SEGS_PER_INDIRECT_FRAME};
use xdisk_image::queue::QueueConfig;
use xdisk_image::Image;
use xdisk_xen::xenstore::{Access, Client, Perm};
use xdisk_xensim::{SimXen, DEFAULT_GRANT_ENTRIES};

use super::options::Params;

/// The guest's domain id and the disk's device id (xvda).
const DOMID: u16 = 1;
const DEVID: u32 = 51712;

/// A simulated host with the device attached to a guest's frontend.
pub struct Rig {
    _xen: Arc<SimXen>,
    pub device: Option<Device>,
    pub front: Frontend,
}

/// What libxl writes to add a vbd (as the backend's tests do).
fn add_vbd(ts: &Client, fe: &str, be: &str, mode: &str) -> Result<()> {
    let fe_perms = [Perm::new(Access::None, DOMID), Perm::new(Access::Read, 0)];
    let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, DOMID)];
    ts.transaction(|tx| {
        tx.mkdir(fe)?;
        tx.set_perms(fe, &fe_perms)?;
        tx.write(&format!("{fe}/backend"), be)?;
        tx.write(&format!("{fe}/backend-id"), "0")?;
        tx.write(&format!("{fe}/virtual-device"), DEVID.to_string())?;
        tx.write(&format!("{fe}/state"), "1")?;
        tx.mkdir(be)?;
        tx.set_perms(be, &be_perms)?;
        tx.write(&format!("{be}/frontend"), fe)?;
        tx.write(&format!("{be}/frontend-id"), DOMID.to_string())?;
        tx.write(&format!("{be}/online"), "1")?;
        tx.write(&format!("{be}/mode"), mode)?;
        tx.write(&format!("{be}/state"), "1")
    })
    .context("toolstack: adding the vbd")
}

pub fn setup(p: &Params, image: Arc<Image>) -> Result<Rig> {
    let xen = SimXen::new().context("starting the Xen simulation")?;
    let xs = Arc::new(xen.xenstore(0)?);
    let toolstack = xen.xenstore(0)?;
    // Pages a request uses: data pages (a block may straddle none: offsets are whole
    // sectors from the page start) and indirect pages.
    let data_pages = p.bs.div_ceil(PAGE_SIZE);
    let ind_pages = if data_pages > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        data_pages.div_ceil(SEGS_PER_INDIRECT_FRAME)
    } else {
        0
    };
    // Persistent grants per queue: a full queue of requests (Linux blkfront grants enough
    // for its whole ring up front), and the backend keeps them all mapped.
    let per_queue = p.iodepth * (data_pages + ind_pages) + 64;
    let grants = (p.jobs * (per_queue + 16) + 1024).next_multiple_of(512);
    let pages = (2 * grants).max(8192);
    let dom = xen.create_domain_with(
        DOMID,
        pages,
        grants.max(DEFAULT_GRANT_ENTRIES as usize) as u32,
    )?;
    let fe_dir = format!("/local/domain/{DOMID}/device/vbd/{DEVID}");
    let be_dir = format!("/local/domain/0/backend/vbd/{DOMID}/{DEVID}");
    add_vbd(
        &toolstack,
        &fe_dir,
        &be_dir,
        if image.read_only() { "r" } else { "w" },
    )?;
    let mut cfg = DeviceConfig::new(be_dir);
    cfg.max_queues = p.jobs as u32;
    cfg.data_path = p.data_path;
    cfg.persistent = p.persistent;
    cfg.poll_us = p.poll_us;
    cfg.max_persistent_grants = per_queue.max(xdisk_backend::DEFAULT_MAX_PERSISTENT_GRANTS);
    cfg.queue = QueueConfig {
        aio: p.aio,
        queue_depth: (p.iodepth as u32 * 2).next_power_of_two().max(64),
        submit_batch: p.submit_batch,
        ..QueueConfig::default()
    };
    let device = Device::start(cfg, xs, xen.grant_mapper(0), xen.event_channels(0), image)
        .context("starting the backend")?;
    let front = Frontend::connect(
        dom.xenstore()?,
        dom.clone(),
        &fe_dir,
        FrontConfig {
            max_queues: p.jobs as u32,
            persistent: p.persistent,
            max_persistent_grants: per_queue,
            ..FrontConfig::default()
        },
    )
    .context("connecting the frontend")?;
    check_connection(p, &front)?;
    Ok(Rig {
        _xen: xen,
        device: Some(device),
        front,
    })
}

/// What a (re)connection must have negotiated for the workload.
pub fn check_connection(p: &Params, front: &Frontend) -> Result<()> {
    let info = front.info();
    if info.queues != p.jobs {
        bail!(
            "the backend gave {} queues for {} jobs",
            info.queues,
            p.jobs
        );
    }
    if (info.ring_size as usize) < p.iodepth {
        bail!(
            "--iodepth={} is more than the ring's {} slots",
            p.iodepth,
            info.ring_size
        );
    }
    if (front.max_request_sectors() as usize) * 512 < p.bs {
        bail!(
            "--bs={} is larger than a request may carry ({} bytes)",
            p.bs,
            front.max_request_sectors() * 512
        );
    }
    Ok(())
}

impl Rig {
    pub fn stats(&self) -> DeviceStats {
        self.device.as_ref().map(Device::stats).unwrap_or_default()
    }

    /// Disconnects and stops the backend; returns the grants the frontend found still held
    /// by the backend when it revoked them, over the whole run.
    pub fn close(mut self) -> Result<usize> {
        self.front
            .disconnect()
            .context("disconnecting the frontend")?;
        if let Some(d) = self.device.take() {
            d.shutdown().context("stopping the backend")?;
        }
        Ok(self.front.leaked_grants())
    }
}
