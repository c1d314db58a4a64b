//! Local attach/detach against an in-process supervisor and its control socket, on the
//! simulation, with a simulated guest's Rust blkfront playing dom0's blkfront (the
//! simulation's dom0 has no memory to grant).

mod common;

use std::time::Duration;

use common::*;
use xdisk_daemon::attach::{self, AttachOptions};
use xdisk_daemon::control::{self, ControlServer};
use xdisk_daemon::simguest::{GuestDisk, SimGuest};
use xdisk_daemon::{Error, SupervisorConfig};

const FE: u16 = 7;

#[test]
fn attach_stat_detach() {
    let host = host();
    let sup = std::sync::Arc::new(supervisor(
        &host,
        SupervisorConfig {
            backend_types: vec!["xdisk".into()],
            ..SupervisorConfig::default()
        },
    ));
    let dir = tmpdir();
    let sock = dir.path().join("control.sock");
    let s2 = sup.clone();
    let server = ControlServer::start(&sock, std::sync::Arc::new(move || s2.status())).unwrap();
    let guest = SimGuest::start(&host.xen, FE).unwrap();
    let disk = qcow2_disk(8 * MIB);

    let status = control::status(&sock).unwrap();
    assert!(status.serves("xdisk", FE));
    assert!(status.xenstore_path.is_some());
    let mut opts = AttachOptions::new(&disk.path, "xdisk");
    opts.frontend_domid = FE;
    let xs = host.xen.xenstore(0).unwrap();
    let a = attach::attach(&xs, &opts, T).expect("attached");
    assert_eq!(a.devid, 51712);
    assert_eq!(a.vdev.as_deref(), Some("xvda"));
    // The nodes as the lab's notes say libxl writes them.
    let be = &a.backend_path;
    assert_eq!(be, "/local/domain/0/backend/xdisk/7/51712");
    for (k, v) in [
        ("frontend-id", "7"),
        ("online", "1"),
        ("dev", "xvda"),
        ("type", "xdisk"),
        ("mode", "w"),
        ("device-type", "disk"),
        ("hotplug-status", "connected"),
        ("state", "4"),
    ] {
        assert_eq!(host.read(&format!("{be}/{k}")).as_deref(), Some(v), "{k}");
    }
    let params = host.read(&format!("{be}/params")).unwrap();
    assert!(
        params.starts_with("qcow2:/"),
        "probed and written explicitly: {params}"
    );
    let fe = &a.frontend_path;
    for (k, v) in [
        ("backend-id", "0"),
        ("virtual-device", "51712"),
        ("state", "4"),
    ] {
        assert_eq!(host.read(&format!("{fe}/{k}")).as_deref(), Some(v), "{k}");
    }
    assert_eq!(
        host.read(&format!("{fe}/backend")).as_deref(),
        Some(be.as_str())
    );
    wait_until("guest sees the disk", T, || {
        matches!(guest.disks().get(&51712), Some(GuestDisk::Connected { .. }))
    });
    // stat through the control socket.
    let st = control::status(&sock).unwrap();
    let d = st.devices.iter().find(|d| d.matches("xvda")).unwrap();
    assert_eq!(d.format.as_deref(), Some("qcow2"));
    assert!(d.counters.rd_req >= 1, "the guest read sector 0: {d:?}");
    assert_eq!(d.counters.connects, 1);

    // A second attach gets the next name; an explicit devid in use is refused.
    let raw = raw_disk(MIB);
    let mut o2 = AttachOptions::new(&raw.path, "xdisk");
    o2.frontend_domid = FE;
    o2.devid = Some(51712);
    let e = attach::write_nodes(&xs, &o2).unwrap_err();
    assert!(e.to_string().contains("already in use"), "{e}");

    // Detach, found by name as `xdisk detach xvda` does.
    let found = attach::find(&xs, FE, "/dev/xvda").unwrap();
    assert_eq!(found, a);
    attach::detach(&xs, &found, T, false).expect("detached");
    assert!(!host.exists(be));
    assert!(!host.exists(fe));
    assert!(
        !host.exists("/local/domain/0/backend/xdisk"),
        "empty parents removed"
    );
    assert!(!host.exists(&format!("/local/domain/{FE}/device")));
    wait_until("device stopped", T, || sup.devices().is_empty());
    assert_eq!(host.xen.event_channel_count(0), 0);
    assert!(guest.disks().is_empty());
    drop(server);
    drop(guest);
}

#[test]
fn attach_reports_a_refused_image_and_cleans_up() {
    let host = host();
    let _sup = supervisor(
        &host,
        SupervisorConfig {
            backend_types: vec!["xdisk".into()],
            ..SupervisorConfig::default()
        },
    );
    let _guest = SimGuest::start(&host.xen, FE).unwrap();
    let dir = tmpdir();
    let bad = dir.path().join("bad.qcow2");
    let mut junk = b"QFI\xfb".to_vec();
    junk.extend(pattern(1, 1024));
    // No backing file named (a probed qcow2 naming one is refused before the daemon sees it).
    junk[8..16].fill(0);
    std::fs::write(&bad, junk).unwrap();
    let mut opts = AttachOptions::new(&bad, "xdisk");
    opts.frontend_domid = FE;
    let xs = host.xen.xenstore(0).unwrap();
    let e = attach::attach(&xs, &opts, T).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e:?}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!host.exists("/local/domain/0/backend/xdisk/7/51712"));
    assert!(!host.exists("/local/domain/7/device/vbd/51712"));
}

