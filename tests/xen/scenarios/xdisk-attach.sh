#!/bin/sh
# Scenario 1 of the Xen lab: xdisk serve as dom0's disk backend for local attach.
# `xdisk attach` a raw image and a qcow2 image with a backing file (both on the ext4 data disk,
# the qcow2 with O_DIRECT); dom0's own xen-blkfront connects and:
#   - reads each device byte-identical to the host's view (qemu-img convert of the image);
#   - writes through it (a partial-cluster write that copies up from the backing file, whole
#     clusters, with fsync = flush), which land in the image;
#   - discards through it (blkdiscard): the raw file gets a hole, the qcow2 clusters are freed;
# `xdisk stat` counts it all, `xdisk detach` leaves nothing in xenstore, `qemu-img check` finds
# the qcow2 clean, the backing file is untouched, and the daemon stops on SIGTERM.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
raw=$LAB_DATA/attach.raw
base=$LAB_DATA/base.raw
qcow=$LAB_DATA/attach.qcow2
MiB=1048576
command -v qemu-img >/dev/null || fail "no qemu-img in dom0 (the oracle)"

# raw: 64 MiB sparse. qcow2: 32 MiB over a raw backing file with 8 MiB of random data.
rm -f "$raw" "$base" "$qcow"
dd if=/dev/zero of="$raw" bs=1M count=0 seek=64 2>/dev/null || fail "creating $raw"
dd if=/dev/urandom of="$base" bs=1M count=8 2>/dev/null || fail "creating $base"
dd if=/dev/zero of="$base" bs=1M count=0 seek=32 2>/dev/null
base_md5=$(md5sum < "$base")
qemu-img create -q -f qcow2 -b "$base" -F raw "$qcow" 32M || fail "qemu-img create (backing)"
qemu-img convert -O raw "$qcow" /tmp/host0.raw || fail "qemu-img convert (host view)"

# The metrics endpoint listens on loopback, which dom0's init leaves down.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  --metrics 127.0.0.1:9177 > /tmp/serve.log 2>&1 &
pid=$!
stop() { kill "$pid" 2>/dev/null; }
trap stop EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"

