#!/bin/sh
# Issue #4, scenario 4: the same workload on dom0's /dev/xvdX served by three backends, each
# over a raw image on the ext4 data disk, each with O_DIRECT on the image:
#   xdisk    xdisk serve + xdisk attach --direct-io           (backend/xdisk/0/*)
#   blkback  the kernel's blkback, phy on a loop device with direct I/O (xl block-attach 0)
#   qdisk    Debian's qemu-system-xen as dom0's disk backend, the disk a xen-disk device with
#            O_DIRECT and aio=threads (see below why not direct-io-safe through xenstore)
#   file     no Xen device: fio in dom0 on an image file of its own (O_DIRECT), the anchor:
#            what the storage gives one fio process in dom0 (not a ceiling at 4k QD32, where
#            a device splits the work between fio's vCPU and the backend's)
# Workload (issue #12's rows): fio libaio direct=1, a few seconds each, on every backend:
#   4k randread and randwrite at QD1 and QD32, 64k randread QD16, 1M sequential read and write
#   QD8. The backends take turns row by row (file xdisk blkback qdisk, then qdisk blkback xdisk
#   file for the next row, the other way round in the next round), so the runs a ratio compares are
#   seconds apart: the lab's speed drifts by up to 1.7x within a minute under TCG (one
#   backend's 4k QD32 rounds 2,530 and 1,475 IOPS in one run), and with every row of a backend
#   run before the next backend's a ratio compared runs a minute apart (rr64k16 0.63 in one CI
#   run, 1.01 in the next quiet one). Prints per-backend IOPS and latency for every row, then
#   per row the median over the rounds of xdisk's IOPS divided by the other backend's in the
#   same round:
#   compare: read xdisk/blkback=R xdisk/qdisk=R write xdisk/blkback=R xdisk/qdisk=R  (4k QD32)
#   compare-seq: read xdisk/blkback=R xdisk/qdisk=R write xdisk/blkback=R xdisk/qdisk=R  (1M QD8)
#   compare-row: ROW xdisk/blkback=R xdisk/qdisk=R xdisk/file=R blkback/file=R qdisk/file=R
#   (one per row; X/file is the share of the storage's own speed that the device delivers)
# Passes when all four ran the workload without errors and a
# write + read-back through each device (and from its image file) matched; the ratios are
# reported, not asserted. Everything is detached, QEMU and the daemon stopped, at the end.
# lab-needs: fio losetup qemu-xen
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh

ROUNDS=4        # each round runs every row on every backend once
RUNTIME=2       # seconds of fio per workload and backend (after RAMP)
RAMP=500ms
SIZE_MB=64      # each image
VDEV_BB=xvdm    # blkback's and qdisk's device names (xdisk attach takes the first free one);
VDEV_QD=xvdn    # below xvdq, whose numbers take Linux's extended format
QEMU=/usr/libexec/xen-qemu-system-i386
LOSETUP=/usr/local/bin/losetup  # util-linux's (--direct-io); busybox sh would run its own applet

sock=/run/xdisk/cmp.sock
img_x=$LAB_DATA/cmp-xdisk.raw
img_b=$LAB_DATA/cmp-blkback.raw
img_q=$LAB_DATA/cmp-qdisk.raw
img_f=$LAB_DATA/cmp-file.raw
serve_pid='' xdev='' loopdev='' qemu_pid='' dm_registered=''

command -v fio >/dev/null || fail "no fio in dom0 (tests/xen/lib/initramfs.sh adds it for '# lab-needs: fio')"
[ -x "$QEMU" ] || fail "no $QEMU in dom0 (qemu-system-xen could not be downloaded on the host?)"
"$LOSETUP" --help 2>&1 | grep -q direct-io || fail "no util-linux losetup with --direct-io in dom0"

# Best effort, bounded: whatever is still attached or running when the script ends.
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  [ -n "$xdev" ] && timeout 20 xdisk detach "$xdev" --force --control "$sock" >/dev/null 2>&1
  xenstore-exists "/local/domain/0/device/vbd/$(devid "$VDEV_BB")" 2>/dev/null &&
    timeout 30 xl block-detach 0 "$VDEV_BB" >/dev/null 2>&1
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
  [ -n "$dm_registered" ] && xenstore-rm /local/domain/0/image/device-model-pid 2>/dev/null
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
  [ -n "$loopdev" ] && "$LOSETUP" -d "$loopdev" 2>/dev/null
}
trap cleanup EXIT

