#!/usr/bin/env python3
"""NBD benchmark: fio on the raw file vs fio through `xdisk nbd` vs fio through `qemu-nbd`,
in one run.

  bench/nbd-bench.py [--size 1G] [--rounds 5] [--dir /var/tmp] [--quick] [--only NAME]

The same fio job runs on the file (ioengine=io_uring, direct=1: the anchor) and through each
NBD server with fio's libnbd engine (ioengine=nbd, iodepth requests in flight on one
connection, unix socket). Both servers export the same raw file with cache=none and
aio=io_uring, take 4 clients (-e 4) and run persistent (-t) for the whole run. Alternating
order per round; prints medians and the ratios xdisk/fio and xdisk/qemu-nbd. A qcow2 copy is
exported too. Where nbdkit is installed, fio also runs against `nbdkit null` (a server that
does no I/O): the ceiling of fio's NBD client on this machine. Last, `nbdcopy` copies the
whole raw export to null: (multi-conn where the server advertises it) from each server.
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

from benchlib import alternating, prepare_images, xdisk_bin

WORKLOADS = [
    {"name": "4k randread QD32", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 32, "count": 100000},
    {"name": "4k randread QD1", "rw": "randread", "bs": "4k", "bytes": 4096, "depth": 1, "count": 20000},
    {"name": "4k randwrite QD32", "rw": "randwrite", "bs": "4k", "bytes": 4096, "depth": 32, "count": 60000},
    {"name": "1M seq read QD8", "rw": "read", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
    {"name": "1M seq write QD8", "rw": "write", "bs": "1M", "bytes": 1 << 20, "depth": 8, "count": 1000},
]


def fio(target, wl, count):
    """Runs fio on a file or an NBD URI; returns IOPS."""
    cmd = ["fio", "--name=job", f"--rw={wl['rw']}", f"--bs={wl['bs']}", f"--iodepth={wl['depth']}",
           f"--number_ios={count}", "--norandommap", "--randrepeat=0", "--output-format=json"]
    if target.startswith("nbd"):
        cmd += ["--ioengine=nbd", f"--uri={target}"]
    else:
        cmd += ["--ioengine=io_uring", "--direct=1", f"--filename={target}"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    out = json.loads(text[text.index("{"):])
    side = out["jobs"][0]["write" if "write" in wl["rw"] else "read"]
    return side["iops"]


def start(cmd, sock):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(500):
        if os.path.exists(sock):
            return p
        if p.poll() is not None:
            sys.exit(f"{cmd[0]} exited: {p.stderr.read().decode()}")
        time.sleep(0.02)
    p.kill()
    sys.exit(f"{cmd[0]} did not listen on {sock}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    a = ap.parse_args()
    for t in ("fio", "qemu-nbd", "qemu-img"):
        if not shutil.which(t):
            sys.exit(f"{t} not found: run scripts/setup")
    xdisk = xdisk_bin()
    work = tempfile.mkdtemp(prefix="xdisk-nbd-bench-", dir=a.dir)
    raw = os.path.join(work, "disk.raw")
    qcow = os.path.join(work, "disk.qcow2")
    procs = []
    try:
        print(f"# preparing {a.size} raw file with random data and a fully allocated qcow2 copy in {work}")
        size = prepare_images(a.size, raw, qcow)
        socks = {}
        for name, cmd_of in [
            ("xdisk raw", lambda s: [xdisk, "nbd", "-f", "raw", "-t", "-e", "4", "--cache=none", "--aio=io_uring", "-k", s, raw]),
            ("qemu-nbd raw", lambda s: ["qemu-nbd", "-f", "raw", "-t", "-e", "4", "--cache=none", "--aio=io_uring", "-k", s, raw]),
            ("xdisk qcow2", lambda s: [xdisk, "nbd", "-f", "qcow2", "-t", "-e", "4", "--cache=none", "--aio=io_uring", "-k", s, qcow]),
            ("qemu-nbd qcow2", lambda s: ["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "--cache=none", "--aio=io_uring", "-k", s, qcow]),
        ] + ([("nbdkit null", lambda s: ["nbdkit", "-f", "-U", s, "null", str(size)])] if shutil.which("nbdkit") else []):
            s = os.path.join(work, name.replace(" ", "-") + ".sock")
            procs.append(start(cmd_of(s), s))
            socks[name] = f"nbd+unix:///?socket={s}"
        runs = [("fio raw", raw)] + list(socks.items())
        results = {}
        for wl in WORKLOADS:
            if a.only and a.only not in wl["name"]:
                continue
            count = min(wl["count"], size // wl["bytes"])
            if a.quick:
                count = max(count // 20, 50)
            per = alternating(runs, a.rounds, lambda target: fio(target, wl, count))
            med = {k: statistics.median(v) for k, v in per.items()}
            results[wl["name"]] = {"median_iops": med, "samples": per}
            big = wl["bytes"] >= 1 << 20
            print(f"\n{wl['name']} (median of {a.rounds}, {count} requests)")
            for k, v in med.items():
                print(f"  {k:15s} {v * wl['bytes'] / 1e6:8.0f} MB/s" if big else f"  {k:15s} {v:9.0f} IOPS")
            print(f"  ratio xdisk raw / fio raw       = {med['xdisk raw'] / med['fio raw']:.2f}")
            print(f"  ratio qemu-nbd raw / fio raw    = {med['qemu-nbd raw'] / med['fio raw']:.2f}")
            print(f"  ratio xdisk / qemu-nbd (raw)    = {med['xdisk raw'] / med['qemu-nbd raw']:.2f}")
            print(f"  ratio xdisk / qemu-nbd (qcow2)  = {med['xdisk qcow2'] / med['qemu-nbd qcow2']:.2f}")
            if "nbdkit null" in med:
                print(f"  ratio xdisk raw / nbdkit null   = {med['xdisk raw'] / med['nbdkit null']:.2f} (fio's NBD client ceiling)")
            if wl["depth"] == 1:
                lat = {k: 1e6 / v for k, v in med.items()}
                print(f"  QD1 latency: fio {lat['fio raw']:.1f} us, xdisk raw {lat['xdisk raw']:.1f} us "
                      f"(+{lat['xdisk raw'] - lat['fio raw']:.1f}), qemu-nbd raw {lat['qemu-nbd raw']:.1f} us")
            sys.stdout.flush()
        if shutil.which("nbdcopy") and (not a.only or "nbdcopy" in a.only):
            def copy(uri):
                t = time.perf_counter()
                subprocess.run(["nbdcopy", uri, "null:"], check=True)
                return size / (time.perf_counter() - t) / 1e6
            pair = [(k, socks[k]) for k in ("xdisk raw", "qemu-nbd raw")]
            per = alternating(pair, a.rounds, copy)
            med = {k: statistics.median(v) for k, v in per.items()}
            results["nbdcopy"] = {"median_mbps": med, "samples": per}
            print(f"\nnbdcopy of the whole raw export to null: (median of {a.rounds})")
            for k, v in med.items():
                print(f"  {k:15s} {v:8.0f} MB/s")
            print(f"  ratio xdisk / qemu-nbd          = {med['xdisk raw'] / med['qemu-nbd raw']:.2f}")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# total {time.time() - t0:.0f} s")
