//! `xdisk bench`: fio-like workloads through the frontend, the rings and the backend on the
//! simulation. Short runs of every mode on raw and qcow2, fio's JSON shape, verification.

mod support;
use support::{s, tmp, XDISK};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn bench_out(args: &[&str]) -> Output {
    let mut a = vec!["bench"];
    a.extend_from_slice(args);
    Command::new(XDISK).args(&a).output().expect("xdisk runs")
}

fn bench(args: &[&str]) -> String {
    let o = bench_out(args);
    assert!(
        o.status.success(),
        "xdisk bench {args:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn bench_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--output-format=json");
    let out = bench(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A raw file of `size` bytes with non-zero data, and a fully allocated qcow2 copy.
fn images(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let raw = dir.join("disk.raw");
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(131) >> 3) as u8)
        .collect();
    std::fs::write(&raw, data).unwrap();
    let qcow = dir.join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)]);
    (raw, qcow)
}

fn check_side(side: &Value, ios: u64, bs: u64) {
    assert_eq!(side["total_ios"].as_u64(), Some(ios), "{side}");
    assert_eq!(side["io_bytes"].as_u64(), Some(ios * bs), "{side}");
    for k in ["bw_bytes", "runtime", "io_kbytes", "bw"] {
        assert!(side[k].is_u64(), "{k}: {side}");
    }
    assert!(side["iops"].is_number(), "{side}");
    let clat = &side["clat_ns"];
    for k in ["mean", "stddev", "min", "max", "N"] {
        assert!(clat[k].is_number(), "{k}: {clat}");
    }
    assert_eq!(clat["N"].as_u64(), Some(ios));
    let pct = clat["percentile"].as_object().expect("percentiles");
    for k in [
        "1.000000",
        "50.000000",
        "90.000000",
        "99.000000",
        "99.990000",
    ] {
        assert!(pct[k].is_u64(), "{k}: {clat}");
    }
    if ios > 0 {
        assert!(side["iops"].as_f64().unwrap() > 0.0);
        let mean = clat["mean"].as_f64().unwrap();
        let (min, max) = (clat["min"].as_f64().unwrap(), clat["max"].as_f64().unwrap());
        assert!(min > 0.0 && min <= mean && mean <= max, "{clat}");
        let p50 = pct["50.000000"].as_u64().unwrap();
        let p99 = pct["99.000000"].as_u64().unwrap();
        assert!(p50 <= p99 && p99 as f64 <= max, "{clat}");
    }
}

#[test]
fn every_mode_on_raw_and_qcow2() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, qcow) = images(dir.path(), 16 * MIB);
    for (path, fmt) in [(&raw, "raw"), (&qcow, "qcow2")] {
        for rw in ["read", "write", "randread", "randwrite", "randrw", "rw"] {
            let file = format!("--filename={}", s(path));
            let fmt_arg = format!("--format={fmt}");
            let rw_arg = format!("--rw={rw}");
            let v = bench_json(&[
                &file,
                &fmt_arg,
                &rw_arg,
                "--bs=4k",
                "--iodepth=8",
                "--number_ios=300",
                "--direct=1",
                "--name=t",
            ]);
            let job = &v["jobs"][0];
            assert_eq!(job["jobname"], "t");
            assert_eq!(job["xdisk"]["format"], fmt);
            let r = job["read"]["total_ios"].as_u64().unwrap();
            let w = job["write"]["total_ios"].as_u64().unwrap();
            assert_eq!(r + w, 300, "{rw} on {fmt}: {job}");
            match rw {
                "read" | "randread" => assert_eq!(w, 0),
                "write" | "randwrite" => assert_eq!(r, 0),
                _ => assert!(r > 50 && w > 50, "{rw}: {r} reads, {w} writes"),
            }
            check_side(&job["read"], r, 4096);
            check_side(&job["write"], w, 4096);
            for k in ["usr_cpu", "sys_cpu"] {
                let c = job[k].as_f64().unwrap();
                assert!((0.0..=400.0).contains(&c), "{k} {c}");
            }
            assert_eq!(job["xdisk"]["backend_requests"].as_u64(), Some(300));
            assert_eq!(job["xdisk"]["backend_errors"].as_u64(), Some(0));
            // The backend's threads did the 300 requests: some of the process's CPU is theirs.
            let backend = job["xdisk"]["backend_cpu_us"].as_f64().unwrap();
            let total = (job["usr_cpu"].as_f64().unwrap() + job["sys_cpu"].as_f64().unwrap())
                / 100.0
                * job["job_runtime"].as_f64().unwrap()
                * 1e3;
            assert!(backend > 0.0, "backend CPU {backend} us of {total} us");
            assert!(job["xdisk"]["backend_cpu_us_per_request"].as_f64().unwrap() > 0.0);
        }
    }
    qemu_img(&["check", s(&qcow)]);
}

