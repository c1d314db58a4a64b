//! What the block jobs' threads do (issue #14): the copies and the switches of a live
//! commit, stream and mirror. The supervisor checks a request, prepares what the job needs
//! (a writable instance of the base, the target, the tracking of the guest's writes) and
//! starts its thread on [`execute`] with a [`Body`]; the job reaches its device only
//! through [`JobDevice`] (pauses of the queues, `params`, the device's status).
//!
//! - [`TrackedCopy`]: a copy of the running top into another image while the guest writes
//!   to it, its writes tracked ([`Tracker`]) and copied again pass after pass, the last pass
//!   with the queues paused, then a switch (active [`Commit`], [`Mirror`]).
//! - [`Relink`]: the backing link of the top or of a layer under it rewritten (qcow2
//!   `set_backing`) and the device switched to the chain opened again over the new link
//!   ([`Stream`], intermediate [`CommitBelow`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xdisk_backend::Switch;
use xdisk_image::{Format, Image, LayerStatus, OpenOptions};

use super::{Cancelled, Job, Outcome};
use crate::control::{CommitReply, MirrorReply, StreamReply};
use crate::params::DiskSpec;
pub(crate) use crate::supervisor::JobDevice;

type BResult<T> = xdisk_backend::Result<T>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn live(msg: &str) -> xdisk_backend::Error {
    xdisk_backend::Error::Live(msg.to_owned())
}

fn top_changed() -> xdisk_backend::Error {
    live("the top image changed")
}

fn job_stopped(e: Cancelled) -> xdisk_backend::Error {
    xdisk_backend::Error::Live(e.to_string())
}

/// Chunk of the jobs' copies: between two, the guest's requests go first (see
/// [`Job::checkpoint`]).
pub(crate) const COPY_CHUNK: u64 = 256 << 10;

/// Microseconds since `t`.
fn micros(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What a job's thread does beyond what every job does ([`execute`]).
pub(crate) trait Body: Send + 'static {
    /// The job as the log names it (`commit`, `intermediate commit`, `stream`, `mirror`).
    fn what(&self) -> &'static str;
    /// The job as its error names it (`commit` in "commit of qdisk/1/2: ...").
    fn verb(&self) -> &'static str;
    /// What a cancel leaves, for the log.
    fn left(&self) -> &'static str;
    /// The copy and the switch; the job's result.
    fn run(&mut self, dev: &JobDevice, job: &Job) -> BResult<Outcome>;
    /// Cleans up after a failure or a cancel (the device still serves its image).
    fn abandon(&mut self, _dev: &JobDevice) {}
}

/// A job's thread: runs `body`, cleans up if it failed or was cancelled, and ends the job
/// once the images it held are closed and its device takes jobs again.
pub(crate) fn execute(dev: JobDevice, job: Arc<Job>, mut body: Box<dyn Body>) {
    let name = dev.name();
    let result = match body.run(&dev, &job) {
        Ok(o) => Ok(o),
        Err(e) => {
            body.abandon(&dev);
            if job.cancelled() {
                tracing::info!(device = %name, job = job.id(), "{} cancelled; {}", body.what(), body.left());
            } else {
                tracing::warn!(device = %name, job = job.id(), "{} failed: {e}", body.what());
            }
            Err(format!("{} of {name}: {e}", body.verb()))
        }
    };
    // The images this job held go first (an old top's last reference closes it), so that
    // whoever sees the job finished finds them closed.
    drop(body);
    dev.release();
    job.finish(result);
}

/// Runs `f` on the device's image with the queues paused, provided it is still `top` (the
/// image the job started on); returns what `f` returns besides the switch.
fn in_pause<T: Send + 'static>(
    dev: &JobDevice,
    top: &Arc<Image>,
    f: impl FnOnce(&Arc<Image>) -> BResult<(T, Option<Switch>)> + Send + 'static,
) -> BResult<T> {
    let out = Arc::new(Mutex::new(None));
    let (o2, top) = (out.clone(), top.clone());
    dev.quiesce(Box::new(move |img: &Arc<Image>| {
        if !Arc::ptr_eq(img, &top) {
            return Err(top_changed());
        }
        let (v, switch) = f(img)?;
        *lock(&o2) = Some(v);
        Ok(switch)
    }))?;
    let v = lock(&out).take();
    v.ok_or_else(|| live("the pause did not run"))
}

