//! `xdisk xen-selftest` (hidden): checks of the real-Xen platform and of the xenstore client
//! against a real xenstored, for the Xen lab (tests/xen), run inside dom0.
//!
//! - `platform`: a page granted to dom0 through gntalloc is mapped back through gntdev
//!   (single and multi-page, read-only, bad grants), grant copies both ways, unmap
//!   notifications, and a dom0<->dom0 event channel notified both ways.
//! - `xenstore`: write/read/directory/permissions/watch/transaction over each transport given
//!   (default: the xenstored socket and `/dev/xen/xenbus`), then watches across transports.
//!
//! Prints one `ok: ...` line per check; any failure ends it with an error (exit 1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use xdisk_xen::platform::{
    CopyDir, EventChannel, EventChannels, GrantCopyOp, GrantMapper, GrantStatus, MappedRegion,
    PlatformError, SharedMem,
};
use xdisk_xen::real::{EvtchnDev, EvtchnPort, GntAlloc, GntDev};
use xdisk_xen::xenstore::{self, Access, Client, Errno, Perm};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// gntalloc + gntdev + evtchn.
    Platform,
    /// The xenstore client against the running xenstored.
    Xenstore,
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// What to check (default: all).
    #[arg(value_enum)]
    suites: Vec<Suite>,
    /// Xenstore transports to use (a socket or a device); default: the xenstored socket and
    /// the xenbus device.
    #[arg(long = "xenstore")]
    xenstore: Vec<String>,
    /// A directory on a filesystem with O_DIRECT (not tmpfs) for the file I/O check of grant
    /// mappings; without it the check is buffered.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

const WAIT: Duration = Duration::from_secs(5);

fn ok(what: impl AsRef<str>) {
    println!("ok: {}", what.as_ref());
}

pub fn run(args: SelftestArgs) -> Result<i32> {
    let suites = if args.suites.is_empty() {
        vec![Suite::Platform, Suite::Xenstore]
    } else {
        args.suites.clone()
    };
    for s in suites {
        match s {
            Suite::Platform => platform(args.data_dir.as_deref()).context("platform")?,
            Suite::Xenstore => {
                let paths = if args.xenstore.is_empty() {
                    vec![
                        xenstore::DEFAULT_SOCKET_PATH.to_owned(),
                        xenstore::DEFAULT_DEVICE_PATH.to_owned(),
                    ]
                } else {
                    args.xenstore.clone()
                };
                xenstore_suite(&paths).context("xenstore")?
            }
        }
        println!("xen-selftest {s:?}: PASS");
    }
    Ok(0)
}

// --- platform -----------------------------------------------------------------------------

fn pattern(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(seed)
}