# devid xvdX: the device number Linux and libxl use for xvdX (one letter, below xvdq).
# shellcheck disable=SC2317 # used by cleanup
devid() {
  awk -v l="${1#xvd}" 'BEGIN { print 202 * 256 + (index("abcdefghijklmnopqrstuvwxyz", l) - 1) * 16 }'
}

# --- images: the same size, fully written (no holes, no unwritten extents) --------------------
t0=$(up)
rm -f "$img_x" "$img_b" "$img_q" "$img_f"
for f in "$img_x" "$img_b" "$img_q" "$img_f"; do
  dd if=/dev/zero of="$f" bs=4M count=$((SIZE_MB / 4)) oflag=direct 2>/dev/null || fail "creating $f"
done
echo "images: 4 x $SIZE_MB MiB raw on $LAB_DATA in $(secs_since "$t0")s"

# --- (a) xdisk -------------------------------------------------------------------------------
t1=$(up)
XDISK_LOG=warn xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/cmp-serve.log 2>&1 &
serve_pid=$!
wait_for 15 test -S "$sock" || fail "xdisk serve: no control socket after 15 s: $(tail -3 /tmp/cmp-serve.log)"
xdev=$(xdisk attach "$img_x" --format raw --direct-io --control "$sock" --timeout 60 2>/tmp/cmp-attach.err) ||
  fail "xdisk attach: $(cat /tmp/cmp-attach.err) / $(tail -3 /tmp/cmp-serve.log)"
xdev=${xdev#/dev/}
test -b "/dev/$xdev" || fail "xdisk attach printed $xdev, which is no block device"
echo "xdisk: /dev/$xdev attached in $(secs_since "$t1")s"

# --- (b) QEMU's qdisk -------------------------------------------------------------------------
# Debian's /etc/init.d/xen starts dom0's disk backend with the options below. A disk given to
# it through xenstore with direct-io-safe (xl block-attach 0 '...,backendtype=qdisk,
# direct-io-safe,...') makes QEMU open the image with cache.direct=on,aio=native, and Debian's
# qemu-system-xen 7.2 is built without Linux AIO: "aio=native was specified, but is not
# supported in this build", and the frontend waits forever. Without direct-io-safe QEMU would
# serve the image through dom0's page cache, which is not this comparison. So the disk is given
# on QEMU's command line: the same xen-block device (xen-disk) with O_DIRECT and QEMU's thread
# pool (aio=threads); QEMU writes the xenstore nodes itself and removes them when it exits.
t1=$(up)
"$QEMU" -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv -daemonize \
  -monitor /dev/null -serial /dev/null -parallel /dev/null -nodefaults -no-user-config \
  -pidfile /run/qemu-dom0.pid -D /tmp/qemu-dom0.log \
  -drive "if=none,id=cmpq,file=$img_q,format=raw,cache.direct=on,aio=threads" \
  -device "xen-disk,vdev=$VDEV_QD,drive=cmpq" > /tmp/qemu-dom0.out 2>&1 < /dev/null ||
  fail "qemu-system-xen did not start: $(cat /tmp/qemu-dom0.out /tmp/qemu-dom0.log 2>/dev/null | tail -2 | tr '\n' ' ')"
qemu_pid=$(cat /run/qemu-dom0.pid 2>/dev/null)
kill -0 "$qemu_pid" 2>/dev/null || fail "qemu-system-xen is not running after -daemonize: $(tail -2 /tmp/qemu-dom0.log)"
wait_for 30 test -b /dev/$VDEV_QD ||
  fail "qdisk: no /dev/$VDEV_QD 30 s after starting QEMU: $(tail -2 /tmp/qemu-dom0.log)"
echo "qdisk: /dev/$VDEV_QD attached in $(secs_since "$t1")s (QEMU started)"
# Dom0's QEMU is dom0's device model. libxl adds a disk to dom0 (any type) only if dom0 has a
# registered device model (image/device-model-pid of a live process) whenever dom0's stored
# config (/var/lib/xen/userdata-d.0.*.libxl-json) has a qdisk disk, and `xl block-detach 0`
# leaves the disks it detached in that config: after one `xl block-attach 0 ...backendtype=qdisk`
# (e.g. scenario xdisk-block-attach), every later `xl block-attach 0`, phy too, fails with
# "device model required but not running". libxl records the pid for the QEMUs it spawns;
# here the script does it for the one it started (unless a live one is registered).
dm_node=/local/domain/0/image/device-model-pid
dm_old=$(xenstore-read $dm_node 2>/dev/null)
if [ -z "$dm_old" ] || ! kill -0 "$dm_old" 2>/dev/null; then
  xenstore-write $dm_node "$qemu_pid" || fail "xenstore-write $dm_node"
  dm_registered=1
fi

# --- (c) blkback on a loop device with direct I/O ----------------------------------------------
# (libxl's hotplug script, /etc/xen/scripts/block, needs /dev/stdin: dom0/init makes it.)
t1=$(up)
loopdev=$("$LOSETUP" --direct-io=on --show -f "$img_b" 2>/tmp/cmp-losetup.err) ||
  fail "losetup --direct-io=on $img_b: $(cat /tmp/cmp-losetup.err)"
loop_dio=$(cat "/sys/block/${loopdev#/dev/}/loop/dio" 2>/dev/null)
[ "$loop_dio" = 1 ] || echo "warning: $loopdev runs without direct I/O (loop/dio=$loop_dio)"
if ! timeout 60 xl -vvv block-attach 0 "format=raw,vdev=$VDEV_BB,access=rw,backendtype=phy,target=$loopdev" \
  > /tmp/cmp-xl-bb.log 2>&1; then
  grep -v 'debug:' /tmp/cmp-xl-bb.log | tail -20
  tail -20 /var/log/xen/xen-hotplug.log 2>/dev/null
  echo "--- xl block-list 0; dom0's stored libxl config:"
  xl block-list 0
  cat /var/lib/xen/userdata-d.0.*libxl-json 2>/dev/null | head -60
  fail "xl block-attach 0 (phy $loopdev): $(grep error /tmp/cmp-xl-bb.log | tail -2 | tr '\n' ' ')"
fi
wait_for 30 test -b /dev/$VDEV_BB || fail "blkback: no /dev/$VDEV_BB 30 s after xl block-attach"
echo "blkback: /dev/$VDEV_BB attached in $(secs_since "$t1")s"

dev_of() { case $1 in xdisk) echo "$xdev" ;; blkback) echo $VDEV_BB ;; qdisk) echo $VDEV_QD ;; esac; }
# path_of BACKEND: what fio opens for it.
path_of() { case $1 in file) echo "$img_f" ;; *) echo "/dev/$(dev_of "$1")" ;; esac; }
img_of() { case $1 in xdisk) echo "$img_x" ;; blkback) echo "$img_b" ;; qdisk) echo "$img_q" ;; esac; }
for b in xdisk blkback qdisk; do
  d=$(dev_of $b)
  q=/sys/block/$d/queue
  echo "$b: /dev/$d $(($(cat "/sys/block/$d/size") / 2048)) MiB, hardware queues $(find "/sys/block/$d/mq/" -mindepth 1 -maxdepth 1 | wc -l)," \
    "max_segments $(cat "$q/max_segments"), max_sectors_kb $(cat "$q/max_sectors_kb")"
