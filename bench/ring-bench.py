#!/usr/bin/env python3
"""Ring benchmark: fio vs `xdisk bench` (Rust blkfront -> blkif rings -> xdisk backend on the
shared-memory Xen simulation), in one run.

Same workload, same parameters, same file, alternating order per round; prints medians and
ratios.

  bench/ring-bench.py [--size 1G] [--rounds 5] [--dir /var/tmp] [--quick] [--json FILE]
                      [--only NAME] [--baseline BIN]

--baseline runs a second xdisk binary (say, built from the commit before a change) in the
same alternating rounds and prints new/base ratios.

Workloads: 4k random read and write at QD32 and QD1, the QD32 ones again with two jobs
(fio: two threads; xdisk: two queues, each with its own ring and backend thread), 1M
sequential read QD8 and 1M sequential write QD8, each a fixed number of requests. Runs: fio
(ioengine=io_uring, direct=1) on the raw file; `xdisk bench` with the same options (the backend
then uses io_uring with O_DIRECT) on the raw file and on a fully allocated qcow2 copy.

"CPU us/IO" is the CPU time (user + system, every thread: for xdisk the frontend, the backend
and the simulation, with the backend's threads alone in brackets: what dom0 would spend; for fio
its job threads) per request over the measured run (each tool's
getrusage share times its run time): the per-request cost, where this machine has no hardware
counters for `perf stat -e cycles` (a VM without a PMU).

Aims (issue 12): xdisk raw >= 0.95x fio for 4k random QD32 and 1M sequential; QD1 latency
<= fio + 10 us; two jobs >= 1.6x one job where fio's two jobs are; qcow2 within 10 % of raw.
--markdown prints the table the README carries.
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
            "--ioengine=io_uring", "--output-format=json", f"--numjobs={wl.get('jobs', 1)}"]


def side(out, wl, count):
    job = out["jobs"][0]
    # Both tools give CPU as a share of the job's run time (fio sums its jobs' run times
    # under group_reporting); times that is the CPU the run took, without start-up.
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3
    s = job["write" if "write" in wl["rw"] else "read"]
    return {"iops": s["iops"], "p50": s["clat_ns"]["percentile"]["50.000000"],
            "p99": s["clat_ns"]["percentile"]["99.000000"],
            "lat": 1e9 / s["iops"] * wl["depth"] if s["iops"] else 0.0,
            "cpu": job["usr_cpu"] + job["sys_cpu"],
            "cpu_per_io": cpu * 1e6 / (count * wl.get("jobs", 1)),
            # xdisk only: the backend's threads (what dom0 would spend; the rest is the frontend).
            "backend_per_io": job.get("xdisk", {}).get("backend_cpu_us_per_request", 0.0)}


def fio(path, wl, count):
    cmd = ["fio", "--name=anchor", "--norandommap", "--randrepeat=0", "--group_reporting",
           "--thread"] + fio_args(path, wl, count)
    return side(json.loads(sh(cmd)), wl, count)


def xdisk(path, fmt, wl, count, binary=None):
    cmd = [binary or XDISK, "bench", "--name=xdisk", f"--format={fmt}"] + fio_args(path, wl, count)
    return side(json.loads(sh(cmd)), wl, count)


WORKLOADS = [
    {"name": "4k randread QD32", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 32, "count": 100000},
    {"name": "4k randwrite QD32", "rw": "randwrite", "bs": "4k", "bytes": 4096, "depth": 32, "count": 60000},
    {"name": "4k randread QD1", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 1, "count": 20000},
    {"name": "4k randwrite QD1", "rw": "randwrite", "bs": "4k", "bytes": 4096, "depth": 1, "count": 20000},
    {"name": "4k randread QD32 x2 jobs", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 32, "count": 60000, "jobs": 2},
    {"name": "4k randwrite QD32 x2 jobs", "rw": "randwrite", "bs": "4k", "bytes": 4096, "depth": 32, "count": 40000, "jobs": 2},
    {"name": "1M seq read QD8", "rw": "read", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
    {"name": "1M seq write QD8", "rw": "write", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
]


METRICS = ("iops", "lat", "p50", "p99", "cpu", "cpu_per_io", "backend_per_io")


def markdown(results):
    """The README's table: one row per workload, the medians and the ratios."""
    print("\n| workload | fio raw | xdisk raw | xdisk / fio | xdisk qcow2 / raw | CPU us/IO: fio / xdisk (its backend) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        med = r["median"]
        f, x, q = med["fio raw"], med["xdisk raw"], med["xdisk qcow2"]
        if "QD1" in name and "QD16" not in name:
            cell = lambda m: f"{m['lat'] / 1e3:.1f} us"
            ratio = f"{f['iops'] and x['iops'] / f['iops']:.2f} ({(x['lat'] - f['lat']) / 1e3:+.1f} us)"
        elif "1M" in name:
            cell = lambda m: f"{m['iops'] * 1.048576:.0f} MB/s"
            ratio = f"{x['iops'] / f['iops']:.2f}"
        else:
            cell = lambda m: f"{m['iops'] / 1e3:.1f}k IOPS"
            ratio = f"{x['iops'] / f['iops']:.2f}"
        one = results.get(name.replace(" x2 jobs", ""))
        if one and one is not r:
            of, ox = one["median"]["fio raw"], one["median"]["xdisk raw"]
            ratio += f"; x2 jobs: fio {f['iops'] / of['iops']:.2f}x, xdisk {x['iops'] / ox['iops']:.2f}x"
        print(f"| {name} | {cell(f)} | {cell(x)} | {ratio} | {q['iops'] / x['iops']:.2f} | "
              f"{f['cpu_per_io']:.1f} / {x['cpu_per_io']:.1f} ({x['backend_per_io']:.1f}) |")


def main():
    global XDISK
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--markdown", action="store_true", help="print the README's table at the end")
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
            med = {k: {m: statistics.median(r[m] for r in v) for m in METRICS}
                   for k, v in per.items()}
            results[wl["name"]] = {"median": med, "samples": per, "count": count}
            big = wl["bytes"] >= 1 << 20
            print(f"\n{wl['name']} (median of {a.rounds}, {count} requests per job)")
            print(f"  {'':12s} {'MB/s' if big else 'IOPS':>9s} {'mean lat':>10s} {'clat p50':>10s} "
                  f"{'clat p99':>10s} {'CPU %':>7s} {'CPU us/IO':>10s} {'backend':>8s}")
            for k, m in med.items():
                rate = m["iops"] * wl["bytes"] / 1e6 if big else m["iops"]
                print(f"  {k:12s} {rate:9.0f} {m['lat'] / 1e3:8.1f}us {m['p50'] / 1e3:8.0f}us "
                      f"{m['p99'] / 1e3:8.0f}us {m['cpu']:7.1f} {m['cpu_per_io']:10.1f} {m['backend_per_io']:8.1f}")
            print(f"  ratio xdisk raw / fio         = {med['xdisk raw']['iops'] / med['fio raw']['iops']:.2f}")
            if wl["depth"] == 1:
                print(f"  xdisk raw - fio latency       = {(med['xdisk raw']['lat'] - med['fio raw']['lat']) / 1e3:+.1f} us")
            print(f"  ratio xdisk qcow2 / xdisk raw = {med['xdisk qcow2']['iops'] / med['xdisk raw']['iops']:.2f}")
            one = results.get(wl["name"].replace(" x2 jobs", ""))
            if wl.get("jobs", 1) > 1 and one:
                for k in ("fio raw", "xdisk raw"):
                    print(f"  scaling {k:9s} 2 jobs / 1 job = {med[k]['iops'] / one['median'][k]['iops']:.2f}")
            if a.baseline:
                print(f"  ratio xdisk raw / base raw     = {med['xdisk raw']['iops'] / med['base raw']['iops']:.2f}")
                print(f"  ratio xdisk qcow2 / base qcow2 = {med['xdisk qcow2']['iops'] / med['base qcow2']['iops']:.2f}")
            sys.stdout.flush()
        if a.markdown:
            markdown(results)
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
