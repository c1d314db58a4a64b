//! The daemon's registration as its own domain's device model (what libxl's
//! `libxl__dm_active` looks for before it hot-plugs a qdisk disk of that domain).

use std::sync::Arc;

use xdisk_daemon::dm::{self, Outcome};
use xdisk_xensim::SimXen;

fn pid_node(xs: &xdisk_xen::xenstore::Client) -> Option<String> {
    xs.read_string(&dm::pid_path(0)).ok()
}

#[test]
fn registration_writes_our_pid_and_release_removes_it() {
    let xen = SimXen::new().unwrap();
    let xs = Arc::new(xen.xenstore(0).unwrap());
    let me = std::process::id();
    let (outcome, reg) = dm::register(&xs, 0, me).unwrap();
    assert_eq!(outcome, Outcome::Registered);
    assert_eq!(pid_node(&xs).as_deref(), Some(me.to_string().as_str()));
    reg.unwrap().release().unwrap();
    assert_eq!(pid_node(&xs), None);
}

#[test]
fn registration_leaves_a_live_device_model_alone() {
    let xen = SimXen::new().unwrap();
    let xs = Arc::new(xen.xenstore(0).unwrap());
    // A live process (this test) is registered: another pid must not take its place.
    let live = std::process::id();
    xs.write(&dm::pid_path(0), live.to_string()).unwrap();
    let (outcome, reg) = dm::register(&xs, 0, live + 1).unwrap();
    assert_eq!(outcome, Outcome::Other(live));
    assert!(reg.is_none());
    assert_eq!(pid_node(&xs), Some(live.to_string()));
}

#[test]
fn registration_takes_over_from_a_dead_process_and_drop_cleans_up() {
    let xen = SimXen::new().unwrap();
    let xs = Arc::new(xen.xenstore(0).unwrap());
    // A pid that cannot be alive (above the kernel's pid_max limit).
    xs.write(&dm::pid_path(0), "4194305").unwrap();
    let me = std::process::id();
    {
        let (outcome, reg) = dm::register(&xs, 0, me).unwrap();
        assert_eq!(outcome, Outcome::Registered);
        assert!(reg.is_some());
        assert_eq!(pid_node(&xs), Some(me.to_string()));
    }
    assert_eq!(
        pid_node(&xs),
        None,
        "dropping the registration removes the node"
    );
}

#[test]
fn release_keeps_a_node_that_names_someone_else() {
    let xen = SimXen::new().unwrap();
    let xs = Arc::new(xen.xenstore(0).unwrap());
    let me = std::process::id();
    let (_, reg) = dm::register(&xs, 0, me).unwrap();
    // Someone (a QEMU started later) rewrote the node.
    xs.write(&dm::pid_path(0), "1").unwrap();
    reg.unwrap().release().unwrap();
    assert_eq!(pid_node(&xs).as_deref(), Some("1"));
}