#[test]
fn attach_refuses_a_probed_qcow2_naming_a_backing_file() {
    let host = host();
    let dir = tmpdir();
    let base = raw_disk(MIB);
    let top = dir.path().join("top.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(&base.path)
        .args(["-F", "raw"])
        .arg(&top)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut opts = AttachOptions::new(&top, "xdisk");
    opts.frontend_domid = FE;
    let xs = host.xen.xenstore(0).unwrap();
    let e = attach::attach(&xs, &opts, Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("--format qcow2"), "{e}");
    assert!(!host.exists("/local/domain/0/backend/xdisk/7/51712"));
}

/// Probing reads the image through the image engine's storage, which refuses a FIFO put
/// where the image should be: `attach` errs at once instead of blocking in open(2).
#[test]
fn attach_of_a_fifo_fails_instead_of_blocking() {
    let host = host();
    let dir = tmpdir();
    let fifo = dir.path().join("disk.raw");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let mut opts = AttachOptions::new(&fifo, "xdisk");
    opts.frontend_domid = FE;
    let xs = host.xen.xenstore(0).unwrap();
    let start = std::time::Instant::now();
    let e = attach::attach(&xs, &opts, Duration::from_millis(500)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "attach blocked on the FIFO"
    );
    assert!(e.to_string().contains("disk.raw"), "{e}");
    assert!(!host.exists("/local/domain/0/backend/xdisk/7/51712"));
}

#[test]
fn attach_without_a_daemon_says_so() {
    let dir = tmpdir();
    let e = control::status(&dir.path().join("none.sock")).unwrap_err();
    assert!(matches!(e, Error::NotRunning { .. }));
    assert!(e.to_string().contains("not running"), "{e}");
}

#[test]
fn attach_times_out_clearly_without_a_backend() {
    let host = host();
    let disk = raw_disk(MIB);
    let mut opts = AttachOptions::new(&disk.path, "xdisk");
    opts.frontend_domid = FE;
    let xs = host.xen.xenstore(0).unwrap();
    let e = attach::attach(&xs, &opts, Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    assert!(
        e.to_string().contains("no backend picked the device up"),
        "{e}"
    );
    assert!(!host.exists("/local/domain/0/backend/xdisk/7/51712"));
}

/// An NBD export (as `DiskSource::parse` names it) goes into `params` as a URI the daemon's
/// parser reads back: QEMU's legacy spelling rewritten, a relative socket made absolute, the
/// format after it. With the format given nothing connects to the server here.
#[test]
fn attach_writes_nbd_exports_into_params() {
    let host = host();
    let xs = host.xen.xenstore(0).unwrap();
    let cwd = std::env::current_dir().unwrap();
    for (name, format, want) in [
        (
            "nbd+unix:///disk?socket=/run/x.sock",
            xdisk_image::Format::Raw,
            "aio:nbd+unix:///disk?socket=/run/x.sock".to_string(),
        ),
        (
            "nbd:unix:rel/x.sock:exportname=q",
            xdisk_image::Format::Qcow2,
            format!("qcow2:nbd+unix:///q?socket={}/rel/x.sock", cwd.display()),
        ),
        (
            "nbd://127.0.0.1:10810/e",
            xdisk_image::Format::Qcow2,
            "qcow2:nbd://127.0.0.1:10810/e".to_string(),
        ),
    ] {
        let src = xdisk_image::DiskSource::parse(name, None).unwrap();
        let mut opts = AttachOptions::of(src.location, "xdisk");
        opts.frontend_domid = FE;
        opts.format = Some(format);
        let a = attach::write_nodes(&xs, &opts).unwrap();
        let params = host.read(&format!("{}/params", a.backend_path)).unwrap();
        assert_eq!(params, want, "{name}");
        let (f, _, p) = xdisk_daemon::params::parse_params(&params).unwrap();
        assert_eq!(f, Some(format));
        assert!(
            xdisk_daemon::params::is_nbd_url(&p.to_string_lossy()),
            "{p:?}"
        );
        attach::detach(&xs, &a, Duration::from_millis(100), true).unwrap();
        assert!(!host.exists(&a.backend_path));
    }
    // Probing needs the server: nobody listens, so attach fails before writing anything.
    let src =
        xdisk_image::DiskSource::parse("nbd+unix:///d?socket=/nonexistent/x.sock", None).unwrap();
    let mut opts = AttachOptions::of(src.location, "xdisk");
    opts.frontend_domid = FE;
    let e = attach::write_nodes(&xs, &opts).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.sock"), "{e}");
    assert!(!host.exists("/local/domain/0/backend/xdisk/7/51712"));
}
