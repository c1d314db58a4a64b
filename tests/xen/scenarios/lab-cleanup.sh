#!/bin/sh
# The lab's own clean-up (lab_reset in dom0/lib.sh, run by /init after every scenario) undoes
# what a failed or timed-out scenario leaves: here an `xdisk serve` with a disk attached to dom0
# and busy (a reader on /dev/xvdX), a loop device, a stale device-model registration. After
# lab_reset nothing of it is left, and the disk can be attached again (the scenarios after this
# one pass on the same dom0).
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/cleanup.sock
img=$LAB_DATA/cleanup.raw
rm -f "$img"
dd if=/dev/zero of="$img" bs=1M count=0 seek=4096 2>/dev/null || fail "creating $img"

XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/cleanup-serve.log 2>&1 &
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/cleanup-serve.log)"
dev=$(xdisk attach "$img" --format raw --control "$sock" --timeout 60 2>/tmp/cleanup-attach.err) ||
  fail "attach: $(cat /tmp/cleanup-attach.err)"
check "$dev is there" test -b "$dev"
# A reader that keeps the disk open and busy, as a scenario killed by its timeout would.
dd if="$dev" of=/dev/null bs=512 2>/dev/null &   # 4 GiB: busy for minutes
loop=$(losetup -f) && losetup "$loop" "$img" || fail "losetup"
xenstore-write /local/domain/0/image/device-model-pid 999999
usleep 500000

lab_reset > /tmp/cleanup.out 2>&1
cat /tmp/cleanup.out
check "lab_reset stopped xdisk serve" sh -c '! pidof xdisk'
check "lab_reset reported what it undid" grep -q '^cleanup: kill' /tmp/cleanup.out
check "no backend nodes left for dom0" sh -c '! xenstore-list /local/domain/0/backend/xdisk/0 2>/dev/null | grep -q .'
check "no frontend nodes left for dom0" sh -c '! xenstore-list /local/domain/0/device/vbd 2>/dev/null | grep -q .'
check "$dev is gone" sh -c "! test -b $dev"
check "the loop device is free" sh -c "! test -f /sys/block/${loop#/dev/}/loop/backing_file"
check "the device-model registration is gone" sh -c '! xenstore-exists /local/domain/0/image/device-model-pid'

# The same disk attaches again on a fresh daemon.
xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/cleanup-serve2.log 2>&1 &
pid=$!
wait_for 15 test -S "$sock" || fail "no control socket (2nd daemon): $(tail -3 /tmp/cleanup-serve2.log)"
dev=$(xdisk attach "$img" --format raw --control "$sock" --timeout 60 2>/tmp/cleanup-attach.err) ||
  fail "attach after lab_reset: $(cat /tmp/cleanup-attach.err) / $(tail -3 /tmp/cleanup-serve2.log)"
check "attached again as $dev" test -b "$dev"
xdisk detach "$dev" --control "$sock" >/dev/null || fail "detach"
stop_daemon "$pid" /tmp/cleanup-serve2.log
rm -f "$img"