/// Copies `ranges` of `src` (read through its chain) into `dest`, in chunks of
/// [`COPY_CHUNK`] with a [`Job::checkpoint`] after each if `job` is given (not with the
/// queues paused); with `zeroes`, a chunk that reads as zeroes is written as zeroes
/// (`write_zeroes` without unmap: it reads as zeroes whatever lies under `dest`). Returns
/// the bytes.
pub(crate) fn copy_ranges(
    src: &Image,
    dest: &Image,
    ranges: &[(u64, u64)],
    zeroes: bool,
    job: Option<&Job>,
) -> BResult<u64> {
    let mut buf = Vec::new();
    let mut copied = 0;
    for &(o, l) in ranges {
        let end = (o + l).min(src.size());
        let mut off = o;
        while off < end {
            let len = (end - off).min(COPY_CHUNK);
            let n = usize::try_from(len).map_err(|_| live("range too large"))?;
            buf.resize(n, 0);
            src.read_at(&mut buf[..n], off)?;
            if zeroes && buf[..n].iter().all(|&b| b == 0) {
                dest.write_zeroes(off, len, false)?;
            } else {
                dest.write_at(&buf[..n], off)?;
            }
            copied += len;
            off += len;
            if let Some(j) = job {
                j.checkpoint(len).map_err(job_stopped)?;
            }
        }
    }
    Ok(copied)
}

/// Bytes allocated in `top` (data or zeroes): what a commit copies in its first pass.
pub(crate) fn allocated_bytes(top: &Image) -> BResult<u64> {
    Ok(chain_ranges(std::slice::from_ref(&top), top.size())?
        .iter()
        .map(|r| r.1)
        .sum())
}

/// The ranges within `[off, off + len)` that `top` does not hold and one of `layers` does
/// (what a stream copies up), sorted, merged.
pub(crate) fn stream_ranges(
    top: &Image,
    layers: &[Arc<Image>],
    off: u64,
    len: u64,
) -> BResult<Vec<(u64, u64)>> {
    let end = off.saturating_add(len).min(top.size());
    let mut out = Vec::new();
    let mut o = off;
    while o < end {
        let st = top.layer_status(o, end - o)?;
        let n = st.len().clamp(1, end - o);
        if matches!(st, LayerStatus::Unallocated { .. }) {
            // Unallocated in the top: the parts some layer above the base holds.
            let mut sub = Vec::new();
            for l in layers {
                allocated_in(l, o, o + n, &mut sub)?;
            }
            sub.sort_unstable();
            merge_into(&mut out, sub);
        }
        o += n;
    }
    Ok(out)
}

/// The ranges any of `layers` holds (data or zeroes), sorted, merged.
pub(crate) fn chain_ranges<I: std::borrow::Borrow<Image>>(
    layers: &[I],
    size: u64,
) -> BResult<Vec<(u64, u64)>> {
    let mut all = Vec::new();
    for l in layers {
        allocated_in(l.borrow(), 0, size, &mut all)?;
    }
    all.sort_unstable();
    let mut out = Vec::new();
    merge_into(&mut out, all);
    Ok(out)
}

/// Appends the runs of `[from, to)` allocated in layer `l` (data or zeroes).
fn allocated_in(l: &Image, from: u64, to: u64, out: &mut Vec<(u64, u64)>) -> BResult<()> {
    let mut p = from;
    while p < to {
        let want = (to - p).min(1 << 30);
        let st = l.layer_status(p, want)?;
        let m = st.len().clamp(1, want);
        if !matches!(st, LayerStatus::Unallocated { .. }) {
            out.push((p, m));
        }
        p += m;
    }
    Ok(())
}

/// Appends sorted ranges to sorted, merged `out`, merging.
fn merge_into(out: &mut Vec<(u64, u64)>, sorted: Vec<(u64, u64)>) {
    for (o, l) in sorted {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= o => last.1 = (o + l).max(last.0 + last.1) - last.0,
            _ => out.push((o, l)),
        }
    }
}

