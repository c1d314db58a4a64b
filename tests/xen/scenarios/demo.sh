#!/bin/sh
# The README's demo (scripts/demo runs `tests/xen/run --show demo`): in dom0 of a real Xen, a
# qcow2 image is attached through xdisk (`xdisk serve` + `xdisk attach`) and shows up as a
# /dev/xvdX of dom0's own xen-blkfront: its size, a read of it (identical to qemu-img's view
# of the image), xdisk's counters, and read speed (fio: 4k random, 1M sequential) against the
# kernel's blkback serving the same data from a loop device. Lines for the user start with "| " (report).
# lab-needs: fio losetup
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
img=$LAB_DATA/demo.qcow2
raw=$LAB_DATA/demo.raw
MiB=1048576
SIZE_MB=${DEMO_SIZE_MB:-64}
ROUNDS=${DEMO_ROUNDS:-3}
command -v qemu-img >/dev/null || fail "no qemu-img in dom0"

report "Xen $(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor), dom0 Linux $(uname -r) (booted inside QEMU, TCG: absolute speeds are low, ratios are the point)"
# The image: a text line, then random data, in a qcow2 file.
{
  echo "Hello from a qcow2 image, read through xdisk by dom0's xen-blkfront."
  head -c $((SIZE_MB * MiB - 4096)) /dev/urandom
} > /tmp/src.raw 2>/dev/null
dd if=/dev/zero of=/tmp/src.raw bs=1M count=0 seek="$SIZE_MB" 2>/dev/null
rm -f "$img" "$raw"
qemu-img convert -f raw -O qcow2 /tmp/src.raw "$img" || fail "qemu-img convert"
cp /tmp/src.raw "$raw"
report "image: $img, $(qemu-img info "$img" | sed -n 's/^file format: //p'), virtual size $SIZE_MB MiB"

XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/serve.log 2>&1 &
pid=$!
loop=
cleanup() {
  kill "$pid" 2>/dev/null
  [ -n "$loop" ] && "$LOSETUP" -d "$loop" 2>/dev/null
}
trap cleanup EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"