#[test]
fn large_blocks_go_indirect_with_persistent_grants() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, qcow) = images(dir.path(), 16 * MIB);
    for path in [&raw, &qcow] {
        let file = format!("--filename={}", s(path));
        for rw in ["write", "read"] {
            let rw_arg = format!("--rw={rw}");
            let v = bench_json(&[
                &file,
                &rw_arg,
                "--bs=1M",
                "--iodepth=4",
                "--number_ios=16",
                "--direct=1",
            ]);
            let job = &v["jobs"][0];
            check_side(&job[rw], 16, MIB);
            let x = &job["xdisk"];
            assert_eq!(x["backend_indirect_requests"].as_u64(), Some(16), "{x}");
            // Data and indirect pages of a full queue, granted once.
            let fe = x["persistent_grants_frontend"].as_u64().unwrap();
            assert!((4 * 257..=4 * 257 + 64).contains(&fe), "{x}");
            assert!(x["persistent_grants_backend"].as_u64().unwrap() > 0, "{x}");
        }
    }
    // Grant copies, no persistent grants, two queues, buffered.
    let file = format!("--filename={}", s(&raw));
    let v = bench_json(&[
        &file,
        "--rw=randrw",
        "--bs=128k",
        "--iodepth=4",
        "--numjobs=2",
        "--number_ios=20",
        "--datapath=copy",
        "--direct=0",
        "--ioengine=threads",
    ]);
    let job = &v["jobs"][0];
    let total =
        job["read"]["total_ios"].as_u64().unwrap() + job["write"]["total_ios"].as_u64().unwrap();
    assert_eq!(total, 40, "20 per job");
    assert_eq!(job["xdisk"]["persistent_grants_frontend"].as_u64(), Some(0));
    assert_eq!(job["xdisk"]["queues"].as_u64(), Some(2));
}

#[test]
fn normal_output_and_runtime() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, _) = images(dir.path(), 8 * MIB);
    let file = format!("--filename={}", s(&raw));
    let out = bench(&[
        &file,
        "--rw=randread",
        "--bs=4k",
        "--iodepth=4",
        "--runtime=0.3",
        "--time_based",
        "--ioengine=native",
        "--name=job1",
    ]);
    for want in [
        "job1: (g=0): rw=randread",
        "read: IOPS=",
        "clat (",
        "clat percentiles",
        "99.00th=[",
        "cpu          : usr=",
        "Run status group 0",
        "READ: bw=",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    assert!(!out.contains("write: IOPS"));
}

