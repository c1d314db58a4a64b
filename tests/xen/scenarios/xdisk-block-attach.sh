#!/bin/sh
# Scenario 2 of the Xen lab: xdisk serve in the place of dom0's qdisk QEMU. libxl's own
# `xl block-attach 0 'format=qcow2,...,backendtype=qdisk,...'` writes backend/qdisk/0/<devid>,
# `xdisk serve` (started with dist/systemd/xdisk.service's ExecStart line) serves it, dom0's
# xen-blkfront connects; data goes through; `xl block-list` shows it; `xl block-detach` tears it
# down (nothing left in xenstore); qemu-img check is clean; then a raw disk read-only, which
# refuses writes. xdisk registers as dom0's device model (image/device-model-pid), without which
# libxl refuses the block-attach, and removes the registration when it stops.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
qcow=$LAB_DATA/ba.qcow2
ro=$LAB_DATA/ba-ro.raw
command -v qemu-img >/dev/null || fail "no qemu-img in dom0 (the oracle)"
rm -f "$qcow" "$ro"
qemu-img create -q -f qcow2 "$qcow" 48M || fail "qemu-img create"
dd if=/dev/urandom of="$ro" bs=1M count=2 2>/dev/null
dd if=/dev/zero of="$ro" bs=1M seek=16 count=0 2>/dev/null

# The daemon runs exactly as dist/systemd/xdisk.service starts it (its ExecStart line).
cmd=$(sed -n 's|^ExecStart=/usr/bin/xdisk ||p' /lab/dist/systemd/xdisk.service)
case $cmd in serve\ *--control\ "$sock"*) ;; *) fail "unexpected ExecStart in xdisk.service: $cmd" ;; esac
echo "xdisk $cmd"
mkdir -p /run/xdisk && chmod 0700 /run/xdisk # RuntimeDirectory=xdisk
# shellcheck disable=SC2086 # the unit's arguments, split as systemd does (no quoting there)
XDISK_LOG=info xdisk $cmd > /tmp/serve.log 2>&1 &
pid=$!
stop() { kill "$pid" 2>/dev/null; }
trap stop EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"
# libxl hot-plugs a qdisk disk of dom0 only if dom0 has a device model (libxl__dm_active):
# xdisk registers itself as such.
dmpid=/local/domain/0/image/device-model-pid
check "xdisk registered as dom0's device model" test "$(xenstore-read $dmpid)" = "$pid"

# block_attach SPEC VDEV: xl block-attach 0, then waits for /dev/VDEV.
block_attach() {
  xl -v block-attach 0 "$1" > /tmp/xl-attach.log 2>&1 ||
    fail "xl block-attach 0 '$1': $(tail -3 /tmp/xl-attach.log | tr '\n' ' ') / $(tail -3 /tmp/serve.log | tr '\n' ' ')"
  wait_for 30 test -b "/dev/$2" || fail "no /dev/$2 after xl block-attach: $(tail -3 /tmp/serve.log)"
}

block_attach "format=qcow2,vdev=xvdb,access=rw,backendtype=qdisk,target=$qcow" xvdb
xl block-list 0 | tee /tmp/block-list
check "xl block-list shows the disk" grep -q '^51728 ' /tmp/block-list
be=/local/domain/0/backend/qdisk/0/51728
check "libxl wrote the backend nodes" test "$(xenstore-read $be/params)" = "qcow2:$qcow"
check "xdisk reported hotplug-status" test "$(xenstore-read $be/hotplug-status)" = connected
check "backend connected" test "$(xenstore-read $be/state)" = 4
check "the size is the image's" test "$(blockdev --getsize64 /dev/xvdb)" = 50331648

dd if=/dev/urandom of=/tmp/pat bs=1M count=3 2>/dev/null
dd if=/tmp/pat of=/dev/xvdb bs=1M seek=5 conv=fsync 2>/dev/null || fail "writing /dev/xvdb"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/xvdb of=/tmp/back bs=1M skip=5 count=3 2>/dev/null || fail "reading /dev/xvdb"
check "data read back through /dev/xvdb" cmp /tmp/pat /tmp/back
xdisk stat --control "$sock"

xl -v block-detach 0 xvdb > /tmp/xl-detach.log 2>&1 || fail "xl block-detach: $(tail -3 /tmp/xl-detach.log)"
wait_for 20 sh -c '! test -b /dev/xvdb' || fail "/dev/xvdb still there after block-detach"
wait_for 20 sh -c "! xenstore-exists $be" || fail "backend nodes left after block-detach"
check "no frontend nodes left" sh -c "! xenstore-exists /local/domain/0/device/vbd/51728"
qemu-img check "$qcow" || fail "qemu-img check: not clean after block-detach"
qemu-img convert -O raw "$qcow" /tmp/host.raw || fail "qemu-img convert"
dd if=/tmp/host.raw of=/tmp/img bs=1M skip=5 count=3 2>/dev/null
check "the data is in the image" cmp /tmp/pat /tmp/img

# A read-only raw disk.
block_attach "format=raw,vdev=xvdc,access=ro,backendtype=qdisk,target=$ro" xvdc
check "xvdc is read-only" test "$(blockdev --getro /dev/xvdc)" = 1
dd if=/dev/xvdc of=/tmp/back bs=1M count=2 2>/dev/null
dd if="$ro" of=/tmp/want bs=1M count=2 2>/dev/null
check "read-only disk reads the image" cmp /tmp/want /tmp/back
if dd if=/tmp/pat of=/dev/xvdc bs=1M count=1 oflag=direct 2>/dev/null; then
  fail "a write to the read-only disk succeeded"
fi
check "the read-only image is unchanged" sh -c "dd if='$ro' bs=1M count=2 2>/dev/null | cmp - /tmp/want"
xl -v block-detach 0 xvdc > /tmp/xl-detach.log 2>&1 || fail "xl block-detach xvdc: $(tail -3 /tmp/xl-detach.log)"
wait_for 20 sh -c "! xenstore-exists /local/domain/0/backend/qdisk/0/51744" || fail "xvdc nodes left"

trap - EXIT
stop_daemon "$pid" /tmp/serve.log
check "the device-model registration is gone" sh -c "! xenstore-exists $dmpid"