/// Where a [`TrackedCopy`] records the guest's writes to the device's top.
#[derive(Debug, Clone)]
pub(crate) enum Tracker {
    /// A temporary persistent bitmap of the top (qcow2), by name (see
    /// [`crate::supervisor::JOB_BITMAP_PREFIX`]).
    Bitmap(String),
    /// The image's own record in memory ([`Image::start_write_tracking`]): for tops
    /// without persistent bitmaps (raw). Lost with the daemon, as is the job.
    Memory,
}

impl Tracker {
    /// Starts recording on `img` (with the queues paused: it sees every write
    /// acknowledged afterwards), `gran` bytes per bit.
    pub(crate) fn start(&self, img: &Image, gran: u64) -> BResult<()> {
        match self {
            Tracker::Bitmap(b) => {
                let q = img.as_qcow2().ok_or_else(top_changed)?;
                q.add_bitmap(b, Some(gran), true)?;
            }
            Tracker::Memory => img.start_write_tracking(gran)?,
        }
        Ok(())
    }

    /// Takes what was recorded, and clears it (with the queues paused: a write recorded
    /// but still in flight would be lost).
    fn take(&self, img: &Image) -> BResult<Vec<(u64, u64)>> {
        match self {
            Tracker::Bitmap(b) => {
                let q = img.as_qcow2().ok_or_else(top_changed)?;
                let r = q.bitmap(b)?.dirty_ranges();
                q.clear_bitmap(b)?;
                Ok(r)
            }
            Tracker::Memory => Ok(img.take_written()),
        }
    }

    /// Stops recording on `img` (whatever the device serves: nothing to stop on another).
    pub(crate) fn stop(&self, img: &Image) -> BResult<()> {
        match self {
            Tracker::Bitmap(b) => {
                if let Some(q) = img.as_qcow2() {
                    q.remove_bitmap(b)?;
                }
            }
            Tracker::Memory => img.stop_write_tracking(),
        }
        Ok(())
    }
}

/// A copy of the device's top (read through its chain) into `dest` while the guest writes
/// to it: a first pass, then passes over what the [`Tracker`] recorded meanwhile (taken and
/// cleared with the queues paused), until the job's policy stops; the last pass runs with
/// the queues paused and is followed by the switch.
pub(crate) struct TrackedCopy {
    /// The device's top when the job started.
    pub src: Arc<Image>,
    /// Where the data goes.
    pub dest: Arc<Image>,
    /// Where the guest's writes are recorded (installed before the job starts).
    pub tracker: Tracker,
    /// Write what reads as zeroes as zeroes (see [`copy_ranges`]).
    pub zeroes: bool,
}

impl TrackedCopy {
    /// Copies every range allocated in the top itself (data, or zeroes as zeroes): the
    /// first pass of an active commit.
    fn copy_allocated(&self, job: &Job) -> BResult<u64> {
        let (top, dest) = (&*self.src, &*self.dest);
        let size = top.size();
        let mut off = 0;
        let mut copied = 0;
        while off < size {
            let want = (size - off).min(COPY_CHUNK);
            let st = top.layer_status(off, want)?;
            let len = st.len().clamp(1, want);
            match st {
                LayerStatus::Unallocated { .. } => {}
                LayerStatus::Zero { .. } => {
                    dest.write_zeroes(off, len, false)?;
                    copied += len;
                    job.checkpoint(len).map_err(job_stopped)?;
                }
                LayerStatus::Data { .. } => {
                    copied += copy_ranges(top, dest, &[(off, len)], false, None)?;
                    job.checkpoint(len).map_err(job_stopped)?;
                }
            }
            off += len;
        }
        Ok(copied)
    }

    /// Copies `ranges` with checkpoints.
    fn copy(&self, ranges: &[(u64, u64)], job: &Job) -> BResult<u64> {
        copy_ranges(&self.src, &self.dest, ranges, self.zeroes, Some(job))
    }

    /// One pass: takes what the tracker recorded (queues paused), counts it into the job's
    /// total and copies it; returns the bytes found and the bytes copied.
    fn pass(&self, dev: &JobDevice, job: &Job) -> BResult<(u64, u64)> {
        let tracker = self.tracker.clone();
        let ranges = in_pause(dev, &self.src, move |img| Ok((tracker.take(img)?, None)))?;
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        job.add_total(bytes);
        Ok((bytes, self.copy(&ranges, job)?))
    }

