//! Crash consistency: a child process writes a qcow2 image through xdisk and is SIGKILLed at
//! random moments, many times over the same image. After every kill:
//! - `qemu-img check` must report no corruption (leaks are acceptable after a crash);
//! - every write acknowledged before a completed flush must be there (or overwritten by a
//!   later write to the same place);
//! - nothing else may have changed.
//!
//! The child is this test binary itself, re-run with `XDISK_CRASH_CHILD` set.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use xdisk_image::{CacheMode, Format, Image, OpenOptions};

mod support;
use support::{qemu_img, qemu_read_all, tmpdir};

const SIZE: u64 = 8 << 20;
const SECTOR: u64 = 512;

/// One write of the deterministic sequence for `seed`: (offset, len, fill byte, discard?).
fn op(seed: u64, i: u64) -> (u64, u64, u8, bool) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let len = r.gen_range(1..=64u64) * SECTOR;
    let off = r.gen_range(0..(SIZE - len) / SECTOR) * SECTOR;
    let discard = r.gen_range(0..10) == 0;
    // A fill byte that names the op (never 0, so a write is told apart from zeroes).
    let fill = (i % 251 + 1) as u8;
    (off, len, fill, discard)
}

/// The child: writes ops 0.. of `seed`, flushing every few ops and reporting "XDISK-FLUSHED n" (ops < n
/// are durable) on stdout, until killed.
fn child(path: &str, seed: u64) {
    let img = Image::open(
        Path::new(path),
        &OpenOptions {
            format: Some(Format::Qcow2),
            cache: CacheMode::None,
            ..OpenOptions::default()
        },
    )
    .expect("child opens image");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut i = 0u64;
    loop {
        let (off, len, fill, discard) = op(seed, i);
        if discard {
            img.discard(off, len).expect("discard");
        } else {
            img.write_at(&vec![fill; len as usize], off).expect("write");
        }
        i += 1;
        if rng.gen_range(0..8) == 0 {
            img.flush().expect("flush");
            // A marker that survives libtest printing "test name ... " on the same line.
            println!("XDISK-FLUSHED {i}");
        }
    }
}

#[test]
fn crash_child_entry() {
    // Only does something when re-run as the child by the parent test.
    if let (Ok(path), Ok(seed)) = (
        std::env::var("XDISK_CRASH_CHILD"),
        std::env::var("XDISK_CRASH_SEED"),
    ) {
        child(&path, seed.parse().unwrap());
    }
}

fn run_crashes(backing: bool, rounds: u64) {
    let dir = tmpdir("xdisk-crash-");
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    if backing {
        let base = dir.path().join("base.raw");
        let mut data = vec![0u8; SIZE as usize];
        rand::rngs::StdRng::seed_from_u64(99).fill(&mut data[..]);
        std::fs::write(&base, &data).unwrap();
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            img_s,
        ])
        .status
        .success());
    } else {
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            img_s,
            "8M"
        ])
        .status
        .success());
    }
    let mut state = qemu_read_all(&img, dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(if backing { 2 } else { 1 });
    for round in 0..rounds {
        let seed = round + 1000 * backing as u64;
        let mut ch = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("XDISK_CRASH_CHILD", img_s)
            .env("XDISK_CRASH_SEED", seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = ch.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.split("XDISK-FLUSHED ").nth(1) {
                    last = n.trim().parse().unwrap_or(last);
                }
            }
            last
        });
        let delay = Duration::from_millis(rng.gen_range(20..400));
        let start = Instant::now();
        while start.elapsed() < delay {
            std::thread::sleep(Duration::from_millis(5));
        }
        ch.kill().unwrap(); // SIGKILL
        ch.wait().unwrap();
        let durable = reader.join().unwrap();

        let check = qemu_img(&["check", img_s]);
        let code = check.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "round {round}: qemu-img check found corruption (exit {code:?}):\n{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let now = qemu_read_all(&img, dir.path());
        // Per sector: the value after the last durable op must be present, unless a later
        // (possibly applied) op touched that sector.
        let mut expect = state.clone();
        let mut later_touch = vec![false; (SIZE / SECTOR) as usize];
        for i in 0..durable {
            let (off, len, fill, discard) = op(seed, i);
            let r = off as usize..(off + len) as usize;
            if discard {
                // Discarded data reads as zeroes or (v2/backing) keeps what was there;
                // either is legal for a discard: mark as uncertain.
                for s in off / SECTOR..(off + len) / SECTOR {
                    later_touch[s as usize] = true;
                }
            } else {
                expect[r].fill(fill);
            }
        }
        // Ops after the last reported flush may or may not have landed, up to the next flush
        // point (the child cannot pass it without reporting it): replay the child's flush
        // decisions to find it.
        let mut frng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut next_flush = 0u64;
        let mut n = 0u64;
        while next_flush <= durable {
            n += 1;
            if frng.gen_range(0..8) == 0 {
                next_flush = n;
            }
        }
        for i in durable..next_flush {
            let (off, len, _, _) = op(seed, i);
            for s in off / SECTOR..(off + len) / SECTOR {
                later_touch[s as usize] = true;
            }
        }
        for (s, &touched) in later_touch.iter().enumerate() {
            let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
            if !touched && now[r.clone()] != expect[r.clone()] {
                let ours = Image::open(
                    &img,
                    &OpenOptions {
                        format: Some(Format::Qcow2),
                        read_only: true,
                        ..OpenOptions::default()
                    },
                )
                .unwrap();
                let mut b = vec![0u8; 8];
                ours.read_at(&mut b, r.start as u64).unwrap();
                eprintln!("xdisk reads {b:?} there");
                assert!(
                    now[r.clone()] == expect[r.clone()],
                    "round {round}: sector {s} lost a flushed write (durable ops < {durable}, next flush {next_flush}): now {:?} expected {:?}",
                    &now[r.start..r.start + 8],
                    &expect[r.start..r.start + 8]
                );
            }
        }
        state = now;
    }
    // Finally a clean open/close must leave no leaks after repair-free normal operation.
    let qcow2 = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    let img_handle = Image::open(&img, &qcow2).unwrap();
    img_handle.flush().unwrap();
    img_handle.close().unwrap();
}

#[test]
fn crash_kill9_qcow2_no_corruption_flushed_data_survives() {
    run_crashes(false, 30);
}

#[test]
fn crash_kill9_qcow2_with_backing_no_corruption_flushed_data_survives() {
    run_crashes(true, 30);
}
