#!/usr/bin/env python3
"""Ring benchmark: fio vs `xdisk bench` (Rust blkfront -> blkif rings -> xdisk backend on the
shared-memory Xen simulation), in one run.

Same workload, same parameters, same file, alternating order per round; prints medians and
ratios.

  bench/ring-bench.py [--size 1G] [--rounds 5] [--dir /var/tmp] [--quick] [--json FILE]
                      [--only NAME] [--baseline BIN]

--baseline runs a second xdisk binary (say, built from the commit before a change) in the
same alternating rounds and prints new/base ratios.

Workloads: 4k random read QD32, 4k random write QD32, 1M sequential read QD8 and 1M
sequential write QD8, each a fixed number of requests. Runs: fio (ioengine=io_uring,
direct=1) on the raw file; `xdisk bench` with the same options (the backend then uses
io_uring with O_DIRECT) on the raw file and on a fully allocated qcow2 copy.
Aims: xdisk raw >= 0.95x fio for 4k randread QD32 and 1M sequential; qcow2 within 10 % of raw.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import alternating, prepare_images, sh, xdisk_bin
XDISK = None




def fio_args(path, wl, count):
    """The options both tools take, in fio's spelling."""
    return [f"--filename={path}", f"--rw={wl['rw']}", f"--bs={wl['bs']}",
            f"--iodepth={wl['depth']}", f"--number_ios={count}", "--direct=1",
            "--ioengine=io_uring", "--output-format=json"]


def side(out, wl):
    job = out["jobs"][0]
    s = job["write" if "write" in wl["rw"] else "read"]
    return {"iops": s["iops"], "p50": s["clat_ns"]["percentile"]["50.000000"],
            "p99": s["clat_ns"]["percentile"]["99.000000"],
            "cpu": job["usr_cpu"] + job["sys_cpu"]}


def fio(path, wl, count):
    cmd = ["fio", "--name=anchor", "--norandommap", "--randrepeat=0"] + fio_args(path, wl, count)
    return side(json.loads(sh(cmd)), wl)


def xdisk(path, fmt, wl, count, binary=None):
    cmd = [binary or XDISK, "bench", "--name=xdisk", f"--format={fmt}"] + fio_args(path, wl, count)
    return side(json.loads(sh(cmd)), wl)


WORKLOADS = [
    {"name": "4k randread QD32", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 32, "count": 100000},
    {"name": "4k randwrite QD32", "rw": "randwrite", "bs": "4k", "bytes": 4096, "depth": 32, "count": 60000},
    {"name": "1M seq read QD8", "rw": "read", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
    {"name": "1M seq write QD8", "rw": "write", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
]


def main():
    global XDISK
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--baseline", metavar="BIN",
                    help="another xdisk binary (e.g. built from the previous commit) run in the same rounds")
    a = ap.parse_args()
    for t in ("fio", "qemu-img"):
        if not shutil.which(t):
            sys.exit(f"{t} not found: run scripts/setup")
    XDISK = xdisk_bin()
    work = tempfile.mkdtemp(prefix="xdisk-ring-bench-", dir=a.dir)
    raw = os.path.join(work, "disk.raw")
    qcow = os.path.join(work, "disk.qcow2")
    try:
        print(f"# preparing {a.size} raw file with random data and a fully allocated qcow2 copy in {work}")
        size = prepare_images(a.size, raw, qcow)
        runs = [
            ("fio raw", lambda wl, c: fio(raw, wl, c)),
            ("xdisk raw", lambda wl, c: xdisk(raw, "raw", wl, c)),
            ("xdisk qcow2", lambda wl, c: xdisk(qcow, "qcow2", wl, c)),
        ]
        if a.baseline:
            runs += [
                ("base raw", lambda wl, c: xdisk(raw, "raw", wl, c, a.baseline)),
                ("base qcow2", lambda wl, c: xdisk(qcow, "qcow2", wl, c, a.baseline)),
            ]
        results = {}
        for wl in WORKLOADS:
            if a.only and a.only not in wl["name"]:
                continue
            count = min(wl["count"], size // wl["bytes"])
            if a.quick:
                count = max(count // 20, 50)
            per = alternating(runs, a.rounds, lambda fn: fn(wl, count))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("iops", "p50", "p99", "cpu")}
                   for k, v in per.items()}
            results[wl["name"]] = {"median": med, "samples": per}
            big = wl["bytes"] >= 1 << 20
            print(f"\n{wl['name']} (median of {a.rounds}, {count} requests)")
            print(f"  {'':12s} {'MB/s' if big else 'IOPS':>9s} {'clat p50':>10s} {'clat p99':>10s} {'CPU %':>7s}")
            for k, m in med.items():
                rate = m["iops"] * wl["bytes"] / 1e6 if big else m["iops"]
                print(f"  {k:12s} {rate:9.0f} {m['p50'] / 1e3:8.0f}us {m['p99'] / 1e3:8.0f}us {m['cpu']:7.1f}")
            print(f"  ratio xdisk raw / fio         = {med['xdisk raw']['iops'] / med['fio raw']['iops']:.2f}")
            print(f"  ratio xdisk qcow2 / xdisk raw = {med['xdisk qcow2']['iops'] / med['xdisk raw']['iops']:.2f}")
            if a.baseline:
                print(f"  ratio xdisk raw / base raw     = {med['xdisk raw']['iops'] / med['base raw']['iops']:.2f}")
                print(f"  ratio xdisk qcow2 / base qcow2 = {med['xdisk qcow2']['iops'] / med['base qcow2']['iops']:.2f}")
            sys.stdout.flush()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
        chk = subprocess.run(["qemu-img", "check", qcow], capture_output=True, text=True)
        print(f"\nqemu-img check after the qcow2 writes: exit {chk.returncode}: {chk.stdout.strip().splitlines()[0] if chk.stdout else chk.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# total {time.time() - t0:.0f} s")