    /// The last pass, with the queues paused: copies what the tracker recorded since the
    /// last pass, flushes `dest` (everything the guest wrote is in it now, durably), stops
    /// the tracker, and switches the device to what `switch` returns (given the old top).
    /// Returns the bytes copied and the pause in microseconds.
    fn last_pass(
        &self,
        dev: &JobDevice,
        switch: impl FnOnce(&Arc<Image>) -> Switch + Send + 'static,
    ) -> BResult<(u64, u64)> {
        let started = Instant::now();
        let (tracker, dest, zeroes) = (self.tracker.clone(), self.dest.clone(), self.zeroes);
        let last = in_pause(dev, &self.src, move |img| {
            let ranges = tracker.take(img)?;
            let n = copy_ranges(img, &dest, &ranges, zeroes, None)?;
            dest.flush()?;
            tracker.stop(img)?;
            Ok((n, Some(switch(img))))
        })?;
        Ok((last, micros(started)))
    }

    /// Removes the tracker from the device's image (a failed or cancelled job: the device
    /// still serves its top); a failure is only logged: a daemon opening the image later
    /// removes a leftover temporary bitmap.
    fn abandon(&self, dev: &JobDevice, what: &str) {
        let tracker = self.tracker.clone();
        let r = dev.quiesce(Box::new(move |img: &Arc<Image>| {
            tracker.stop(img)?;
            Ok(None)
        }));
        if let Err(e) = r {
            tracing::warn!(device = %dev.name(), tracker = ?self.tracker, "cannot remove the {what}'s write tracking: {e} (a daemon opening the image removes a leftover bitmap)");
        }
    }
}

/// An active commit (see [`crate::Supervisor::commit`]): the top copied into its backing
/// file (`copy.dest`, a writable instance of it) until the passes converge, then the device
/// switches to the backing file and `params` names it.
pub(crate) struct Commit {
    /// Top into base.
    pub copy: TrackedCopy,
    /// `params` afterwards (`qcow2:BASE`, `aio:BASE`).
    pub new_params: String,
    /// The disk the device serves afterwards.
    pub new_spec: DiskSpec,
}

impl Commit {
    /// The passes and the pivot; returns the bytes copied, the passes and the last pause.
    fn converge(&self, dev: &JobDevice, job: &Job) -> BResult<(u64, u32, u64)> {
        /// Passes before the last one copies what is left with the queues paused.
        const MAX_PASSES: u32 = 16;
        /// Dirty bytes small enough to copy with the queues paused.
        const FINAL_BYTES: u64 = 4 << 20;
        /// After [`MAX_PASSES`], the most a pass may have found dirty for the last pass to
        /// run anyway (its copy pauses the guest); more fails the commit (the guest writes
        /// faster than the copy goes).
        const MAX_FINAL_BYTES: u64 = 64 << 20;
        let mut copied = self.copy.copy_allocated(job)?;
        let mut passes = 1u32;
        loop {
            let (bytes, n) = self.copy.pass(dev, job)?;
            copied += n;
            passes += 1;
            if bytes <= FINAL_BYTES {
                break;
            }
            if passes >= MAX_PASSES {
                if bytes > MAX_FINAL_BYTES {
                    return Err(xdisk_backend::Error::Live(format!(
                        "the commit does not converge: {bytes} bytes were written during \
                         pass {passes}; the device still serves its top (try again when the \
                         guest writes less)"
                    )));
                }
                break;
            }
        }
        // Last chance to cancel: the pivot is not interrupted.
        job.checkpoint(0).map_err(job_stopped)?;
        let (base, persist) = (
            self.copy.dest.clone(),
            dev.params_writer(self.new_params.clone()),
        );
        let (last, paused_us) = self.copy.last_pass(dev, move |_| Switch {
            image: base,
            commit: Box::new(persist),
            rollback: Box::new(|| {}),
        })?;
        job.checkpoint(last).map_err(job_stopped).ok();
        Ok((copied + last, passes + 1, paused_us))
    }
}

