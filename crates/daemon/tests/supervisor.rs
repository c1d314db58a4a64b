//! The supervisor on the simulation: disks written the way libxl writes `qdisk` vbds, served
//! to Rust blkfront guests; several devices and domains; failures confined to one device;
//! frontend close/reopen; domain destruction and node removal tear down without leaks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xdisk_blkif::XenbusState;
use xdisk_daemon::status::Phase;
use xdisk_daemon::SupervisorConfig;

type BadDisk = (u32, String, Vec<(&'static str, &'static str)>);

fn params_of(d: &Disk, tag: &str) -> String {
    format!("{tag}:{}", d.path.display())
}

#[test]
fn serves_a_libxl_qdisk() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = raw_disk(8 * MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51712, &params_of(&disk, "aio"), &[]);
    let mut front = connect(&dom, 51712);
    assert_eq!(front.info().sectors * 512, 8 * MIB);
    let writes = round_trip(&mut front, 1);
    let be = be_dir("qdisk", 1, 51712);
    assert_eq!(
        host.read(&format!("{be}/hotplug-status")).as_deref(),
        Some("connected")
    );
    let st = sup.device("qdisk/1/51712").expect("listed");
    assert_eq!(st.phase, Phase::Running);
    assert_eq!(st.xenbus_state.as_deref(), Some("Connected"));
    assert_eq!(st.vdev.as_deref(), Some("xvda"));
    assert_eq!(st.format.as_deref(), Some("raw"));
    assert_eq!(st.cache.as_deref(), Some("writeback"), "no direct-io-safe");
    assert!(st.counters.wr_req >= 4 && st.counters.rd_req >= 4, "{st:?}");
    assert!(st.counters.wr_sect >= 8 + 1 + 256 + 8);
    assert_eq!(st.counters.connects, 1);
    front.disconnect().unwrap();
    check_image(&disk.path, &writes);
    sup.shutdown();
}

#[test]
fn several_devices_and_domains() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let a = raw_disk(4 * MIB);
    let b = qcow2_disk(16 * MIB);
    let c = qcow2_disk(8 * MIB);
    let spare = raw_disk(MIB);
    let d1 = host.guest(1);
    let d2 = host.guest(2);
    let d3 = host.guest(3);
    host.add_qdisk(1, 51712, &params_of(&a, "aio"), &[]);
    host.add_qdisk(
        2,
        51728,
        &params_of(&b, "qcow2"),
        &[("direct-io-safe", "1")],
    );
    // A plain path: probed.
    host.add_qdisk(3, 51712, &c.path.display().to_string(), &[]);
    // A second disk of domain 1 that its guest does not connect (the test blkfront drives
    // one disk per domain): served all the same, waiting in InitWait.
    host.add_qdisk(1, 51744, &params_of(&spare, "aio"), &[]);
    let mut fronts = vec![
        connect(&d1, 51712),
        connect(&d2, 51728),
        connect(&d3, 51712),
    ];
    let mut all = Vec::new();
    for (i, f) in fronts.iter_mut().enumerate() {
        all.push(round_trip(f, 10 + i as u64));
    }
    wait_until("spare disk in InitWait", T, || {
        host.be_state("qdisk", 1, 51744) == Some(XenbusState::InitWait)
    });
    let devs = sup.devices();
    assert_eq!(devs.len(), 4, "{devs:?}");
    assert!(devs.iter().all(|d| d.phase == Phase::Running));
    let b_st = sup.device("qdisk/2/51728").unwrap();
    assert_eq!(b_st.format.as_deref(), Some("qcow2"));
    // tmpfs would refuse O_DIRECT (then writeback); /var/tmp takes it.
    assert!(matches!(b_st.cache.as_deref(), Some("none" | "writeback")));
    assert_eq!(
        sup.device("qdisk/3/51712").unwrap().format.as_deref(),
        Some("qcow2")
    );
    for f in &mut fronts {
        f.disconnect().unwrap();
        assert_eq!(f.leaked_grants(), 0);
    }
    check_image(&a.path, &all[0]);
    check_image(&b.path, &all[1]);
    check_image(&c.path, &all[2]);
    sup.shutdown();
}

