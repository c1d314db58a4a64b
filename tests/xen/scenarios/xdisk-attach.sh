#!/bin/sh
# xdisk serve as dom0's disk backend: `xdisk attach` a raw and a qcow2 image (O_DIRECT) to dom0,
# dom0's own xen-blkfront connects, data goes through /dev/xvdX into the images, `xdisk stat`
# counts it, `xdisk detach` leaves nothing in xenstore, the daemon stops on SIGTERM.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
raw=$LAB_DATA/attach.raw
qcow=$LAB_DATA/attach.qcow2
dd if=/dev/zero of="$raw" bs=1M count=0 seek=64 2>/dev/null || fail "creating $raw"
xdisk img create -f qcow2 "$qcow" 64M > /dev/null || fail "xdisk img create"

XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/serve.log 2>&1 &
pid=$!
stop() { kill "$pid" 2>/dev/null; }
trap stop EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"

dev=$(xdisk attach "$raw" --format raw --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "attach raw: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
echo "raw image attached as $dev"
check "$dev is a block device" test -b "$dev"
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of="$dev" bs=1M conv=fsync 2>/dev/null || fail "writing $dev"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/back bs=1M count=4 2>/dev/null || fail "reading $dev"
check "data read back through $dev" cmp /tmp/pat /tmp/back
dd if="$raw" of=/tmp/img bs=1M count=4 2>/dev/null
check "data landed in the raw image" cmp /tmp/pat /tmp/img

# O_DIRECT (direct-io-safe=1) on the ext4 data disk, format probed.
dev2=$(xdisk attach "$qcow" --direct-io --control "$sock" --timeout 60 2>/tmp/attach2.err) ||
  fail "attach qcow2: $(cat /tmp/attach2.err) / $(tail -3 /tmp/serve.log)"
echo "qcow2 image attached as $dev2"
check "a second device name" test "$dev2" != "$dev"
dd if=/tmp/pat of="$dev2" bs=1M seek=8 conv=fsync 2>/dev/null || fail "writing $dev2"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev2" of=/tmp/back2 bs=1M skip=8 count=4 2>/dev/null || fail "reading $dev2"
check "data read back through $dev2" cmp /tmp/pat /tmp/back2

xdisk stat --control "$sock"
xdisk stat --json --control "$sock" > /tmp/stat.json || fail "xdisk stat --json"
check "stat counts writes" grep -q '"wr_req": [1-9]' /tmp/stat.json
check "stat counts flushes" grep -q '"f_req": [1-9]' /tmp/stat.json
check "the qcow2 image runs with O_DIRECT" grep -q '"cache": "none"' /tmp/stat.json
check "the probed format is qcow2" grep -q '"format": "qcow2"' /tmp/stat.json
check "no request failed" sh -c "! grep -q '\"errors\": [1-9]' /tmp/stat.json"
check "blkfront saw no failed operation" sh -c "! dmesg | grep -q 'op failed'"

for d in "$dev" "$dev2"; do
  xdisk detach "$d" --control "$sock" || fail "detach $d: $(tail -3 /tmp/serve.log)"
done
wait_for 10 sh -c "! test -b $dev && ! test -b $dev2" || fail "device nodes still there"
check "no backend nodes left" sh -c "! xenstore-exists /local/domain/0/backend/xdisk"
check "no frontend nodes left" sh -c "! xenstore-ls /local/domain/0/device/vbd 2>/dev/null | grep -q ."
xdisk img check "$qcow" || fail "qcow2 image not clean after detach"

trap - EXIT
kill -TERM "$pid"
wait "$pid"
rc=$?
tail -20 /tmp/serve.log
[ $rc = 0 ] || fail "xdisk serve exited with $rc"
