#!/usr/bin/env python3
"""Image-engine benchmark: fio vs `xdisk img bench` vs `qemu-img bench`, in one run.

Same workload, same file, alternating order per round; prints medians and ratios.

  bench/img-bench.py [--size 1G] [--rounds 3] [--dir /var/tmp] [--quick] [--only NAME] [--baseline BIN]

--baseline runs a second xdisk binary (say, built from the commit before a change) in the
same alternating rounds and prints new/base ratios: how a refactoring shows it lost no speed.

Workloads: 4k random read QD32, 4k random write QD32, 1M sequential read QD8 and 1M
sequential write QD8; then writes that allocate (64k sequential and 4k scattered, QD32) into a
fresh qcow2 created before every run, xdisk against qemu-img bench. "Random" for the two bench tools (qemu-img bench has no random mode) is
a large prime stride modulo the image (qemu-img bench's own wrap rule), so both tools visit the
same offsets; fio uses its random generator. Anchors: fio (io_uring, O_DIRECT) on the raw file,
qemu-img bench (-t none -i io_uring) on the raw file and on a fully allocated qcow2 copy.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import alternating, prepare_images, sh, sh_cpu, xdisk_bin
STRIDE_4K = 4096 * 7919  # a prime number of 4k blocks: scatters like random I/O




def bench_tool(tool, path, fmt, wl, count, binary=None):
    """Runs qemu-img bench or xdisk img bench (`binary`: another xdisk); returns (IOPS, CPU
    microseconds per request: the whole process, start-up included)."""
    bs, depth, write, step = wl["bs"], wl["depth"], wl["write"], wl["step"]
    args = ["bench", "-f", fmt, "-t", "none", "-i", "io_uring", "-c", str(count),
            "-d", str(depth), "-s", str(bs), "-S", str(step)]
    if write:
        args += ["-w", "--pattern", "0x5a"]
    cmd = ["qemu-img"] + args + [path] if tool == "qemu-img" else [binary or XDISK, "img"] + args + [path]
    out, cpu = sh_cpu(cmd)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"no result from {cmd}: {out}")
    return count / float(m.group(1)), cpu * 1e6 / count


def fio(path, wl, count):
    rw = ("randwrite" if wl["write"] else "randread") if wl["random"] else ("write" if wl["write"] else "read")
    cmd = ["fio", "--name=anchor", f"--filename={path}", "--direct=1", "--ioengine=io_uring",
           f"--rw={rw}", f"--bs={wl['bs']}", f"--iodepth={wl['depth']}", f"--number_ios={count}",
           "--norandommap", "--randrepeat=0", "--output-format=json", "--group_reporting"]
    job = json.loads(sh(cmd))["jobs"][0]
    side = job["write" if wl["write"] else "read"]
    # fio's own account of the job (its start-up, which costs more than a short run, left out).
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3
    return side["iops"], cpu * 1e6 / count


# Writes that allocate: every round starts from a fresh (empty) qcow2 of the same size, so
# each request allocates clusters (and the file grows), as a new guest's disk does.
ALLOC_WORKLOADS = [
    {"name": "64k seq write QD32, fresh qcow2", "bs": 65536, "depth": 32, "write": True, "random": False, "step": 65536, "count": 16000},
    {"name": "4k stride write QD32, fresh qcow2", "bs": 4096, "depth": 32, "write": True, "random": True, "step": STRIDE_4K, "count": 16000},
]

WORKLOADS = [
    {"name": "4k randread QD32", "bs": 4096, "depth": 32, "write": False, "random": True, "step": STRIDE_4K, "count": 150000},
    {"name": "4k randwrite QD32", "bs": 4096, "depth": 32, "write": True, "random": True, "step": STRIDE_4K, "count": 100000},
    {"name": "1M seq read QD8", "bs": 1 << 20, "depth": 8, "write": False, "random": False, "step": 1 << 20, "count": 1500},
    {"name": "1M seq write QD8", "bs": 1 << 20, "depth": 8, "write": True, "random": False, "step": 1 << 20, "count": 1000},
]


def measure(runs, wl, a):
    """Runs workload `wl` with every run in alternating rounds: (count, samples per run,
    median IOPS per run)."""
    count = max(wl["count"] // 20, 50) if a.quick else wl["count"]
    per = alternating(runs, a.rounds, lambda fn: fn(wl, count))
    med = {k: statistics.median(i for i, _ in v) for k, v in per.items()}
    return count, per, med


def main():
    global XDISK
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--markdown", action="store_true", help="print the README's table at the end")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--baseline", metavar="BIN",
                    help="another xdisk binary (e.g. built from the previous commit) run in the same rounds")
    a = ap.parse_args()
    for t in ("fio", "qemu-img"):
        if not shutil.which(t):
            sys.exit(f"{t} not found: run scripts/setup")
    XDISK = xdisk_bin()
    work = tempfile.mkdtemp(prefix="xdisk-bench-", dir=a.dir)
    raw = os.path.join(work, "disk.raw")
    qcow = os.path.join(work, "disk.qcow2")
    try:
        print(f"# preparing {a.size} raw file with random data and a fully allocated qcow2 copy in {work}")
        size = prepare_images(a.size, raw, qcow)
        runs = [
            ("fio raw", lambda wl, c: fio(raw, wl, c)),
            ("xdisk raw", lambda wl, c: bench_tool("xdisk", raw, "raw", wl, c)),
            ("qemu-img raw", lambda wl, c: bench_tool("qemu-img", raw, "raw", wl, c)),
            ("xdisk qcow2", lambda wl, c: bench_tool("xdisk", qcow, "qcow2", wl, c)),
            ("qemu-img qcow2", lambda wl, c: bench_tool("qemu-img", qcow, "qcow2", wl, c)),
        ]
        if a.baseline:
            runs += [
                ("base raw", lambda wl, c: bench_tool("xdisk", raw, "raw", wl, c, a.baseline)),
                ("base qcow2", lambda wl, c: bench_tool("xdisk", qcow, "qcow2", wl, c, a.baseline)),
            ]
        results = {}
        for wl in WORKLOADS:
            if a.only and a.only not in wl["name"]:
                continue
            count, per, med = measure(runs, wl, a)
            cpu = {k: statistics.median(c for _, c in v) for k, v in per.items()}
            results[wl["name"]] = {"median_iops": med, "median_cpu_us": cpu, "samples": per}
            unit = (lambda x: f"{x:9.0f} IOPS") if wl["bs"] == 4096 else (lambda x: f"{x * wl['bs'] / 1e6:7.0f} MB/s")
            print(f"\n{wl['name']} (median of {a.rounds}, count {count})")
            for k, v in med.items():
                print(f"  {k:15s} {unit(v)}   CPU {cpu[k]:6.1f} us/request")
            print(f"  ratio xdisk raw / fio          = {med['xdisk raw'] / med['fio raw']:.2f}")
            print(f"  ratio xdisk qcow2 / xdisk raw  = {med['xdisk qcow2'] / med['xdisk raw']:.2f}")
            print(f"  ratio xdisk raw / qemu-img raw = {med['xdisk raw'] / med['qemu-img raw']:.2f}")
            print(f"  ratio xdisk qcow2 / qemu-img qcow2 = {med['xdisk qcow2'] / med['qemu-img qcow2']:.2f}")
            if a.baseline:
                print(f"  ratio xdisk raw / base raw     = {med['xdisk raw'] / med['base raw']:.2f}")
                print(f"  ratio xdisk qcow2 / base qcow2 = {med['xdisk qcow2'] / med['base qcow2']:.2f}")
            sys.stdout.flush()
        alloc = {}
        fresh = os.path.join(work, "fresh.qcow2")

        def on_fresh(tool, wl, c, binary=None):
            if os.path.exists(fresh):
                os.unlink(fresh)
            sh(["qemu-img", "create", "-q", "-f", "qcow2", fresh, str(size)])
            return bench_tool(tool, fresh, "qcow2", wl, c, binary)

        alloc_runs = [
            ("xdisk", lambda wl, c: on_fresh("xdisk", wl, c)),
            ("qemu-img", lambda wl, c: on_fresh("qemu-img", wl, c)),
        ]
        if a.baseline:
            alloc_runs.append(("base", lambda wl, c: on_fresh("xdisk", wl, c, a.baseline)))
        for wl in ALLOC_WORKLOADS:
            if a.only and a.only not in wl["name"]:
                continue
            count, per, med = measure(alloc_runs, wl, a)
            alloc[wl["name"]] = {"median_iops": med, "samples": per}
            print(f"\n{wl['name']} (median of {a.rounds}, count {count})")
            for k, v in med.items():
                print(f"  {k:15s} {v:9.0f} IOPS")
            print(f"  ratio xdisk / qemu-img = {med['xdisk'] / med['qemu-img']:.2f}")
            if a.baseline:
                print(f"  ratio xdisk / base     = {med['xdisk'] / med['base']:.2f}")
            chk = subprocess.run(["qemu-img", "check", fresh], capture_output=True, text=True)
            print(f"  qemu-img check of the last one: exit {chk.returncode}")
            sys.stdout.flush()
        results["allocating"] = alloc
        if a.markdown and len(results) > 1:
            print("\n| workload | fio raw | xdisk raw | xdisk / qemu-img raw | xdisk / qemu-img qcow2 | xdisk raw / fio | xdisk qcow2 / raw | CPU us/request: fio / qemu-img / xdisk (raw) |")
            print("|---|---|---|---|---|---|---|---|")
            for name, r in results.items():
                if name == "allocating":
                    continue
                m, c = r["median_iops"], r["median_cpu_us"]
                big = "1M" in name
                cell = (lambda x: f"{x * 1.048576:.0f} MB/s") if big else (lambda x: f"{x / 1e3:.1f}k IOPS")
                print(f"| {name} | {cell(m['fio raw'])} | {cell(m['xdisk raw'])} | "
                      f"{m['xdisk raw'] / m['qemu-img raw']:.2f} | {m['xdisk qcow2'] / m['qemu-img qcow2']:.2f} | "
                      f"{m['xdisk raw'] / m['fio raw']:.2f} | {m['xdisk qcow2'] / m['xdisk raw']:.2f} | "
                      f"{c['fio raw']:.1f} / {c['qemu-img raw']:.1f} / {c['xdisk raw']:.1f} |")
        if a.markdown and alloc:
            print("\n| allocating writes | qemu-img | xdisk | xdisk / qemu-img |")
            print("|---|---|---|---|")
            for name, r in alloc.items():
                m = r["median_iops"]
                print(f"| {name} | {m['qemu-img'] / 1e3:.1f}k IOPS | {m['xdisk'] / 1e3:.1f}k IOPS | "
                      f"{m['xdisk'] / m['qemu-img']:.2f} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
        chk = subprocess.run(["qemu-img", "check", qcow], capture_output=True, text=True)
        print(f"\nqemu-img check after the qcow2 writes: exit {chk.returncode}: {chk.stdout.strip().splitlines()[0] if chk.stdout else chk.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    XDISK = None
    t0 = time.time()
    main()
    print(f"# total {time.time() - t0:.0f} s")