impl Body for Commit {
    fn what(&self) -> &'static str {
        "commit"
    }
    fn verb(&self) -> &'static str {
        "commit"
    }
    fn left(&self) -> &'static str {
        "the device still serves its top"
    }

    fn run(&mut self, dev: &JobDevice, job: &Job) -> BResult<Outcome> {
        let started = Instant::now();
        let (copied, passes, paused_us) = self.converge(dev, job)?;
        dev.served(Some(self.new_spec.clone()));
        let base = self.new_spec.path.display().to_string();
        tracing::info!(device = %dev.name(), job = job.id(), %base, copied, passes, elapsed = ?started.elapsed(), "active commit");
        Ok(Outcome::Commit(CommitReply {
            device: dev.name(),
            image: base,
            format: self.copy.dest.format().as_str().to_owned(),
            copied_bytes: copied,
            passes,
            paused_us,
        }))
    }

    fn abandon(&mut self, dev: &JobDevice) {
        self.copy.abandon(dev, "commit");
    }
}

/// A mirror (see [`crate::Supervisor::mirror`]): the disk copied to the target
/// (`copy.dest`) pass after pass; ready once a pass finds little, then following the
/// guest's writes until completed; then the device switches to the target.
pub(crate) struct Mirror {
    /// The first pass's ranges (the chain's or the top's data; everything for an existing
    /// target).
    pub first: Vec<(u64, u64)>,
    /// Top into the target.
    pub copy: TrackedCopy,
    /// `params` afterwards.
    pub new_params: String,
    /// The disk the device serves afterwards.
    pub new_spec: DiskSpec,
}

impl Mirror {
    /// The passes, the wait while ready, and the pivot; returns the bytes copied, the
    /// passes and the last pause (microseconds).
    fn converge(&self, dev: &JobDevice, job: &Job) -> BResult<(u64, u32, u64)> {
        /// Dirty bytes small enough to copy with the queues paused: a pass that found no
        /// more makes the job ready, and the switch waits for such a pass. A guest that
        /// writes faster than the copy goes keeps the job running (not ready), as QEMU's.
        const FINAL_BYTES: u64 = 4 << 20;
        let mut copied = self.copy.copy(&self.first, job)?;
        let mut passes = 1u32;
        let mut ready = false;
        loop {
            let (bytes, n) = self.copy.pass(dev, job)?;
            copied += n;
            passes = passes.saturating_add(1);
            if bytes <= FINAL_BYTES && !ready {
                ready = true;
                job.set_ready();
            }
            if ready {
                // Ready: the target follows the guest's writes until completed.
                let complete = job
                    .wait_complete(Duration::from_millis(200))
                    .map_err(job_stopped)?;
                if complete && bytes <= FINAL_BYTES {
                    break;
                }
            } else {
                job.checkpoint(0).map_err(job_stopped)?;
            }
        }
        let (dest, persist) = (
            self.copy.dest.clone(),
            dev.params_writer(self.new_params.clone()),
        );
        let (last, paused_us) = self.copy.last_pass(dev, move |img| {
            let old = img.clone();
            Switch {
                image: dest,
                commit: Box::new(move || {
                    persist()?;
                    old.seal();
                    Ok(())
                }),
                rollback: Box::new(|| {}),
            }
        })?;
        Ok((copied + last, passes + 1, paused_us))
    }
}

impl Body for Mirror {
    fn what(&self) -> &'static str {
        "mirror"
    }
    fn verb(&self) -> &'static str {
        "mirror"
    }
    fn left(&self) -> &'static str {
        "the device still serves its source"
    }

    fn run(&mut self, dev: &JobDevice, job: &Job) -> BResult<Outcome> {
        let (copied, passes, paused_us) = self.converge(dev, job)?;
        dev.served(Some(self.new_spec.clone()));
        let target = self.new_spec.shown();
        tracing::info!(device = %dev.name(), job = job.id(), %target, copied, passes, paused_us, "mirror pivot");
        Ok(Outcome::Mirror(MirrorReply {
            device: dev.name(),
            image: target,
            format: self.copy.dest.format().as_str().to_owned(),
            copied_bytes: copied,
            passes,
            paused_us,
        }))
    }

    fn abandon(&mut self, dev: &JobDevice) {
        self.copy.abandon(dev, "mirror");
    }
}