# ---- raw ----------------------------------------------------------------------------------
dev=$(xdisk attach "$raw" --format raw --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "attach raw: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
echo "raw image attached as $dev"
check "$dev is a block device" test -b "$dev"
check "$dev has the image's size" test "$(blockdev --getsize64 "$dev")" = $((64 * MiB))
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of="$dev" bs=1M conv=fsync 2>/dev/null || fail "writing $dev"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/back bs=1M count=4 2>/dev/null || fail "reading $dev"
check "data read back through $dev" cmp /tmp/pat /tmp/back
dd if="$raw" of=/tmp/img bs=1M count=4 2>/dev/null
check "data landed in the raw image" cmp /tmp/pat /tmp/img

# discard: the backend punches a hole; the range reads as zeros on both sides.
check "blkfront sees discard" test "$(cat /sys/block/"${dev#/dev/}"/queue/discard_max_bytes)" -gt 0
blocks0=$(stat -c %b "$raw")
blkdiscard -o $MiB -l $((2 * MiB)) "$dev" || fail "blkdiscard $dev"
blocks1=$(stat -c %b "$raw")
echo "raw image: $blocks0 -> $blocks1 blocks of 512 after discarding 2 MiB"
check "discard punched a hole in the raw image" test $((blocks0 - blocks1)) -ge 4096
dd if=/dev/zero of=/tmp/zero2m bs=1M count=2 2>/dev/null
dd if="$raw" of=/tmp/img bs=1M skip=1 count=2 2>/dev/null
check "discarded range reads zero in the image" cmp /tmp/zero2m /tmp/img
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/back bs=1M skip=1 count=2 2>/dev/null
check "discarded range reads zero through $dev" cmp /tmp/zero2m /tmp/back
dd if="$dev" of=/tmp/dev-raw.img bs=1M 2>/dev/null || fail "reading all of $dev"
check "$dev is byte-identical to the raw file" cmp /tmp/dev-raw.img "$raw"

# ---- qcow2 over a backing file, O_DIRECT (the format given: a probed one never opens a
# backing file) --------------------------------------------------------------------------
dev2=$(xdisk attach "$qcow" --format qcow2 --direct-io --control "$sock" --timeout 60 2>/tmp/attach2.err) ||
  fail "attach qcow2: $(cat /tmp/attach2.err) / $(tail -3 /tmp/serve.log)"
echo "qcow2 image attached as $dev2"
check "a second device name" test "$dev2" != "$dev"
check "$dev2 has the image's size" test "$(blockdev --getsize64 "$dev2")" = $((32 * MiB))
dd if="$dev2" of=/tmp/dev2-0.img bs=1M 2>/dev/null || fail "reading all of $dev2"
check "$dev2 reads byte-identical to qemu-img's view (backing data)" cmp /tmp/dev2-0.img /tmp/host0.raw

# A 12 KiB write inside a backing-file cluster (copy-up), then 1 MiB of whole clusters.
dd if=/dev/urandom of=/tmp/small bs=4k count=3 2>/dev/null
dd if=/tmp/small of="$dev2" bs=4k seek=259 count=3 conv=notrunc,fsync 2>/dev/null || fail "small write to $dev2"
dd if=/tmp/pat of="$dev2" bs=1M seek=16 count=1 conv=notrunc,fsync 2>/dev/null || fail "writing $dev2"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev2" of=/tmp/back2 bs=4k skip=259 count=3 2>/dev/null
check "small write read back through $dev2" cmp /tmp/small /tmp/back2
dd if="$dev2" of=/tmp/back2 bs=4k skip=256 count=3 2>/dev/null
dd if="$base" of=/tmp/want2 bs=4k skip=256 count=3 2>/dev/null
check "the rest of the copied-up cluster still has the backing data" cmp /tmp/want2 /tmp/back2
dd if=/tmp/pat of=/tmp/pat1m bs=1M count=1 2>/dev/null
dd if="$dev2" of=/tmp/back2 bs=1M skip=16 count=1 2>/dev/null
check "1 MiB write read back through $dev2" cmp /tmp/pat1m /tmp/back2

# Discard the 1 MiB just written (allocated clusters: freed) and 2 MiB of backing data.
check "blkfront sees discard on $dev2" test "$(cat /sys/block/"${dev2#/dev/}"/queue/discard_max_bytes)" -gt 0
blkdiscard -o $((16 * MiB)) -l $MiB "$dev2" || fail "blkdiscard $dev2 (allocated)"
blkdiscard -o $((4 * MiB)) -l $((2 * MiB)) "$dev2" || fail "blkdiscard $dev2 (backing)"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev2" of=/tmp/dev2-1.img bs=1M 2>/dev/null || fail "reading all of $dev2 after discard"
dd if=/tmp/dev2-1.img of=/tmp/back2 bs=1M skip=16 count=1 2>/dev/null
dd if=/dev/zero of=/tmp/zero1m bs=1M count=1 2>/dev/null
check "the discarded clusters read zero through $dev2" cmp /tmp/zero1m /tmp/back2

xdisk stat --control "$sock"
# Prometheus metrics of the same devices, scraped over HTTP (busybox wget): real dom0 I/O shows
# in the request counters and the latency histograms.
wget -q -O /tmp/metrics.txt http://127.0.0.1:9177/metrics || fail "scraping http://127.0.0.1:9177/metrics"
grep '^xdisk_requests_total.*op="read"' /tmp/metrics.txt | head -4
check "metrics: reads counted" sh -c "grep '^xdisk_requests_total.*op=\"read\"' /tmp/metrics.txt | awk '\$NF > 0' | grep -q ."
check "metrics: write latencies in the histogram" sh -c "grep '^xdisk_request_duration_seconds_count.*op=\"write\"' /tmp/metrics.txt | awk '\$NF > 0' | grep -q ."
check "metrics: open devices" sh -c "grep '^xdisk_open_devices ' /tmp/metrics.txt | awk '\$NF >= 1' | grep -q ."
xdisk stat --json --control "$sock" > /tmp/stat.json || fail "xdisk stat --json"
check "stat counts writes" grep -q '"wr_req": [1-9]' /tmp/stat.json
check "stat counts flushes" grep -q '"f_req": [1-9]' /tmp/stat.json
check "stat counts discards" grep -q '"ds_req": [1-9]' /tmp/stat.json
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

# The host's view of the images after detach.
qemu-img check "$qcow" || fail "qemu-img check: the qcow2 image is not clean"
qemu-img convert -O raw "$qcow" /tmp/host1.raw || fail "qemu-img convert after detach"
check "qemu-img reads what $dev2 showed" cmp /tmp/host1.raw /tmp/dev2-1.img
dd if=/tmp/host1.raw of=/tmp/back2 bs=4k skip=259 count=3 2>/dev/null
check "the small write is in the qcow2 image" cmp /tmp/small /tmp/back2
qemu-img map --output=json "$qcow" > /tmp/map.json || fail "qemu-img map"
# The entry covering 16 MiB: no data in the image (freed by the discard).
entry=$(awk -v o=$((16 * MiB)) -F'[:,]' '{ s = $2 + 0; l = $4 + 0; if (s <= o && o < s + l) print }' /tmp/map.json)
echo "map at 16 MiB: $entry"
case $entry in
  *'"data": false'*) echo "ok: the discarded clusters are no longer allocated" ;;
  *) fail "the discarded clusters are still allocated: $entry" ;;
esac
check "the backing file is untouched" test "$(md5sum < "$base")" = "$base_md5"
xdisk img check "$qcow" || fail "xdisk img check: the qcow2 image is not clean"

trap - EXIT
stop_daemon "$pid" /tmp/serve.log