#[test]
fn verify_passes_on_good_data() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, qcow) = images(dir.path(), 8 * MIB);
    for path in [&raw, &qcow] {
        let file = format!("--filename={}", s(path));
        // Sequential writes of the first 2 MiB, verified by the pass at the end.
        let v = bench_json(&[
            &file,
            "--rw=write",
            "--bs=16k",
            "--size=2M",
            "--iodepth=8",
            "--verify=crc32c",
        ]);
        let x = &v["jobs"][0]["xdisk"];
        assert_eq!(x["verify_pass_blocks"].as_u64(), Some(128), "{x}");
        assert_eq!(x["verified_blocks"].as_u64(), Some(128), "{x}");
        // Random reads of those blocks, verified as they come (an earlier run's blocks).
        let v = bench_json(&[
            &file,
            "--rw=randread",
            "--bs=16k",
            "--size=2M",
            "--iodepth=8",
            "--number_ios=100",
            "--verify=crc32c",
        ]);
        assert_eq!(v["jobs"][0]["xdisk"]["verified_blocks"].as_u64(), Some(100));
        // Mixed, rewriting blocks while reading them: generations must match.
        let v = bench_json(&[
            &file,
            "--rw=randrw",
            "--bs=4k",
            "--size=256k",
            "--iodepth=16",
            "--numjobs=2",
            "--runtime=0.5",
            "--time_based",
            "--verify=crc32c",
        ]);
        let x = &v["jobs"][0]["xdisk"];
        assert!(x["verified_blocks"].as_u64().unwrap() > 200, "{x}");
        // Large blocks through indirect requests.
        bench(&[
            &file,
            "--rw=randwrite",
            "--bs=512k",
            "--iodepth=4",
            "--number_ios=20",
            "--verify=crc32c",
        ]);
    }
    qemu_img(&["check", s(&qcow)]);
}

#[test]
fn verify_catches_a_corrupted_write() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, qcow) = images(dir.path(), 8 * MIB);
    for path in [&raw, &qcow] {
        let file = format!("--filename={}", s(path));
        let o = bench_out(&[
            &file,
            "--rw=randwrite",
            "--bs=4k",
            "--size=1M",
            "--iodepth=8",
            "--number_ios=100",
            "--verify=crc32c",
            "--debug-corrupt-write=37",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "corruption not caught: {err}");
        assert!(err.contains("crc32c mismatch"), "{err}");
        // The same run without the corruption passes.
        bench(&[
            &file,
            "--rw=randwrite",
            "--bs=4k",
            "--size=1M",
            "--iodepth=8",
            "--number_ios=100",
            "--verify=crc32c",
        ]);
    }
}

#[test]
fn verify_refuses_data_not_written_by_verify() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, _) = images(dir.path(), 4 * MIB);
    let file = format!("--filename={}", s(&raw));
    let o = bench_out(&[
        &file,
        "--rw=read",
        "--bs=4k",
        "--number_ios=10",
        "--verify=crc32c",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bad magic header"), "{err}");
}

#[test]
fn bad_options_are_refused() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, _) = images(dir.path(), MIB);
    let file = format!("--filename={}", s(&raw));
    for bad in [
        "--rw=sideways",
        "--bs=1000",
        "--bs=4M",
        "--iodepth=0",
        "--verify=md5",
        "--datapath=dma",
        "--ioengine=spdk",
        "--size=2M",
        "--output-format=xml",
        "--reconnect=3-1",
        "--reconnect=soon",
        "--resize_at=1:512k",
        "--resize_at=1:1M",
        "--resize_at=1",
        "--resize_at=1:+1000",
    ] {
        let o = bench_out(&[&file, bad, "--number_ios=1"]);
        assert!(!o.status.success(), "{bad} accepted");
        assert!(!o.stderr.is_empty(), "{bad}: no message");
    }
}

