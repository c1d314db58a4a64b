//! A frontend that never connects costs the backend no CPU. (Its own test binary: it measures
//! the process's CPU time.)

mod common;

use std::time::Duration;

use common::*;
use xdisk_blkif::XenbusState;

const VICTIM: u16 = 1;

#[test]
fn never_connecting_frontend_costs_nothing() {
    let host = host();
    let d = raw_disk(1 << 20);
    let _dom = host.xen.create_domain(VICTIM, 64).unwrap();
    host.add_vbd(VICTIM, 768, "w", &[]);
    let device = start_device(
        &host,
        device_config(VICTIM, 768),
        open_image(&d.path, false),
    );
    assert_eq!(host.be_state(VICTIM, 768), Some(XenbusState::InitWait));
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = ticks();
    std::thread::sleep(Duration::from_millis(500));
    let used = ticks() - before;
    assert!(used < 10, "{used} ticks of CPU while waiting");
    assert_eq!(device.stats().queues, 0);
    device.shutdown().unwrap();
    assert_eq!(host.be_state(VICTIM, 768), Some(XenbusState::Closed));
}
