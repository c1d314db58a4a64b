"""Helpers shared by the benchmark scripts in bench/."""

import os
import resource
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def sh_cpu(cmd, **kw):
    """Like sh(); returns (stdout, CPU seconds the child used: user + system, all threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = sh(cmd, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def xdisk_bin():
    """Builds the release xdisk binary and returns its path."""
    sh(["cargo", "build", "--release", "-q", "-p", "xdisk"], cwd=ROOT)
    return os.path.join(ROOT, "target", "release", "xdisk")


def prepare_images(size_str, raw, qcow):
    """Writes a raw file of random data and a fully allocated qcow2 copy of it, then lets
    the kernel write both back: background writeback of a GiB of dirty pages distorts the
    first measurements otherwise. Returns the size in bytes."""
    size = int(sh(["numfmt", "--from=iec", size_str.upper().rstrip("B")]).strip())
    with open(raw, "wb") as f, open("/dev/urandom", "rb") as r:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(r.read(n))
            left -= n
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
    os.sync()
    time.sleep(3)
    return size


def alternating(runs, rounds, measure):
    """Runs `measure(x)` for each (name, x) of `runs`, `rounds` times, in alternating order
    (forwards, then backwards: neither side always goes first, after a warm or a cold
    cache); returns {name: [result per round]}."""
    per = {name: [] for name, _ in runs}
    for rnd in range(rounds):
        order = runs if rnd % 2 == 0 else list(reversed(runs))
        for name, x in order:
            per[name].append(measure(x))
    return per
