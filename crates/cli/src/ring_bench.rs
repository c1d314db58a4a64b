//! `xdisk bench`: fio-like workloads through the whole PV block path on the shared-memory Xen
//! simulation: a Rust blkfront in a simulated guest ([`xdisk_blkfront::Frontend`]) keeps
//! `--iodepth` requests in flight on each of `--numjobs` queues (rings), the backend
//! ([`xdisk_backend::Device`]) serves them from the image file with its I/O engine.
//!
//! It speaks fio's language (`--rw=randread --bs=4k --iodepth=32 --runtime=10 ...`, sizes like
//! `4k`/`1M`) and prints fio's summary, or fio's JSON shape with `--output-format=json`, so the
//! two can be run side by side (bench/ring-bench.py).
//!
//! * Latency is submit to completion as the frontend sees it, in a log-linear histogram.
//! * The frontend uses persistent grants (its pool covers a full queue of the largest
//!   requests) and indirect segments for requests above 11 pages; the backend maps grants
//!   (`--datapath=map`, zero copy, persistent mappings cached) or copies them
//!   (`--datapath=copy`).
//! * `--verify=crc32c`: written blocks carry a header and a crc32c; reads check it (blocks
//!   written earlier in the run also against the generation last written), and a workload
//!   with writes ends with a verification pass over every block it wrote. A mismatch fails
//!   the run.
//! * `usr_cpu`/`sys_cpu` are the whole process's (frontend, backend, I/O threads), from
//!   getrusage, as a share of one CPU over the run.
//! * Soak testing: `--reconnect=MIN-MAX` disconnects and reconnects the frontend at random
//!   intervals with requests in flight (those the backend had not consumed are resubmitted
//!   after the reconnection, as Linux blkfront's `blkif_recover`; the verification state
//!   carries over), `--resize_at=SECS:NEWSIZE` grows the image while I/O goes on (the
//!   frontend notices the new `sectors` and the region grows into it; never written blocks
//!   there must read as zeroes), and the process's RSS and descriptors are sampled every
//!   second (reported as start, after warm-up, end, min and max).

mod cpu;
mod hist;
mod options;
mod report;
mod rig;
mod soak;
mod verify;
mod workload;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use xdisk_image::CacheMode;

use cpu::{backend_cpu, parse_cpus, set_affinity, usage, Usage};
pub use options::RingBenchArgs;
use options::{params, Pattern};
use report::{Report, Soak};
use rig::{setup, Rig};
use soak::Memory;
use workload::{lock, resize_thread, Bench};

pub fn run(a: RingBenchArgs) -> Result<i32> {
    crate::img::register_objects(&a.objects)?;
    if let Some(c) = &a.cpus_allowed {
        set_affinity(&parse_cpus(c)?)?;
    }
    let cache_probe = match a.direct {
        1 => CacheMode::None,
        _ => CacheMode::WriteBack,
    };
    // An online resize writes the image even under a pure read workload.
    let read_only = Pattern::parse(&a.rw)?.read_pct(a.rwmixread) == 100 && a.resize_at.is_none();
    let image = crate::img::open(&a.filename, a.format.as_deref(), read_only, cache_probe)?;
    let p = params(&a, image.size())?;
    let format = image.format().to_string();
    let mut rig = setup(&p, image.clone())?;
    let mut soak = Soak::default();
    let (result, runtime, before, after, backend, verify_pass_blocks) = {
        let Rig { device, front, .. } = &mut rig;
        let device = device.as_ref().context("the backend is gone")?;
        let before = usage();
        let backend_before = backend_cpu();
        let t0 = Instant::now();
        let mut bench = Bench::new(&p, front, t0);
        let resize_done = bench.resize_done.clone();
        let (r, pass, samples, end, backend) = std::thread::scope(|sc| {
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let sampler = sc.spawn(move || soak::sampler(t0, Duration::from_secs(1), stop_rx));
            let (rstop_tx, rstop_rx) = mpsc::channel::<()>();
            if let Some(plan) = p.resize {
                let (image, done) = (&*image, &*resize_done);
                sc.spawn(move || resize_thread(plan, t0, image, device, &rstop_rx, done));
            }
            let r = bench.run();
            let backend = backend_cpu().saturating_sub(backend_before);
            let end = soak::sample(t0);
            drop(rstop_tx);
            let pass = match r {
                Ok(_) if bench.failure.is_none() => bench.verify_pass(),
                Ok(_) => Ok(0),
                Err(ref e) => Err(anyhow!("{}", crate::error_text(e))),
            };
            drop(stop_tx);
            let mut samples = sampler.join().unwrap_or_default();
            samples.push(soak::sample(t0));
            (r, pass, samples, end, backend)
        });
        let after = usage();
        let runtime = r.as_ref().copied().unwrap_or_default();
        let blocks = pass.as_ref().copied().unwrap_or(0);
        // The resize thread has ended: its report is final.
        if p.resize.is_some() {
            let done = std::mem::take(&mut *lock(&resize_done));
            let mut seen = bench.resize.clone();
            seen.done_at = done.at;
            if let Some(Err(e)) = done.result {
                bench.fail(format!("resize: {e}"));
                seen.error = Some(e);
            }
            soak.resize = Some(seen);
        }
        soak.mismatches = bench.mismatches;
        soak.reconnects = bench.reconnects;
        soak.resubmitted = bench.resubmitted;
        soak.memory = Memory {
            samples,
            warmup: soak::warmup(p.runtime),
            end: Some(end),
        };
        (
            pass.map(|_| {
                (
                    std::mem::take(&mut bench.read),
                    std::mem::take(&mut bench.write),
                    bench.verified,
                    bench.failure.take(),
                    bench.errors,
                )
            }),
            runtime,
            before,
            after,
            backend,
            blocks,
        )
    };
    let stats = rig.stats();
    let front_persistent = rig.front.persistent_grants();
    let closed = rig.close();
    let (read, write, verified, failure, errors) = result?;
    soak.leaked_grants = closed?;
    image.close().context("closing the image")?;
    let secs = runtime.as_secs_f64().max(1e-9);
    let cpu = Usage {
        user: after.user.saturating_sub(before.user),
        sys: after.sys.saturating_sub(before.sys),
        ctx: after.ctx.saturating_sub(before.ctx),
        majf: after.majf.saturating_sub(before.majf),
        minf: after.minf.saturating_sub(before.minf),
    };
    let report = Report {
        p: &p,
        format: &format,
        runtime,
        read: &read,
        write: &write,
        usr_pct: cpu.user.as_secs_f64() / secs * 100.0,
        sys_pct: cpu.sys.as_secs_f64() / secs * 100.0,
        cpu,
        backend_cpu: backend,
        stats,
        front_persistent,
        verified,
        verify_pass_blocks,
        errors,
        soak,
    };
    // The report also when the run failed (mismatches, reconnections, memory): the error
    // follows on stderr and in the exit status.
    if p.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.normal());
    }
    if let Some(e) = failure {
        bail!("{e}");
    }
    Ok(0)
}