/// A change of the backing link of the device's top or of a layer under it, and the switch
/// to the chain opened again over the new link (an [`Image`]'s backing layer does not
/// change: every layer from the top down to the relinked one is opened again).
#[derive(Debug, Clone)]
pub(crate) struct Relink {
    /// The paths of the layers from the top down to the one whose link changes, top first
    /// (all qcow2).
    pub upper: Vec<PathBuf>,
    /// The new link of the last of them: name and format (`None`: no backing file).
    pub link: Option<(String, String)>,
    /// The options the top is opened with (writable qcow2); the layers under it are
    /// opened read-only with the same.
    pub top_opts: OpenOptions,
}

impl Relink {
    /// With the queues paused and `img` the device's top: writes the new link (the header
    /// cluster, synced) and opens the chain again over `base`; the switch's rollback
    /// restores the old link. The image must read the same with either link.
    fn switch(&self, img: &Arc<Image>, base: Option<Arc<Image>>) -> BResult<Switch> {
        // The top is opened again from its file: its metadata written back first.
        img.close()?;
        let holder = match self.upper.len() {
            0 => return Err(live("no layer to relink")),
            // The top itself.
            1 => img.clone(),
            // A read-only layer of the chain: through a writable instance of its own.
            _ => Image::open(
                self.upper
                    .last()
                    .ok_or_else(|| live("no layer to relink"))?,
                &OpenOptions {
                    format: Some(Format::Qcow2),
                    read_only: false,
                    ..self.top_opts.clone()
                },
            )?,
        };
        let q = holder.as_qcow2().ok_or_else(|| live("not a qcow2 layer"))?;
        let h = q.header();
        let (old_link, old_fmt) = (h.backing_file, h.backing_format);
        q.set_backing(
            self.link.as_ref().map(|l| l.0.as_str()),
            self.link.as_ref().map(|l| l.1.as_str()),
        )?;
        let restore = move || {
            if let Some(q) = holder.as_qcow2() {
                if let Err(e) = q.set_backing(old_link.as_deref(), old_fmt.as_deref()) {
                    tracing::error!("cannot restore the backing link: {e}");
                }
            }
        };
        let ro = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: true,
            ..self.top_opts.clone()
        };
        let mut cur = base;
        for (i, path) in self.upper.iter().enumerate().rev() {
            let opts = if i == 0 { &self.top_opts } else { &ro };
            let opened = match cur.take() {
                Some(b) => Image::open_overlay(path, opts, b),
                None => Image::open(path, opts),
            };
            match opened {
                Ok(l) => cur = Some(l),
                Err(e) => {
                    restore();
                    return Err(e.into());
                }
            }
        }
        let new = cur.ok_or_else(|| live("no layer to relink"))?;
        let old = img.clone();
        Ok(Switch {
            image: new,
            commit: Box::new(move || {
                old.seal();
                Ok(())
            }),
            rollback: Box::new(restore),
        })
    }
}

/// A stream (see [`crate::Supervisor::stream`]): what the top lacks and a layer above the
/// base holds is copied up, one chunk per pause of the queues (guest writes win), then the
/// top's link names the base (or nothing).
pub(crate) struct Stream {
    /// The device's top.
    pub top: Arc<Image>,
    /// The layers under it, down to the base (exclusive).
    pub layers: Vec<Arc<Image>>,
    /// The base (the chain's instance), if any.
    pub base: Option<Arc<Image>>,
    /// The top's new link.
    pub relink: Relink,
}

