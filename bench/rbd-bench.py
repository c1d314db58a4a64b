#!/usr/bin/env python3
"""RBD benchmark: fio's rbd engine vs `qemu-img bench` (QEMU's rbd driver) vs `xdisk img bench`
and `xdisk bench` (through the blkif rings) on the same Ceph image, in one run.

Same workload, same image, alternating order per round; prints medians and ratios.

  bench/rbd-bench.py [--size 1G] [--rounds 5] [--quick] [--only NAME] [--json FILE]
                     [--conf CEPH_CONF] [--pool rbd]

Without --conf it uses the throwaway cluster of tests/ceph/start (started if needed, left
running; tests/ceph/stop removes it). Images: a raw RBD image of random data and a fully
allocated qcow2 copy stored in RBD (qemu-img convert); both removed at the end.

Workloads: 4k random read QD32, 4k random write QD32, 1M sequential read QD8, 1M sequential
write QD8. "Random" for the bench tools (qemu-img bench has no random mode) is a large prime
stride modulo the image, so both visit the same offsets; fio uses its random generator.
Runs: fio (ioengine=rbd: librbd's own limit here) with librbd's cache off, as the tools run
with -t none, and again with librbd's default conf (cache on, for reference), qemu-img bench on rbd: (QEMU's driver, what qdisk
would do), xdisk img bench on raw and qcow2-in-RBD, xdisk bench (ring) on raw.
Aims (issue 13): xdisk >= 0.95x fio's rbd engine and >= 1.1x QEMU's driver; qcow2 >= 0.9x raw.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import ROOT, alternating, sh, xdisk_bin

STRIDE_4K = 4096 * 7919
XDISK = None

WORKLOADS = [
    {"name": "4k randread QD32", "bs": 4096, "depth": 32, "write": False, "random": True, "step": STRIDE_4K, "count": 60000},
    {"name": "4k randwrite QD32", "bs": 4096, "depth": 32, "write": True, "random": True, "step": STRIDE_4K, "count": 20000},
    {"name": "1M seq read QD8", "bs": 1 << 20, "depth": 8, "write": False, "random": False, "step": 1 << 20, "count": 1500},
    {"name": "1M seq write QD8", "bs": 1 << 20, "depth": 8, "write": True, "random": False, "step": 1 << 20, "count": 600},
]


def bench_tool(tool, name, fmt, wl, count):
    """qemu-img bench or xdisk img bench on an rbd: name; returns IOPS."""
    args = ["bench", "-f", fmt, "-t", "none", "-c", str(count), "-d", str(wl["depth"]),
            "-s", str(wl["bs"]), "-S", str(wl["step"])]
    if wl["write"]:
        args += ["-w", "--pattern", "0x5a"]
    cmd = (["qemu-img"] if tool == "qemu-img" else [XDISK, "img"]) + args + [name]
    out = sh(cmd)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"no result from {cmd}: {out}")
    return count / float(m.group(1))


def rw_of(wl):
    if wl["random"]:
        return "randwrite" if wl["write"] else "randread"
    return "write" if wl["write"] else "read"


def fio(conf, pool, image, wl, count):
    """fio's rbd engine (librbd directly), with the cluster's conf as given."""
    cmd = ["fio", "--name=anchor", "--ioengine=rbd", "--clientname=admin", f"--pool={pool}",
           f"--rbdname={image}", f"--rw={rw_of(wl)}", f"--bs={wl['bs']}",
           f"--iodepth={wl['depth']}", f"--number_ios={count}", "--norandommap",
           "--randrepeat=0", "--output-format=json", "--group_reporting"]
    out = json.loads(sh(cmd, env=dict(os.environ, CEPH_CONF=conf)))
    return out["jobs"][0]["write" if wl["write"] else "read"]["iops"]


def ring(name, wl, count):
    """xdisk bench: a Rust blkfront, the rings and the backend on the simulation."""
    cmd = [XDISK, "bench", f"--filename={name}", "--format=raw", f"--rw={rw_of(wl)}",
           f"--bs={wl['bs']}", f"--iodepth={wl['depth']}", f"--number_ios={count}", "--direct=1",
           "--output-format=json"]
    out = json.loads(sh(cmd))
    return out["jobs"][0]["write" if wl["write"] else "read"]["iops"]


def main():
    global XDISK
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--conf", help="ceph.conf of the cluster (default: tests/ceph/start's)")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--markdown", action="store_true", help="print the README's table at the end")
    a = ap.parse_args()
    for t in ("fio", "qemu-img", "rbd"):
        if not shutil.which(t):
            sys.exit(f"{t} not found: run scripts/setup")
    XDISK = xdisk_bin()
    conf = a.conf
    if not conf:
        out = sh([os.path.join(ROOT, "tests", "ceph", "start")])
        conf = out.strip().splitlines()[-1].split("=", 1)[1]
    tag = f"bench-{os.getpid()}"
    raw_img, qcow_img = f"{tag}-raw", f"{tag}-qcow2"
    raw = f"rbd:{a.pool}/{raw_img}:conf={conf}"
    qcow = f"rbd:{a.pool}/{qcow_img}:conf={conf}"
    rbd = ["timeout", "600", "rbd", "-c", conf]
    try:
        print(f"# preparing a {a.size} raw RBD image of random data and a fully allocated qcow2 copy in RBD")
        size = int(sh(["numfmt", "--from=iec", a.size.upper().rstrip("B")]).strip())
        sh([XDISK, "img", "create", "-q", "-f", "raw", raw, str(size)])
        fill = subprocess.Popen(["head", "-c", str(size), "/dev/urandom"], stdout=subprocess.PIPE)
        subprocess.run(rbd + ["import", "--no-progress", "-", f"{a.pool}/{raw_img}-tmp"],
                       stdin=fill.stdout, check=True, capture_output=True)
        fill.wait()
        sh(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
            f"rbd:{a.pool}/{raw_img}-tmp:conf={conf}", raw])
        sh(rbd + ["rm", "--no-progress", f"{a.pool}/{raw_img}-tmp"])
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
        # The anchor runs librbd as the tools do with `-t none` (and QEMU with cache=none):
        # its cache off. With librbd's default conf (cache on) fio's engine writes 4k
        # blocks faster here; that row ("fio rbd cache") is printed for reference: a cache
        # may acknowledge a write before the OSD has it, which a cache=none disk must not.
        nocache = os.path.join(os.path.dirname(conf), f"{tag}-nocache.conf")
        with open(conf) as src, open(nocache, "w") as dst:
            dst.write(src.read() + "\n[client]\n\trbd cache = false\n")
        runs = [
            ("fio rbd", lambda wl, c: fio(nocache, a.pool, raw_img, wl, c)),
            ("fio rbd cache", lambda wl, c: fio(conf, a.pool, raw_img, wl, c)),
            ("qemu-img raw", lambda wl, c: bench_tool("qemu-img", raw, "raw", wl, c)),
            ("xdisk raw", lambda wl, c: bench_tool("xdisk", raw, "raw", wl, c)),
            ("xdisk ring raw", lambda wl, c: ring(raw, wl, c)),
            ("qemu-img qcow2", lambda wl, c: bench_tool("qemu-img", qcow, "qcow2", wl, c)),
            ("xdisk qcow2", lambda wl, c: bench_tool("xdisk", qcow, "qcow2", wl, c)),
        ]
        results = {}
        for wl in WORKLOADS:
            if a.only and a.only not in wl["name"]:
                continue
            count = max(wl["count"] // 10, 50) if a.quick else wl["count"]
            per = alternating(runs, a.rounds, lambda fn: fn(wl, count))
            med = {k: statistics.median(v) for k, v in per.items()}
            results[wl["name"]] = {"median_iops": med, "samples": per}
            unit = (lambda x: f"{x:9.0f} IOPS") if wl["bs"] == 4096 else (lambda x: f"{x * wl['bs'] / 1e6:7.0f} MB/s")
            print(f"\n{wl['name']} (median of {a.rounds}, count {count})")
            for k, v in med.items():
                print(f"  {k:15s} {unit(v)}")
            print(f"  ratio xdisk raw / fio rbd          = {med['xdisk raw'] / med['fio rbd']:.2f}")
            print(f"  ratio xdisk raw / qemu-img raw     = {med['xdisk raw'] / med['qemu-img raw']:.2f}")
            print(f"  ratio xdisk ring raw / fio rbd     = {med['xdisk ring raw'] / med['fio rbd']:.2f}")
            print(f"  ratio xdisk qcow2 / xdisk raw      = {med['xdisk qcow2'] / med['xdisk raw']:.2f}")
            print(f"  ratio xdisk qcow2 / qemu-img qcow2 = {med['xdisk qcow2'] / med['qemu-img qcow2']:.2f}")
            sys.stdout.flush()
        if a.markdown:
            print("\n| workload | fio rbd (cache off) | fio rbd (librbd's default cache) | qemu-img raw | xdisk raw "
                  "| xdisk ring raw | xdisk qcow2 | xdisk raw / fio | xdisk raw / QEMU | qcow2 / raw |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for name, r in results.items():
                m = r["median_iops"]
                big = "1M" in name
                cell = (lambda x: f"{x * 1.048576:.0f} MB/s") if big else (lambda x: f"{x / 1e3:.1f}k IOPS")
                print(f"| {name} | {cell(m['fio rbd'])} | {cell(m['fio rbd cache'])} | {cell(m['qemu-img raw'])} | "
                      f"{cell(m['xdisk raw'])} | {cell(m['xdisk ring raw'])} | {cell(m['xdisk qcow2'])} | "
                      f"{m['xdisk raw'] / m['fio rbd']:.2f} | {m['xdisk raw'] / m['qemu-img raw']:.2f} | "
                      f"{m['xdisk qcow2'] / m['xdisk raw']:.2f} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
        chk = subprocess.run(["qemu-img", "check", "-f", "qcow2", qcow], capture_output=True, text=True)
        first = chk.stdout.strip().splitlines()[0] if chk.stdout.strip() else chk.stderr.strip()
        print(f"\nqemu-img check after the qcow2 writes: exit {chk.returncode}: {first}")
    finally:
        for img in (raw_img, qcow_img, f"{raw_img}-tmp"):
            subprocess.run(rbd + ["rm", "--no-progress", f"{a.pool}/{img}"], capture_output=True)
        if os.path.exists(os.path.join(os.path.dirname(conf), f"{tag}-nocache.conf")):
            os.unlink(os.path.join(os.path.dirname(conf), f"{tag}-nocache.conf"))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# total {time.time() - t0:.0f} s")