done
echo "images: xdisk cache=none (O_DIRECT, io_uring), blkback $loopdev dio=$loop_dio," \
  "qdisk cache.direct=on,aio=threads; setup took $(secs_since "$t0")s"

# --- the workload --------------------------------------------------------------------------
# ROW:RW:BS:IODEPTH, in the order they run (the first two rows make the compare: line).
ROWS="rr4k32:randread:4k:32 rw4k32:randwrite:4k:32 rr4k1:randread:4k:1 rw4k1:randwrite:4k:1 rr64k16:randread:64k:16 sr1m8:read:1M:8 sw1m8:write:1M:8"
# run_round ROUND: one fio run (its start costs seconds under TCG) with a job per row and
# backend, one after the other (stonewall): row by row, the four back to back, in an order
# that reverses every row and every round (xdisk always between the file and blkback, its two
# anchors); appends "BACKEND ROW ROUND IOPS LAT_US" to /tmp/cmp.res.
: > /tmp/cmp.res
run_round() {
  local r=$1 b row name rest rw bs qd jobs='' n=0 i=0 bad order
  for row in $ROWS; do
    name=${row%%:*} rest=${row#*:}
    rw=${rest%%:*} rest=${rest#*:}
    bs=${rest%%:*} qd=${rest#*:}
    if [ $(((i + r) % 2)) = 1 ]; then order="file xdisk blkback qdisk"; else order="qdisk blkback xdisk file"; fi
    for b in $order; do
      jobs="$jobs --name=$b:$name:$rw --filename=$(path_of "$b") --rw=$rw --bs=$bs --iodepth=$qd --stonewall"
      n=$((n + 1))
    done
    i=$((i + 1))
  done
  # shellcheck disable=SC2086 # $jobs is a list of options
  timeout $((n * (RUNTIME + 6) + 30)) fio --ioengine=libaio --direct=1 \
    --time_based --runtime=$RUNTIME --ramp_time=$RAMP --norandommap --randrepeat=0 --minimal $jobs \
    > /tmp/cmp-fio.out 2>/tmp/cmp-fio.err
  [ "$(grep -c '^3;' /tmp/cmp-fio.out)" = $n ] ||
    fail "fio (round $r): $(grep -c '^3;' /tmp/cmp-fio.out) results of $n: $(tail -2 /tmp/cmp-fio.err | tr '\n' ' ')"
  bad=$(awk -F';' '/^3;/ && $5 != 0 { printf " %s (error %s)", $3, $5 }' /tmp/cmp-fio.out)
  [ -z "$bad" ] || fail "fio (round $r) failed:$bad: $(tail -2 /tmp/cmp-fio.err | tr '\n' ' ')"
  # Terse v3: 3 job name, 8 read IOPS, 40 read latency mean (us), 49 write IOPS, 81 write latency.
  awk -F';' -v r="$r" '/^3;/ {
      split($3, j, ":")
      if (j[3] ~ /read/) { iops = $8; lat = $40 } else { iops = $49; lat = $81 }
      print j[1], j[2], r, iops, lat }' /tmp/cmp-fio.out > /tmp/cmp-round.res
  awk '{ printf "round %s %s %s: %d IOPS, mean latency %d us\n", $3, $1, $2, $4, $5 }' /tmp/cmp-round.res
  bad=$(awk '$4 <= 0 { printf " %s:%s", $1, $2 }' /tmp/cmp-round.res)
  [ -z "$bad" ] || fail "fio (round $r): no I/O done by$bad"
  cat /tmp/cmp-round.res >> /tmp/cmp.res
}

t0=$(up)
r=1
while [ $r -le $ROUNDS ]; do
  run_round $r
  r=$((r + 1))
done
echo "workload: $ROUNDS rounds in $(secs_since "$t0")s"

# --- data check: a write through each device reads back, and is in its image file ----------
dd if=/dev/urandom of=/tmp/cmp-pat bs=1M count=1 2>/dev/null
for b in xdisk blkback qdisk; do
  d=$(dev_of $b)
  dd if=/tmp/cmp-pat of=/dev/"$d" bs=1M seek=5 conv=fsync 2>/dev/null || fail "$b: writing /dev/$d"
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/"$d" of=/tmp/cmp-back bs=1M skip=5 count=1 2>/dev/null || fail "$b: reading /dev/$d"
  cmp -s /tmp/cmp-pat /tmp/cmp-back || fail "$b: data read back through /dev/$d differs"
  dd if="$(img_of $b)" of=/tmp/cmp-back bs=1M skip=5 count=1 2>/dev/null || fail "$b: reading its image"
  cmp -s /tmp/cmp-pat /tmp/cmp-back || fail "$b: the data written through /dev/$d is not in $(img_of $b)"
  echo "ok: $b: 1 MiB written through /dev/$d reads back, and is in its image"
done
check "blkfront saw no failed operation" sh -c "! dmesg | grep -q 'op failed'"
xdisk stat --control "$sock" | head -5

# --- figures (report: tests/xen/run --show prints them) ----------------------------------------
report "fio libaio direct=1, ${RUNTIME}s each after ${RAMP}, $ROUNDS rounds, backends back to back per row" \
  "(order alternating), raw images with O_DIRECT on ext4; mean IOPS (1M rows: MiB/s), mean latency;" \
  "ratios: the median over the rounds of one's IOPS / the other's in the same round" \
  "(file: fio on an image file in dom0, no Xen device: the storage's own speed):"
awk -v rows="$ROWS" -v rounds="$ROUNDS" '
  # median of the n values v[1..n] (sorted here; n is small)
  function median(v, n,   i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  # ratio(ONE, ROW, OTHER): the median of the per-round ratios ONE/OTHER; list[ONE "/" OTHER]
  # gets them all
  function ratio(one, row, other,   r, n, v, b, k) {
    n = 0; k = one "/" other; list[k] = ""
    for (r = 1; r <= rounds; r++)
      if (((b = one " " row " " r) in io) && io["" other " " row " " r] > 0) {
        v[++n] = io[b] / io[other " " row " " r]
        list[k] = list[k] sprintf(" %.2f", v[n])
      }
    return n ? median(v, n) : 0
  }
  { k = $1 " " $2; n[k]++; iops[k] += $4; lat[k] += $5; all[k] = all[k] " " $4; io[$1 " " $2 " " $3] = $4 }
  END {
    nr = split(rows, rl, " ")
    for (r = 1; r <= nr; r++) {
      split(rl[r], f, ":"); row = f[1]
      for (i = 1; i <= 4; i++) {
        b = i == 1 ? "xdisk" : i == 2 ? "blkback" : i == 3 ? "qdisk" : "file"; k = b " " row
        if (n[k] == 0) continue
        printf "%-8s %-8s %-13s QD%-3s %8.0f IOPS %7.0f us (rounds:%s)\n", b, row, f[2] " " f[3], f[4], iops[k] / n[k], lat[k] / n[k], all[k]
      }
    }
    for (r = 1; r <= nr; r++) {
      split(rl[r], f, ":"); row = f[1]
      xb[row] = ratio("xdisk", row, "blkback"); xq[row] = ratio("xdisk", row, "qdisk")
      xf = ratio("xdisk", row, "file"); bf = ratio("blkback", row, "file"); qf = ratio("qdisk", row, "file")
      if (xb[row] > 0 && xq[row] > 0)
        printf "compare-row: %s xdisk/blkback=%.2f xdisk/qdisk=%.2f xdisk/file=%.2f blkback/file=%.2f qdisk/file=%.2f (rounds: xdisk/blkback%s; xdisk/qdisk%s; xdisk/file%s)\n",
          row, xb[row], xq[row], xf, bf, qf, list["xdisk/blkback"], list["xdisk/qdisk"], list["xdisk/file"]
    }
    printf "compare: read xdisk/blkback=%.2f xdisk/qdisk=%.2f write xdisk/blkback=%.2f xdisk/qdisk=%.2f\n",
      xb["rr4k32"], xq["rr4k32"], xb["rw4k32"], xq["rw4k32"]
    printf "compare-seq: read xdisk/blkback=%.2f xdisk/qdisk=%.2f write xdisk/blkback=%.2f xdisk/qdisk=%.2f\n",
      xb["sr1m8"], xq["sr1m8"], xb["sw1m8"], xq["sw1m8"]
  }' /tmp/cmp.res > /tmp/cmp-figures
while IFS= read -r l; do report "$l"; done < /tmp/cmp-figures
for l in compare compare-seq; do
  grep -q "^$l: read xdisk/blkback=[0-9.]* xdisk/qdisk=[0-9.]* write xdisk/blkback=[0-9.]* xdisk/qdisk=[0-9.]*\$" \
    /tmp/cmp-figures || fail "no complete $l: line (a backend without figures?)"
done
[ "$(grep -c '^compare-row: ' /tmp/cmp-figures)" = 7 ] || fail "not every row has a compare-row: line"

# --- teardown --------------------------------------------------------------------------------
xdisk detach "$xdev" --control "$sock" > /tmp/cmp-detach.log 2>&1 ||
  fail "xdisk detach $xdev: $(tail -2 /tmp/cmp-detach.log) / $(tail -2 /tmp/cmp-serve.log)"
xname=$xdev xdev=''
timeout 60 xl block-detach 0 $VDEV_BB > /tmp/cmp-xl-detach.log 2>&1 ||
  fail "xl block-detach 0 $VDEV_BB: $(tail -2 /tmp/cmp-xl-detach.log | tr '\n' ' ')"
kill "$qemu_pid"
wait_for 15 sh -c "! kill -0 $qemu_pid 2>/dev/null" || fail "qemu-system-xen (pid $qemu_pid) still runs 15 s after SIGTERM"
qemu_pid=''
if [ -n "$dm_registered" ]; then
  xenstore-rm $dm_node || fail "xenstore-rm $dm_node"
  dm_registered=''
fi
wait_for 15 sh -c "! test -b /dev/$xname && ! test -b /dev/$VDEV_BB && ! test -b /dev/$VDEV_QD" ||
  fail "device nodes still there 15 s after the detaches (and QEMU's exit)"
kill -TERM "$serve_pid"
wait "$serve_pid"
rc=$?
serve_pid=''
[ $rc = 0 ] || fail "xdisk serve exited with $rc: $(tail -3 /tmp/cmp-serve.log)"
"$LOSETUP" -d "$loopdev" || fail "losetup -d $loopdev"
loopdev=''
for t in xdisk vbd qdisk; do
  check "no backend/$t nodes left for dom0" sh -c "! xenstore-ls /local/domain/0/backend/$t/0 2>/dev/null | grep -q ."
done
check "no frontend nodes left" sh -c "! xenstore-ls /local/domain/0/device/vbd 2>/dev/null | grep -q ."
rm -f "$img_x" "$img_b" "$img_q" "$img_f"
trap - EXIT
exit 0
