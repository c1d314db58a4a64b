//! Backing files of served disks (issue 9, finding 2), through the supervisor on the
//! simulation: a plain (probed) `params` path to a qcow2 naming a backing file fails that
//! disk with the fix in its `error` node, `--backing-dirs` confines backing files, and a
//! chain inside the allowed directory is served.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use xdisk_daemon::params::ParamsDefaults;
use xdisk_daemon::SupervisorConfig;

fn qcow2_naming(p: &Path, backing: &Path) {
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(backing)
        .args(["-F", "raw"])
        .arg(p)
        .arg("2M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn error_of(host: &Host, devid: u32) -> String {
    let be = be_dir("qdisk", 3, devid);
    wait_until("hotplug-status error", T, || {
        host.read(&format!("{be}/hotplug-status")).as_deref() == Some("error")
    });
    host.read(&format!("{be}/error")).unwrap()
}

#[test]
fn probed_params_and_backing_dirs_confine_backing_files() {
    let host = host();
    let dir = tmpdir();
    let images = dir.path().join("images");
    let others = dir.path().join("others");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&others).unwrap();
    let tenant = others.join("tenant.raw");
    std::fs::write(&tenant, pattern(9, 2 << 20)).unwrap();
    let base = images.join("base.raw");
    std::fs::write(&base, pattern(1, 2 << 20)).unwrap();
    let probed = images.join("probed.img");
    qcow2_naming(&probed, &base);
    let outside = images.join("outside.qcow2");
    qcow2_naming(&outside, &tenant);
    let good = images.join("good.qcow2");
    qcow2_naming(&good, &base);
    let sup = supervisor(
        &host,
        SupervisorConfig {
            params: ParamsDefaults {
                backing_dirs: vec![images.clone()],
                ..ParamsDefaults::default()
            },
            ..SupervisorConfig::default()
        },
    );
    let dom = host.guest(3);
    host.add_qdisk(3, 51712, &probed.display().to_string(), &[]);
    host.add_qdisk(3, 51728, &format!("qcow2:{}", outside.display()), &[]);
    host.add_qdisk(3, 51744, &format!("qcow2:{}", good.display()), &[]);
    let e = error_of(&host, 51712);
    assert!(e.contains("probed") && e.contains("params=qcow2:"), "{e}");
    let e = error_of(&host, 51728);
    assert!(e.contains("outside the allowed backing directories"), "{e}");
    let mut front = connect(&dom, 51744);
    round_trip(&mut front, 4);
    front.disconnect().unwrap();
    sup.shutdown();
}
