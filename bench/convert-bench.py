#!/usr/bin/env python3
"""Conversion benchmark: `xdisk img convert` against `qemu-img convert`, in one run.

  bench/convert-bench.py [--size 2G] [--data 0.6] [--rounds 3] [--dir /var/tmp] [--only NAME]

A source image of --size with --data of it holding random data (in 1 MiB runs spread over
the disk, the rest unallocated), as raw and as qcow2, plus a qcow2 overlay with a quarter of
the data in it over a qcow2 base with the rest. Each conversion runs with the same cache
options on both sides (-t none -T none: O_DIRECT, the page cache out of the way), qemu-img
with `-m 16 -W` (its fastest: 16 coroutines, out-of-order writes) and xdisk with its
defaults (-m 8 threads); the output is deleted between runs. Alternating order per round;
prints medians of the wall time, CPU time (user+sys of the process) and the ratio
xdisk/qemu-img of the wall time (lower is better for xdisk). The copy floor is fio reading
and writing the data's bytes at once with O_DIRECT, from buffers in 4 KiB pages: floor/tool
near 1 means the tool is at the speed the disk gives a plain copy (xdisk's chunks are in huge
pages, which the block layer sends in fewer, larger requests: it can pass the floor).
--markdown prints the README table.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import alternating, sh, xdisk_bin


def make_sources(work, size, data):
    """A raw file with `data` of it in random 1 MiB runs, its qcow2 copy, and a base+overlay
    chain holding the same bytes."""
    raw = os.path.join(work, "src.raw")
    mib = size >> 20
    chosen = sorted(random.Random(7).sample(range(mib), int(mib * data)))
    with open(raw, "wb") as f, open("/dev/urandom", "rb") as r:
        f.truncate(size)
        for m in chosen:
            f.seek(m << 20)
            f.write(r.read(1 << 20))
    qcow = os.path.join(work, "src.qcow2")
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
    # The chain: every 4th data run in the overlay, the others in the base.
    base = os.path.join(work, "base.qcow2")
    top = os.path.join(work, "top.qcow2")
    base_raw = os.path.join(work, "base.raw")
    shutil.copyfile(raw, base_raw)
    with open(base_raw, "r+b") as f:
        for i, m in enumerate(chosen):
            if i % 4 == 0:
                f.seek(m << 20)
                f.write(b"\0" * (1 << 20))
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", base_raw, base])
    os.unlink(base_raw)
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top])
    # The overlay's runs, copied from the raw source (qemu-io's write -s takes the bytes
    # from a file).
    run = os.path.join(work, "run.bin")
    for i, m in enumerate(chosen):
        if i % 4 == 0:
            with open(raw, "rb") as f:
                f.seek(m << 20)
                chunk = f.read(1 << 20)
            with open(run, "wb") as g:
                g.write(chunk)
            sh(["qemu-io", "-f", "qcow2", "-c", f"write -s {run} {m << 20} 1M", top])
    os.unlink(run)
    os.sync()
    time.sleep(2)
    return raw, qcow, top


def timed(cmd):
    """Runs cmd; returns (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def copy_floor(src, out, nbytes):
    """The disk's floor for a conversion here: fio reading `nbytes` of the source (the qcow2
    copy, whose data are packed: no holes to skip) and writing as many bytes to a new file at
    once (O_DIRECT, 1 MiB, 16 in flight each), as a convert of that much data must. Returns
    the seconds of the longer job (fio's own start-up left out)."""
    if os.path.exists(out):
        os.unlink(out)
    common = ["--direct=1", "--ioengine=io_uring", "--bs=1M", "--iodepth=16", f"--size={nbytes}"]
    cmd = ["fio", "--output-format=json",
           "--name=read", f"--filename={src}", "--rw=read"] + common + [
           "--name=write", f"--filename={out}", "--rw=write"] + common
    jobs = json.loads(sh(cmd))["jobs"]
    wall = max(j["job_runtime"] for j in jobs) / 1e3
    os.unlink(out)
    os.sync()
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2G")
    ap.add_argument("--data", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--only", help="run only conversions whose name contains this")
    ap.add_argument("--markdown", action="store_true", help="print the README's table at the end")
    a = ap.parse_args()
    for t in ("qemu-img", "qemu-io", "fio"):
        if not shutil.which(t):
            sys.exit(f"{t} not found: run scripts/setup")
    xdisk = xdisk_bin()
    size = int(sh(["numfmt", "--from=iec", a.size.upper().rstrip("B")]).strip())
    work = tempfile.mkdtemp(prefix="xdisk-convert-bench-", dir=a.dir)
    try:
        print(f"# preparing a {a.size} source with {a.data:.0%} data (raw, qcow2, and a 2-layer chain) in {work}")
        raw, qcow, top = make_sources(work, size, a.data)
        out = os.path.join(work, "out")
        data_bytes = int(size * a.data) >> 20 << 20
        floors = [copy_floor(qcow, out, data_bytes) for _ in range(a.rounds)]
        floor = statistics.median(floors)
        print(f"\ncopy floor: fio reads and writes the {data_bytes >> 20} MiB of data at once: "
              f"{floor:.2f} s (median of {a.rounds}; {data_bytes / floor / 1e6:.0f} MB/s each way)")
        table = []
        cases = [
            ("qcow2 -> raw", "qcow2", qcow, "raw", []),
            ("raw -> qcow2", "raw", raw, "qcow2", []),
            ("chain -> qcow2", "qcow2", top, "qcow2", []),
            ("qcow2 -> qcow2 -c zstd", "qcow2", qcow, "qcow2", ["-c", "-o", "compression_type=zstd"]),
            ("qcow2 -> qcow2 -c zlib", "qcow2", qcow, "qcow2", ["-c", "-o", "compression_type=zlib"]),
        ]
        for name, f, src, of, extra in cases:
            if a.only and a.only not in name:
                continue
            tools = [
                ("qemu-img", ["qemu-img", "convert", "-m", "16", "-W", "-t", "none", "-T", "none",
                              "-f", f, "-O", of] + extra + [src, out]),
                ("xdisk", [xdisk, "img", "convert", "-t", "none", "-T", "none",
                           "-f", f, "-O", of] + extra + [src, out]),
            ]

            def measure(cmd):
                if os.path.exists(out):
                    os.unlink(out)
                r = timed(cmd)
                os.sync()
                return r

            per = alternating(tools, a.rounds, measure)
            wall = {k: statistics.median(w for w, _ in v) for k, v in per.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in per.items()}
            print(f"\n{name} (median of {a.rounds})")
            for k in wall:
                print(f"  {k:9s} {wall[k]:7.2f} s wall  {cpu[k]:7.2f} s CPU")
            print(f"  ratio xdisk/qemu-img wall = {wall['xdisk'] / wall['qemu-img']:.2f}"
                  f"  (CPU {cpu['xdisk'] / cpu['qemu-img']:.2f});"
                  f"  floor/xdisk = {floor / wall['xdisk']:.2f}, floor/qemu-img = {floor / wall['qemu-img']:.2f}")
            table.append((name, wall, cpu))
            sys.stdout.flush()
            # The outputs agree with the source.
            sh(["qemu-img", "compare", "-f", f, "-F", of, src, out])
        if a.markdown:
            print(f"\n| conversion ({a.size}, {a.data:.0%} data) | qemu-img wall (CPU) | xdisk wall (CPU) "
                  f"| xdisk / qemu-img wall (CPU) | copy floor {floor:.2f} s / xdisk |")
            print("|---|---|---|---|---|")
            for name, wall, cpu in table:
                print(f"| {name} | {wall['qemu-img']:.2f} s ({cpu['qemu-img']:.2f} s) | "
                      f"{wall['xdisk']:.2f} s ({cpu['xdisk']:.2f} s) | "
                      f"{wall['xdisk'] / wall['qemu-img']:.2f} ({cpu['xdisk'] / cpu['qemu-img']:.2f}) | "
                      f"{floor / wall['xdisk']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"# total {time.time() - t0:.0f} s")