impl Stream {
    /// The copy, chunk by chunk each in a pause of the queues, then the switch of the
    /// backing link; returns the bytes copied and the last pause (microseconds).
    fn copy(&self, dev: &JobDevice, job: &Job) -> BResult<(u64, u64)> {
        let size = self.top.size();
        let mut copied = 0u64;
        let mut off = 0u64;
        while off < size {
            let len = (size - off).min(COPY_CHUNK);
            let layers = self.layers.clone();
            let done = in_pause(dev, &self.top, move |img| {
                // Looked up with nothing in flight: what the guest wrote is allocated.
                let ranges = stream_ranges(img, &layers, off, len)?;
                Ok((copy_ranges(img, img, &ranges, true, None)?, None))
            })?;
            copied += done;
            off += len;
            job.checkpoint(done).map_err(job_stopped)?;
        }
        // Last chance to cancel: the switch is not interrupted.
        job.checkpoint(0).map_err(job_stopped)?;
        let started = Instant::now();
        let (layers, base, relink) = (self.layers.clone(), self.base.clone(), self.relink.clone());
        in_pause(dev, &self.top, move |img| {
            // What the guest wrote since the last chunk cannot have made a range need
            // copying (writes only allocate in the top): the data is all up. Checked anyway.
            if !stream_ranges(img, &layers, 0, img.size())?.is_empty() {
                return Err(live("backing data is still missing from the top"));
            }
            Ok(((), Some(relink.switch(img, base)?)))
        })?;
        Ok((copied, micros(started)))
    }
}

impl Body for Stream {
    fn what(&self) -> &'static str {
        "stream"
    }
    fn verb(&self) -> &'static str {
        "stream"
    }
    fn left(&self) -> &'static str {
        "the chain is unchanged"
    }

    fn run(&mut self, dev: &JobDevice, job: &Job) -> BResult<Outcome> {
        let (copied, paused_us) = self.copy(dev, job)?;
        dev.served(None);
        let backing = self.relink.link.as_ref().map(|b| b.0.clone());
        tracing::info!(device = %dev.name(), job = job.id(), copied, paused_us, ?backing, "stream");
        Ok(Outcome::Stream(StreamReply {
            device: dev.name(),
            image: self.relink.upper[0].display().to_string(),
            backing,
            copied_bytes: copied,
            paused_us,
        }))
    }
}

/// An intermediate commit (see [`crate::Supervisor::commit`] with a `top` under the active
/// one): the committed layer and those under it above the base are copied into a writable
/// instance of the base (the guest never writes to them: nothing to track), the base is
/// flushed, then the layer above the committed one names the base as its backing file and
/// the device serves the chain opened again over a fresh instance of the base.
pub(crate) struct CommitBelow {
    /// The device's top.
    pub top: Arc<Image>,
    /// The committed layer (read through its chain).
    pub src: Arc<Image>,
    /// The ranges its layers hold.
    pub ranges: Vec<(u64, u64)>,
    /// A writable instance of the base.
    pub base_rw: Arc<Image>,
    /// How the base is opened again for the chain (read-only).
    pub base_ro_opts: OpenOptions,
    /// The base's path.
    pub base_path: PathBuf,
    /// The new link of the layer above the committed one.
    pub relink: Relink,
}

impl CommitBelow {
    fn copy(&self, dev: &JobDevice, job: &Job) -> BResult<(u64, u64)> {
        // Read through the layers to commit: what their upper neighbour reads there.
        let copied = copy_ranges(&self.src, &self.base_rw, &self.ranges, true, Some(job))?;
        self.base_rw.flush()?;
        self.base_rw.close()?;
        job.checkpoint(0).map_err(job_stopped)?;
        // The chain after the switch reads the base afresh (the chain's own instance of it
        // has cached what it read before the copy).
        let base_ro = Image::open(&self.base_path, &self.base_ro_opts)?;
        let started = Instant::now();
        let relink = self.relink.clone();
        in_pause(dev, &self.top, move |img| {
            Ok(((), Some(relink.switch(img, Some(base_ro))?)))
        })?;
        Ok((copied, micros(started)))
    }
}

impl Body for CommitBelow {
    fn what(&self) -> &'static str {
        "intermediate commit"
    }
    fn verb(&self) -> &'static str {
        "commit"
    }
    fn left(&self) -> &'static str {
        "the chain is unchanged"
    }

    fn run(&mut self, dev: &JobDevice, job: &Job) -> BResult<Outcome> {
        let (copied, paused_us) = self.copy(dev, job)?;
        dev.served(None);
        let base = self.base_path.display().to_string();
        tracing::info!(device = %dev.name(), job = job.id(), %base, copied, paused_us, "intermediate commit");
        Ok(Outcome::Commit(CommitReply {
            device: dev.name(),
            image: base,
            format: self.base_rw.format().as_str().to_owned(),
            copied_bytes: copied,
            passes: 1,
            paused_us,
        }))
    }
}