t0=$(up)
dev=$(xdisk attach "$img" --direct-io --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "xdisk attach: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
report ""
report "\$ xdisk attach $img --direct-io"
report "$dev    (connected in $(secs_since "$t0") s)"
size=$(blockdev --getsize64 "$dev")
report "$dev: $size bytes ($((size / MiB)) MiB), logical block $(blockdev --getss "$dev") bytes, read-only $(blockdev --getro "$dev")"
report "\$ head -1 $dev"
report "$(head -1 "$dev")"
dev_md5=$(dd if="$dev" bs=1M 2>/dev/null | md5sum | cut -d' ' -f1)
img_md5=$(qemu-img convert -O raw "$img" /tmp/view.raw && md5sum < /tmp/view.raw | cut -d' ' -f1)
report "md5 of $dev: $dev_md5; of the image as qemu-img reads it: $img_md5"
[ "$dev_md5" = "$img_md5" ] || fail "$dev differs from the image"

# blkback, the kernel's backend, on a loop device (O_DIRECT) over a raw copy of the same data,
# attached to dom0 with the nodes libxl writes for a phy disk.
LOSETUP=/usr/local/bin/losetup # util-linux's (--direct-io); busybox sh would run its own applet
loop=$("$LOSETUP" --direct-io=on --show -f "$raw" 2>/tmp/losetup.err) ||
  fail "losetup --direct-io=on $raw: $(cat /tmp/losetup.err)"
[ "$(cat /sys/block/"${loop#/dev/}"/loop/dio)" = 1 ] || fail "$loop runs without direct I/O"
bdev=51904 # xvdm
B=/local/domain/0/backend/vbd/0/$bdev
F=/local/domain/0/device/vbd/$bdev
xenstore-write $B/frontend "$F" $B/frontend-id 0 $B/online 1 $B/removable 0 $B/bootable 1 \
  $B/state 1 $B/dev xvdm $B/type phy $B/mode w $B/device-type disk $B/params "$loop" \
  $B/physical-device "$(stat -L -c '%t:%T' "$loop")" \
  $F/backend "$B" $F/backend-id 0 $F/state 1 $F/virtual-device $bdev $F/device-type disk ||
  fail "writing blkback's nodes"
wait_for 30 test -b /dev/xvdm || fail "blkback's /dev/xvdm did not appear"

# fio_read DEV RW BS DEPTH: "IOPS MB/s" of fio reading DEV (libaio, O_DIRECT, 1 s ramp, 3 s).
fio_read() {
  fio --name=demo --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
    --ramp_time=1 --runtime=3 --time_based --minimal 2>/dev/null |
    awk -F';' '{ printf "%.0f %.0f", $8, $7 * 1024 / 1e6 }'
}
median() { echo "$@" | tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# xdisk serving the raw copy too (the same file blkback's loop device reads).
rdev=$(xdisk attach "$raw" --format raw --direct-io --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "xdisk attach $raw: $(cat /tmp/attach.err)"
report ""
report "read speed: fio, libaio, O_DIRECT, 3 s per run, $ROUNDS rounds in turn; median of the rounds"
report "  xdisk qcow2 = $dev, xdisk raw = $rdev, blkback = /dev/xvdm (loop device, direct I/O, on the same raw file)"
for w in "randread 4k 32 IOPS 1" "read 1M 8 MB/s 2"; do
  set -- $w
  xq= xr= bb=
  i=0
  while [ $i -lt "$ROUNDS" ]; do
    q=$(fio_read "$dev" "$1" "$2" "$3" | cut -d' ' -f"$5")
    r=$(fio_read "$rdev" "$1" "$2" "$3" | cut -d' ' -f"$5")
    b=$(fio_read /dev/xvdm "$1" "$2" "$3" | cut -d' ' -f"$5")
    xq="$xq $q"; xr="$xr $r"; bb="$bb $b"
    i=$((i + 1))
  done
  mq=$(median $xq); mr=$(median $xr); mb=$(median $bb)
  report "  $1 $2 QD$3: xdisk qcow2 $mq $4, xdisk raw $mr $4, blkback $mb $4  (rounds: xdisk qcow2$xq; raw$xr; blkback$bb)"
  report "    xdisk-raw/blkback=$(ratio "$mr" "$mb") xdisk-qcow2/blkback=$(ratio "$mq" "$mb")"
done
xdisk detach "$rdev" --control "$sock" >/dev/null || fail "xdisk detach $rdev"

report ""
report "\$ xdisk stat $dev"
xdisk stat --control "$sock" "$dev" | while IFS= read -r l; do report "$l"; done

# Tear down: blkback's nodes as libxl does (Closing, then remove), xdisk detach.
xenstore-write $B/online 0 $B/state 5
wait_for 20 sh -c "test \"\$(xenstore-read $F/state)\" = 6" ||
  fail "blkback's disk did not close: backend state $(xenstore-read $B/state), frontend state $(xenstore-read $F/state)"
xenstore-rm "$B"
xenstore-rm "$F"
wait_for 20 sh -c '! test -b /dev/xvdm' || fail "/dev/xvdm still there after its nodes went"
xdisk detach "$dev" --control "$sock" || fail "xdisk detach: $(tail -3 /tmp/serve.log)"
report ""
report "\$ xdisk detach $dev    (and blkback's disk removed)"
wait_for 10 sh -c "! test -b $dev" || fail "$dev still there after detach"
check "no backend nodes left" sh -c "! xenstore-exists /local/domain/0/backend/xdisk"
qemu-img check -q "$img" || fail "qemu-img check"
report "qemu-img check $img: clean"
trap - EXIT
cleanup
wait "$pid"
