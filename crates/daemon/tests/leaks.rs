//! Teardown without leaks: the threads, event channels and grant mappings of a device are
//! gone after its domain dies or its backend directory is removed. Thread counts are
//! process-wide, so these tests run one at a time.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use xdisk_blkfront::FrontConfig;
use xdisk_daemon::SupervisorConfig;

static SERIAL: Mutex<()> = Mutex::new(());

fn params_of(d: &Disk, tag: &str) -> String {
    format!("{tag}:{}", d.path.display())
}

#[test]
fn domain_destroy_tears_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = raw_disk(4 * MIB);
    let dom = host.guest(5);
    let baseline = thread_count();
    host.add_qdisk(5, 51712, &params_of(&disk, "aio"), &[]);
    let mut front = connect(&dom, 51712);
    round_trip(&mut front, 3);
    // The guest dies with its rings up: its xenstore directory goes, @releaseDomain fires.
    front.vanish().unwrap();
    wait_until("device stopped", T, || sup.devices().is_empty());
    let last = sup.stopped_devices().pop().unwrap();
    assert_eq!(last.name, "qdisk/5/51712");
    assert_eq!(last.counters.mappings, 0, "{last:?}");
    assert_eq!(last.counters.queues, 0);
    assert_eq!(host.xen.event_channel_count(0), 0);
    // The toolstack then removes the backend directory: nothing is left.
    host.remove_disk("qdisk", 5, 51712);
    wait_until("threads back to the baseline", T, || {
        thread_count() <= baseline
    });
    assert!(!host.exists(&be_dir("qdisk", 5, 51712)));
    sup.shutdown();
}

#[test]
fn backend_removal_tears_down_without_leaks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let host = host();
    let sup = supervisor(&host, SupervisorConfig::default());
    let disk = raw_disk(4 * MIB);
    let dom = host.guest(6);
    let baseline = thread_count();
    host.add_qdisk(6, 51712, &params_of(&disk, "aio"), &[]);
    let cfg = FrontConfig {
        timeout: Duration::from_secs(2),
        ..FrontConfig::default()
    };
    let mut front = connect_with(&dom, 51712, cfg);
    round_trip(&mut front, 4);
    // A forced removal (`xl block-detach -f`, or a toolstack cleaning up): the backend
    // directory goes while the frontend is connected.
    host.toolstack.rm(&be_dir("qdisk", 6, 51712)).unwrap();
    wait_until("device stopped", T, || sup.devices().is_empty());
    // What the stopping device wrote (its state) is removed again, with the empty parents.
    wait_until("no leftovers", T, || {
        !host.exists("/local/domain/0/backend/qdisk/6")
    });
    assert_eq!(host.xen.event_channel_count(0), 0);
    // Every grant came back: the frontend can revoke all of them.
    let _ = front.disconnect();
    assert_eq!(front.leaked_grants(), 0);
    drop(front);
    wait_until("threads back to the baseline", T, || {
        thread_count() <= baseline
    });
    sup.shutdown();
}