fn platform(data_dir: Option<&std::path::Path>) -> Result<()> {
    let alloc = GntAlloc::open()?;
    let gntdev = GntDev::open()?;
    let evtchn = EvtchnDev::open()?;
    ok("opened /dev/xen/{gntalloc,gntdev,evtchn}");

    // One page granted to ourselves, mapped back through gntdev.
    let page = alloc.alloc(0, 1, true)?;
    let gref = page.grefs()[0];
    let data: Vec<u8> = (0..4096).map(|i| pattern(i, 3)).collect();
    page.copy_to(0, &data)?;
    let map: Arc<dyn MappedRegion> = gntdev.map(0, &[gref], true)?;
    ensure!(map.size() == 4096 && map.writable(), "region size/flags");
    ensure!(!map.io_base().is_null(), "io_base is null");
    let mut back = vec![0u8; 4096];
    map.copy_from(0, &mut back)?;
    ensure!(back == data, "mapped page differs from the granted one");
    let w = map.read_u32_volatile(12)?;
    ensure!(
        w == u32::from_le_bytes([data[12], data[13], data[14], data[15]]),
        "read_u32_volatile"
    );
    map.write_u32_volatile(8, 0xdead_beef)?;
    map.copy_to(101, b"through gntdev")?;
    let mut check = [0u8; 14];
    page.copy_from(101, &mut check)?;
    ensure!(
        &check == b"through gntdev" && page.read_u32_volatile(8)? == 0xdead_beef,
        "writes through the mapping not visible in the granted page"
    );
    ensure!(map.copy_from(4090, &mut [0u8; 8]).is_err(), "bounds check");
    ensure!(map.read_u32_volatile(2).is_err(), "alignment check");
    ok(format!(
        "gntalloc gref {gref} mapped back through gntdev, read and written"
    ));

    // Grant copy both ways.
    let mut got = [0u8; 32];
    let mut ops = [
        GrantCopyOp {
            domid: 0,
            gref,
            offset: 2000,
            dir: CopyDir::FromForeign(&mut got),
            status: GrantStatus::GeneralError,
        },
        GrantCopyOp {
            domid: 0,
            gref,
            offset: 3000,
            dir: CopyDir::ToForeign(b"grant copy to the foreign page"),
            status: GrantStatus::GeneralError,
        },
    ];
    gntdev.copy(&mut ops)?;
    ensure!(
        ops.iter().all(|o| o.status == GrantStatus::Okay),
        "grant copy statuses {:?} {:?}",
        ops[0].status,
        ops[1].status
    );
    ensure!(got[..] == data[2000..2032], "grant copy from foreign");
    let mut check = [0u8; 30];
    map.copy_from(3000, &mut check)?;
    ensure!(
        &check == b"grant copy to the foreign page",
        "grant copy to foreign"
    );
    let mut sink = [0u8; 8];
    let mut bad = [
        GrantCopyOp {
            domid: 0,
            gref: 0x00ff_fff0,
            offset: 0,
            dir: CopyDir::FromForeign(&mut sink),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: 0,
            gref,
            offset: 4092,
            dir: CopyDir::ToForeign(&[1u8; 8]),
            status: GrantStatus::Okay,
        },
    ];
    gntdev.copy(&mut bad)?;
    ensure!(
        bad[0].status != GrantStatus::Okay && bad[1].status == GrantStatus::BadCopyArg,
        "bad grant copies: {:?} {:?}",
        bad[0].status,
        bad[1].status
    );
    ok(format!(
        "grant copy both ways; bad gref -> {:?}, page-crossing -> {:?}",
        bad[0].status, bad[1].status
    ));
    drop(map);

    // Several pages as one contiguous region, in order.
    let pages = alloc.alloc(0, 4, true)?;
    for p in 0..4 {
        pages.write_u32_volatile(p * 4096 + 64, 0x1000 + p as u32)?;
    }
    let multi = gntdev.map(0, pages.grefs(), true)?;
    ensure!(multi.size() == 4 * 4096, "multi-page size");
    for p in 0..4 {
        let v = multi.read_u32_volatile(p * 4096 + 64)?;
        ensure!(
            v == 0x1000 + p as u32,
            "page {p} of the multi-page map holds {v:#x}"
        );
    }
    ok(format!(
        "4 grants {:?} mapped as one region, in order",
        pages.grefs()
    ));
    drop(multi);

    // A read-only grant: maps read-only, refuses a writable map, refuses stores.
    let ro = alloc.alloc(0, 1, false)?;
    ro.copy_to(0, b"read-only grant")?;
    let rmap = gntdev.map(0, ro.grefs(), false)?;
    let mut check = [0u8; 15];
    rmap.copy_from(0, &mut check)?;
    ensure!(
        &check == b"read-only grant" && !rmap.writable(),
        "read-only map"
    );
    ensure!(
        rmap.write_u32_volatile(0, 1).is_err(),
        "store into a read-only map accepted"
    );
    match gntdev.map(0, ro.grefs(), true) {
        Ok(_) => bail!("a read-only grant was mapped writable"),
        Err(e) => ok(format!(
            "read-only grant: mapped read-only; writable map refused ({e})"
        )),
    }
    drop(rmap);

    // A grant that does not exist.
    match gntdev.map(0, &[0x00ff_fff0], false) {
        Ok(_) => bail!("a nonexistent grant was mapped"),
        Err(e @ PlatformError::Grant { .. }) => ok(format!("nonexistent grant refused: {e}")),
        Err(e) => bail!("nonexistent grant: unexpected error {e}"),
    }

    // Event channels dom0 <-> dom0. Binding sets the new port pending (Xen's
    // evtchn_bind_interdomain notifies conservatively, as events may have been lost on the
    // unbound port), so drain that spurious event first; after that every notify must give
    // exactly one event on the other side.
    let a = evtchn.alloc_unbound_port(0)?;
    let b = evtchn.bind_interdomain_port(0, a.local_port())?;
    drain(&a)?;
    drain(&b)?;
    b.notify()?;
    expect_event(&a, "b -> a")?;
    a.notify()?;
    expect_event(&b, "a -> b")?;
    ok(format!(
        "event channel ports {} <-> {} notified both ways",
        a.local_port(),
        b.local_port()
    ));
    let t0 = Instant::now();
    let rounds = 200;
    for _ in 0..rounds {
        a.notify()?;
        ensure!(b.wait(Some(WAIT))?, "ping lost");
        b.clear()?;
        b.notify()?;
        ensure!(a.wait(Some(WAIT))?, "pong lost");
        a.clear()?;
    }
    ok(format!(
        "{rounds} event round trips, {:.1} us each",
        t0.elapsed().as_secs_f64() * 1e6 / rounds as f64
    ));
    // Through the trait objects too.
    let dynchans: &dyn EventChannels = &evtchn;
    let c = dynchans.alloc_unbound(0)?;
    let d = dynchans.bind_interdomain(0, c.local_port())?;
    d.notify()?;
    let deadline = Instant::now() + WAIT;
    while !c.clear()? {
        ensure!(
            Instant::now() < deadline,
            "no event through the trait objects"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ok("event channels through dyn EventChannels");

    // Unmap notifications: clear a byte and send an event when the mapping goes.
    let region = gntdev.map_region(0, &[gref], true)?;
    region.copy_to(300, &[0xaa])?;
    region.set_unmap_notify(Some(300), Some(a.local_port()))?;
    drop(region);
    let mut byte = [0u8; 1];
    page.copy_from(300, &mut byte)?;
    ensure!(
        byte[0] == 0,
        "unmap notify did not clear the byte ({:#x})",
        byte[0]
    );
    expect_event(&b, "unmap notify event")?;
    ok("unmap notify: byte cleared and event sent when the mapping went");

    file_io(&alloc, &gntdev, data_dir)?;
    drop(page);
    drop(pages);
    drop(ro);
    Ok(())
}

/// A backend's data path: file I/O straight to and from grant-mapped pages (O_DIRECT where
/// the filesystem has it: the kernel then pins the granted pages for the device).
fn file_io(alloc: &GntAlloc, gntdev: &GntDev, data_dir: Option<&std::path::Path>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (dir, flags, how) = match data_dir {
        Some(d) => (d.to_owned(), libc::O_DIRECT, "O_DIRECT"),
        None => (std::env::temp_dir(), 0, "buffered"),
    };
    let path = dir.join(format!("xdisk-selftest-{}.img", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(&path)
        .with_context(|| format!("creating {} ({how})", path.display()))?;
    let result = (|| -> Result<()> {
        let src = alloc.alloc(0, 2, true)?;
        let data: Vec<u8> = (0..8192).map(|i| pattern(i, 11)).collect();
        src.copy_to(0, &data)?;
        let out = gntdev.map_region(0, src.grefs(), false)?;
        ensure!(out.pwrite(&file, 4096, 0, 8192)? == 8192, "short pwrite");
        let dst = alloc.alloc(0, 2, true)?;
        let inp = gntdev.map_region(0, dst.grefs(), true)?;
        ensure!(inp.pread(&file, 4096, 0, 8192)? == 8192, "short pread");
        let mut back = vec![0u8; 8192];
        dst.copy_from(0, &mut back)?;
        ensure!(
            back == data,
            "file round trip through grant mappings differs"
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    ok(format!(
        "{how} file I/O from and into grant mappings ({})",
        dir.display()
    ));
    Ok(())
}

/// How long a port must stay quiet to count as idle.
const QUIET: Duration = Duration::from_millis(100);

/// Consumes events until none comes for [`QUIET`].
fn drain(port: &EvtchnPort) -> Result<()> {
    while port.wait(Some(QUIET))? {
        port.clear()?;
    }
    Ok(())
}

/// Exactly one event arrives (within [`WAIT`]), and nothing more after it.
fn expect_event(port: &EvtchnPort, what: &str) -> Result<()> {
    ensure!(port.wait(Some(WAIT))?, "{what}: no event within {WAIT:?}");
    ensure!(port.clear()?, "{what}: readable but no event");
    ensure!(
        !port.wait(Some(QUIET))?,
        "{what}: a second event without a second notify"
    );
    Ok(())
}

// --- xenstore -----------------------------------------------------------------------------

fn connect(path: &str) -> Result<Client> {
    let c = Client::connect(path).with_context(|| format!("connecting to {path}"))?;
    c.set_timeout(Duration::from_secs(10));
    Ok(c)
}

fn xenstore_suite(paths: &[String]) -> Result<()> {
    for (i, p) in paths.iter().enumerate() {
        let c = connect(p)?;
        xenstore_checks(&c, &format!("t{i}"), p).with_context(|| p.clone())?;
        ok(format!("xenstore over {p}"));
    }
    if paths.len() >= 2 {
        let a = connect(&paths[0])?;
        let b = connect(&paths[1])?;
        cross_checks(&a, &b).context("across transports")?;
        ok(format!(
            "watches and data across {} and {}",
            paths[0], paths[1]
        ));
    }
    Ok(())
}

/// Waits for an event on `path` (skipping others, e.g. the initial firing).
fn wait_event(w: &xenstore::Watch, path: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no watch event for {path}");
        let ev = w
            .recv_timeout(left)
            .with_context(|| format!("watch event for {path}"))?;
        if ev.path == path {
            return Ok(());
        }
    }
}

fn xenstore_checks(c: &Client, tag: &str, transport: &str) -> Result<()> {
    let home = c.get_domain_path(0)?;
    ensure!(home == "/local/domain/0", "domain path of 0 is {home:?}");
    let name = c.read_string("/local/domain/0/name")?;
    ensure!(
        name == "Domain-0",
        "dom0 name {name:?} (written by xen-init-dom0)"
    );
    ok(format!(
        "{transport}: domain path and xen-init-dom0's nodes"
    ));

    let base = format!("{home}/xdisk-selftest/{tag}");
    match c.rm(&base) {
        Ok(()) | Err(xenstore::Error::Xs(Errno::ENOENT)) => {}
        Err(e) => return Err(e.into()),
    }
    c.write(format!("{base}/a").as_str(), "1")?;
    c.write(format!("{base}/b").as_str(), "two")?;
    c.write(format!("{base}/bin").as_str(), [0u8, 1, 2, 255])?;
    c.mkdir(&format!("{base}/dir"))?;
    ensure!(c.read_string(&format!("{base}/b"))? == "two", "read back");
    ensure!(
        c.read(&format!("{base}/bin"))? == [0u8, 1, 2, 255],
        "binary value"
    );
    let mut names = c.directory(&base)?;
    names.sort();
    ensure!(names == ["a", "b", "bin", "dir"], "directory {names:?}");
    ensure!(
        c.exists(&format!("{base}/a"))? && !c.exists(&format!("{base}/zz"))?,
        "exists"
    );
    match c.read(&format!("{base}/zz")) {
        Err(xenstore::Error::Xs(Errno::ENOENT)) => {}
        other => bail!("reading a missing node: {other:?}"),
    }
    let perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, 5)];
    c.set_perms(&format!("{base}/a"), &perms)?;
    let got = c.get_perms(&format!("{base}/a"))?;
    ensure!(got == perms, "permissions {got:?}");
    ok(format!(
        "{transport}: write/read/mkdir/directory/exists/perms"
    ));

    // Watches: the initial firing, then one per change below the path.
    let w = c.watch(&base, &format!("tok-{tag}"))?;
    wait_event(&w, &base).context("initial watch event")?;
    c.write(format!("{base}/w").as_str(), "x")?;
    wait_event(&w, &format!("{base}/w"))?;
    c.rm(&format!("{base}/b"))?;
    wait_event(&w, &format!("{base}/b"))?;
    w.unwatch()?;
    ok(format!("{transport}: watch"));

    // Transactions: isolation, commit, conflict.
    let t = format!("{base}/t");
    let tx = c.transaction_start()?;
    tx.write(&t, "in-tx")?;
    ensure!(!c.exists(&t)?, "transaction write visible before commit");
    ensure!(
        tx.read_string(&t)? == "in-tx",
        "read inside the transaction"
    );
    tx.commit()?;
    ensure!(c.read_string(&t)? == "in-tx", "committed value");
    let tx = c.transaction_start()?;
    let _ = tx.read(&t)?;
    c.write(&t, "outside")?;
    tx.write(&t, "conflicting")?;
    match tx.commit() {
        Err(xenstore::Error::Xs(Errno::EAGAIN)) => {}
        other => bail!("conflicting commit gave {other:?}, expected EAGAIN"),
    }
    ensure!(
        c.read_string(&t)? == "outside",
        "conflicting transaction leaked"
    );
    let tx = c.transaction_start()?;
    tx.write(&t, "aborted")?;
    tx.abort()?;
    ensure!(
        c.read_string(&t)? == "outside",
        "aborted transaction leaked"
    );
    let n: u32 = c.transaction(|tx| {
        let v: u32 = tx.read_string(&format!("{base}/a"))?.parse().unwrap_or(0);
        tx.write(&format!("{base}/a"), (v + 1).to_string())?;
        Ok(v + 1)
    })?;
    ensure!(
        n == 2 && c.read_string(&format!("{base}/a"))? == "2",
        "transaction closure"
    );
    ok(format!(
        "{transport}: transactions (commit, EAGAIN on conflict, abort)"
    ));

    c.rm(&base)?;
    ensure!(!c.exists(&base)?, "rm");
    // Leave a mark for the scenario script to read with the C tools.
    c.write(
        format!("{home}/xdisk-selftest/result-{tag}").as_str(),
        "PASS",
    )?;
    Ok(())
}

fn cross_checks(a: &Client, b: &Client) -> Result<()> {
    let base = "/local/domain/0/xdisk-selftest/cross";
    let w = b.watch(base, "cross")?;
    wait_event(&w, base)?;
    a.write(format!("{base}/k").as_str(), "from-a")?;
    wait_event(&w, &format!("{base}/k"))?;
    ensure!(
        b.read_string(&format!("{base}/k"))? == "from-a",
        "value across"
    );
    w.unwatch()?;
    a.rm(base)?;
    Ok(())
}