/// The soak of issue #9 in short (scripts/soak runs it for 10 minutes): random frontend
/// reconnections with requests in flight and an online resize half-way, on raw and qcow2,
/// four queues, verifying all along: no mismatch, the reconnections happened (with the
/// same queues), the frontend saw the new size and the workload went into it (new space
/// reads as zeroes until written), no grant leaked, memory sampled.
#[test]
fn reconnects_and_resize_under_verify() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, qcow) = images(dir.path(), 16 * MIB);
    for path in [&raw, &qcow] {
        let file = format!("--filename={}", s(path));
        let v = bench_json(&[
            &file,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--verify=crc32c",
            "--time_based",
            "--runtime=10",
            "--reconnect=1-3",
            "--resize_at=5:+16M",
        ]);
        let job = &v["jobs"][0];
        let x = &job["xdisk"];
        assert_eq!(job["error"].as_u64(), Some(0), "{x}");
        assert_eq!(x["verify_mismatches"].as_u64(), Some(0), "{x}");
        assert!(x["verified_blocks"].as_u64().unwrap() > 1000, "{x}");
        let reconnects = x["reconnects"].as_u64().unwrap();
        assert!(reconnects >= 1, "{x}");
        assert_eq!(x["backend_connects"].as_u64(), Some(reconnects + 1), "{x}");
        assert_eq!(x["queues"].as_u64(), Some(4));
        assert_eq!(x["leaked_grants"].as_u64(), Some(0), "{x}");
        let r = &x["resize"];
        assert_eq!(r["seen"], true, "{r}");
        assert_eq!(r["error"], Value::Null, "{r}");
        assert_eq!(r["size"].as_u64(), Some(32 * MIB), "{r}");
        assert_eq!(r["sectors"].as_u64(), Some(32 * MIB / 512), "{r}");
        assert_eq!(r["blocks_before"].as_u64(), Some(16 * MIB / 4096), "{r}");
        assert_eq!(r["blocks_after"].as_u64(), Some(32 * MIB / 4096), "{r}");
        assert!(r["seen_ms"].as_u64() >= r["done_ms"].as_u64(), "{r}");
        // The verification pass read blocks from the new space too.
        assert!(
            x["verify_pass_blocks"].as_u64().unwrap() > 16 * MIB / 4096,
            "{x}"
        );
        let m = &x["memory"]["rss_kib"];
        for k in ["start", "after_warmup", "end", "min", "max"] {
            assert!(m[k].as_u64().unwrap() > 0, "{k}: {m}");
        }
        assert!(m["samples"].as_array().unwrap().len() >= 5, "{m}");
        assert!(std::fs::metadata(path).unwrap().len() >= 32 * MIB);
    }
    qemu_img(&["check", s(&qcow)]);
    // The normal report names it all.
    let file = format!("--filename={}", s(&raw));
    let out = bench(&[
        &file,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--verify=crc32c",
        "--time_based",
        "--runtime=3",
        "--reconnect=0.5-1",
        "--resize_at=1:+4M",
    ]);
    for want in [
        "0 mismatches",
        "reconnects   : ",
        "requests resubmitted, 0 grants leaked",
        "resize       : to 37748736 bytes at 1.0s",
        "memory       : rss start=",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    assert!(!out.contains("(not seen)"), "{out}");
}

/// A pure read workload may be resized too (the image is then opened read-write): the new
/// space reads as zeroes, the rest as the verify blocks of an earlier run.
#[test]
fn resize_under_a_read_workload() {
    let dir = tmp("xdisk-ringbench-");
    let (raw, _) = images(dir.path(), 4 * MIB);
    let file = format!("--filename={}", s(&raw));
    bench(&[
        &file,
        "--rw=write",
        "--bs=4k",
        "--iodepth=8",
        "--verify=crc32c",
    ]);
    let v = bench_json(&[
        &file,
        "--rw=randread",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--verify=crc32c",
        "--time_based",
        "--runtime=2",
        "--resize_at=0.5:8M",
    ]);
    let x = &v["jobs"][0]["xdisk"];
    assert_eq!(x["verify_mismatches"].as_u64(), Some(0), "{x}");
    assert_eq!(x["resize"]["seen"], true, "{x}");
    assert_eq!(x["resize"]["blocks_after"].as_u64(), Some(2048), "{x}");
}