#[test]
fn a_bad_disk_fails_alone() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let good = raw_disk(2 * MIB);
    let dir = tmpdir();
    let corrupt = dir.path().join("corrupt.qcow2");
    let mut junk = b"QFI\xfb".to_vec();
    junk.extend(pattern(3, 4096));
    std::fs::write(&corrupt, junk).unwrap();
    let dom = host.guest(3);
    let bad: Vec<BadDisk> = vec![
        (51712, format!("qcow2:{}", corrupt.display()), vec![]),
        (51728, "aio:/nonexistent/disk.img".into(), vec![]),
        (51744, "vhd:/some/disk.vhd".into(), vec![]),
        (51760, params_of(&good, "aio"), vec![("mode", "rw")]),
        (51776, params_of(&good, "aio"), vec![("frontend-id", "4")]),
    ];
    for (devid, params, extra) in &bad {
        host.add_qdisk(3, *devid, params, extra);
    }
    host.add_qdisk(3, 51792, &params_of(&good, "aio"), &[]);
    let mut front = connect(&dom, 51792);
    round_trip(&mut front, 5);
    for (devid, params, _) in &bad {
        let be = be_dir("qdisk", 3, *devid);
        wait_until("hotplug-status error", T, || {
            host.read(&format!("{be}/hotplug-status")).as_deref() == Some("error")
        });
        let err = host.read(&format!("{be}/error")).unwrap();
        assert!(!err.is_empty(), "{params}");
        assert_eq!(host.be_state("qdisk", 3, *devid), Some(XenbusState::Closed));
        let st = sup.device(&format!("qdisk/3/{devid}")).unwrap();
        assert_eq!(st.phase, Phase::Failed);
        assert_eq!(st.error.as_deref(), Some(err.as_str()));
    }
    let vhd = host
        .read(&format!("{}/error", be_dir("qdisk", 3, 51744)))
        .unwrap();
    assert!(vhd.contains("VHD images are not supported"), "{vhd}");
    // The failed disks' frontends see a closed backend; the good one goes on.
    round_trip(&mut front, 6);
    // Removing a failed disk's nodes forgets it.
    host.remove_disk("qdisk", 3, 51728);
    wait_until("failed device forgotten", T, || {
        sup.device("qdisk/3/51728").is_none()
    });
    front.disconnect().unwrap();
    sup.shutdown();
}

#[test]
fn a_panic_fails_only_that_device() {
    let host = host();
    let cfg = SupervisorConfig {
        device_hook: Some(Arc::new(|cfg, _spec| {
            if cfg.backend_dir.ends_with("/51728") {
                panic!("injected failure");
            }
        })),
        ..SupervisorConfig::default()
    };
    let sup = supervisor(&host, cfg);
    let disk = raw_disk(2 * MIB);
    let other = raw_disk(2 * MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51728, &params_of(&disk, "aio"), &[]);
    host.add_qdisk(1, 51712, &params_of(&other, "aio"), &[]);
    let mut front = connect(&dom, 51712);
    round_trip(&mut front, 1);
    let be = be_dir("qdisk", 1, 51728);
    wait_until("error", T, || {
        host.read(&format!("{be}/hotplug-status")).as_deref() == Some("error")
    });
    let err = host.read(&format!("{be}/error")).unwrap();
    assert!(
        err.contains("panic") && err.contains("injected failure"),
        "{err}"
    );
    // The daemon still serves new disks.
    let third = raw_disk(MIB);
    host.add_qdisk(1, 51744, &params_of(&third, "aio"), &[]);
    let mut f3 = connect(&dom, 51744);
    round_trip(&mut f3, 2);
    f3.disconnect().unwrap();
    front.disconnect().unwrap();
    sup.shutdown();
}

#[test]
fn frontend_close_and_reopen() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = qcow2_disk(4 * MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51712, &params_of(&disk, "qcow2"), &[]);
    let mut front = connect(&dom, 51712);
    let writes = round_trip(&mut front, 7);
    front.disconnect().unwrap();
    assert_eq!(front.leaked_grants(), 0);
    wait_until("backend Closed", T, || {
        host.be_state("qdisk", 1, 51712) == Some(XenbusState::Closed)
    });
    // Still served: a rebooting guest's frontend comes back.
    assert_eq!(sup.device("qdisk/1/51712").unwrap().phase, Phase::Running);
    front.reconnect().unwrap();
    for (s, d) in &writes {
        assert_eq!(&front.read(*s, (d.len() / 512) as u64).unwrap(), d);
    }
    assert_eq!(sup.device("qdisk/1/51712").unwrap().counters.connects, 2);
    front.disconnect().unwrap();
    sup.shutdown();
}

#[test]
fn libxl_detach_sequence() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = raw_disk(2 * MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51712, &params_of(&disk, "aio"), &[]);
    let mut front = connect(&dom, 51712);
    round_trip(&mut front, 8);
    // libxl__initiate_device_generic_remove: online 0 and state Closing in one transaction.
    let be = be_dir("qdisk", 1, 51712);
    host.toolstack
        .transaction(|tx| {
            tx.write(&format!("{be}/online"), "0")?;
            tx.write(&format!("{be}/state"), "5")
        })
        .unwrap();
    // The guest's blkfront reacts to Closing by closing.
    front.disconnect().unwrap();
    wait_until("backend Closed", T, || {
        host.be_state("qdisk", 1, 51712) == Some(XenbusState::Closed)
    });
    wait_until("device stopped", T, || sup.devices().is_empty());
    host.remove_disk("qdisk", 1, 51712);
    assert_eq!(host.xen.event_channel_count(0), 0);
    assert_eq!(sup.stopped_devices().last().unwrap().counters.mappings, 0);
    sup.shutdown();
}

#[test]
fn only_configured_types_and_domains() {
    let host = host();
    let cfg = SupervisorConfig {
        backend_types: vec!["xdisk".into()],
        domains: Some(vec![2]),
        ..SupervisorConfig::default()
    };
    let sup = supervisor(&host, cfg);
    let disk = raw_disk(MIB);
    let _d1 = host.guest(1);
    let d2 = host.guest(2);
    host.add_qdisk(2, 51712, &params_of(&disk, "aio"), &[]);
    host.add_disk("xdisk", 1, 51712, &params_of(&disk, "aio"), &[]);
    host.add_disk(
        "xdisk",
        2,
        51728,
        &params_of(&disk, "aio"),
        &[("mode", "r")],
    );
    let mut f = connect(&d2, 51728);
    assert_ne!(f.info().info & xdisk_blkif::xenbus::VDISK_READONLY, 0);
    f.read(0, 8).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let names: Vec<String> = sup.devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["xdisk/2/51728".to_string()]);
    assert_eq!(
        host.be_state("qdisk", 2, 51712),
        Some(XenbusState::Initialising)
    );
    assert_eq!(
        host.be_state("xdisk", 1, 51712),
        Some(XenbusState::Initialising)
    );
    f.disconnect().unwrap();
    sup.shutdown();
}

#[test]
fn restarted_daemon_serves_again() {
    let host = host();
    let disk = raw_disk(2 * MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51712, &params_of(&disk, "aio"), &[]);
    let sup = supervisor(&host, SupervisorConfig::default());
    let mut front = connect(&dom, 51712);
    let writes = round_trip(&mut front, 9);
    // The daemon stops: its devices close.
    sup.shutdown();
    assert_eq!(host.be_state("qdisk", 1, 51712), Some(XenbusState::Closed));
    let _ = front.disconnect();
    // A new daemon picks the device up again; a frontend that starts over from Initialising
    // reconnects (Linux's blkfront does not: docs/xen.md).
    let sup = supervisor(&host, SupervisorConfig::default());
    front.reconnect().unwrap();
    for (s, d) in &writes {
        assert_eq!(&front.read(*s, (d.len() / 512) as u64).unwrap(), d);
    }
    front.disconnect().unwrap();
    sup.shutdown();
}

#[test]
fn status_renders_and_serializes() {
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = raw_disk(MIB);
    let dom = host.guest(1);
    host.add_qdisk(1, 51728, &params_of(&disk, "aio"), &[]);
    let mut front = connect(&dom, 51728);
    round_trip(&mut front, 2);
    let status = sup.status();
    assert_eq!(status.platform, "sim");
    assert!(status.serves("qdisk", 1) && !status.serves("vbd", 1));
    let json = serde_json::to_string(&status).unwrap();
    let back: xdisk_daemon::status::DaemonStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(back, status);
    let d = &status.devices[0];
    assert!(d.matches("qdisk/1/51728") && d.matches("xvdb") && d.matches("51728"));
    assert!(d.matches("1/51728") && !d.matches("xvda"));
    let text = d.render();
    for s in [
        "qdisk/1/51728 (xvdb): running, Connected",
        "rd_req",
        "wr_sect",
        "mappings",
    ] {
        assert!(text.contains(s), "{s} missing in\n{text}");
    }
    front.disconnect().unwrap();
    sup.shutdown();
}
