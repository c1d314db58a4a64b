#!/bin/sh
# Live disks on real Xen (issue 14): a qcow2 disk locally attached to dom0 through `xdisk serve`
# (dom0's own xen-blkfront, O_DIRECT), a writer going through /dev/xvdX the whole time (1 MiB
# O_DIRECT writes of a known pattern, each checked for errors), and meanwhile:
#   1. `xdisk snapshot` to a new overlay: the old top is then read-only and `qemu-img check`
#      clean while the guest keeps writing;
#   2. `xdisk commit --wait`: the overlay merged back into the old top, the device pivots to it;
#   3. `xdisk mirror --pivot --wait` to a second file: the device ends up on the mirror.
# Then: no write failed, every MiB the writer wrote reads back as the last pattern it put there
# and the rest as zeroes, `xdisk stat` names the mirror, and after the detach every image is
# `qemu-img check` clean and the mirror (what the device served last) holds exactly what the
# guest read.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
top=$LAB_DATA/live-top.qcow2
ov=$LAB_DATA/live-overlay.qcow2
mir=$LAB_DATA/live-mirror.qcow2
MiB=1048576
PAT_MB=16
# Work files on the data disk: dom0's /tmp is a small tmpfs that earlier scenarios fill.
W=$LAB_DATA/live-work
command -v qemu-img >/dev/null || fail "no qemu-img in dom0 (the oracle)"

rm -rf "$top" "$ov" "$mir" "$W"
mkdir -p "$W" || fail "mkdir $W"
qemu-img create -q -f qcow2 "$top" 32M || fail "qemu-img create"
# Two patterns the writer alternates between.
for p in a b; do
  dd if=/dev/urandom of=$W/pat-$p bs=1M count=$PAT_MB 2>/dev/null || fail "pattern $p"
done

XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/serve.log 2>&1 &
pid=$!
trap 'touch $W/stop; kill "$pid" 2>/dev/null; sleep 1; rm -rf "$W"' EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"
dev=$(xdisk attach "$top" --format qcow2 --direct-io --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "attach: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
echo "attached $top as $dev"

# The writer: 1 MiB O_DIRECT writes of pattern a, then b, ..., with a short pause after each
# (the jobs converge: a writer faster than the copy keeps a mirror running, as in QEMU).
writer() {
  local n=0 p i
  while [ ! -e $W/stop ]; do
    if [ $((n % 2)) = 0 ]; then p=a; else p=b; fi
    i=0
    while [ $i -lt $PAT_MB ] && [ ! -e $W/stop ]; do
      dd if=$W/pat-$p of="$dev" bs=1M skip=$i seek=$i count=1 oflag=direct \
        conv=notrunc 2>/dev/null || echo "write $n/$i failed" >> $W/werr
      i=$((i + 1))
      usleep 20000
    done
    n=$((n + 1))
  done
  echo "$n" > $W/wdone
}
writer &
wpid=$!
sleep 2

t0=$(up)
xdisk snapshot "$dev" "$ov" --control "$sock" > /tmp/snap.out 2>&1 ||
  fail "snapshot: $(cat /tmp/snap.out) / $(tail -3 /tmp/serve.log)"
report "live snapshot of $dev under writes: $(secs_since "$t0") s"
check "the overlay exists" test -f "$ov"
sleep 2
check "the old top is qemu-img check clean while the guest writes" qemu-img check -q "$top"
xdisk stat --control "$sock" > /tmp/stat1.out 2>&1
check "xdisk stat shows the overlay over the old top" grep -q "live-overlay.qcow2" /tmp/stat1.out

t0=$(up)
xdisk commit "$dev" --wait --control "$sock" > /tmp/commit.out 2>&1 ||
  fail "commit: $(tail -3 /tmp/commit.out) / $(tail -3 /tmp/serve.log)"
report "live commit of the overlay into the old top under writes: $(secs_since "$t0") s"
xdisk stat --control "$sock" > /tmp/stat2.out 2>&1
check "after the commit the device serves the old top" grep -q "live-top.qcow2" /tmp/stat2.out
check "after the commit the overlay is out of the chain" sh -c '! grep -q live-overlay.qcow2 /tmp/stat2.out'

t0=$(up)
xdisk mirror "$dev" "$mir" -f qcow2 --pivot --wait --control "$sock" > /tmp/mirror.out 2>&1 ||
  fail "mirror: $(tail -3 /tmp/mirror.out) / $(tail -3 /tmp/serve.log)"
report "live mirror to a second file with pivot under writes: $(secs_since "$t0") s"
xdisk stat --control "$sock" > /tmp/stat3.out 2>&1
check "after the pivot the device serves the mirror" grep -q "live-mirror.qcow2" /tmp/stat3.out
xdisk jobs --control "$sock" > /tmp/jobs.out 2>&1
cat /tmp/jobs.out

touch $W/stop
wait "$wpid"
check "the writer ran through all three jobs" test -s $W/wdone
report "writer passes of $PAT_MB MiB: $(cat $W/wdone)"
[ -s $W/werr ] && fail "guest writes failed: $(head -3 $W/werr)"
echo "ok: no guest write failed"

# What the guest reads now: each MiB is the last pattern the writer put there (a or b).
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of=$W/back bs=1M iflag=direct 2>/dev/null || fail "reading $dev"
i=0
while [ $i -lt $PAT_MB ]; do
  dd if=$W/back of=$W/got bs=1M skip=$i count=1 2>/dev/null
  dd if=$W/pat-a of=$W/want-a bs=1M skip=$i count=1 2>/dev/null
  dd if=$W/pat-b of=$W/want-b bs=1M skip=$i count=1 2>/dev/null
  cmp -s $W/got $W/want-a || cmp -s $W/got $W/want-b ||
    fail "MiB $i of $dev holds neither pattern the writer wrote there"
  i=$((i + 1))
done
echo "ok: every MiB written reads back as the writer's last pattern there"
dd if=/dev/zero of=$W/zero bs=1M count=$((32 - PAT_MB)) 2>/dev/null
dd if=$W/back of=$W/tail bs=1M skip=$PAT_MB 2>/dev/null
check "the rest of the disk reads zero" cmp $W/zero $W/tail

xdisk detach "$dev" --control "$sock" --timeout 30 > /tmp/detach.out 2>&1 ||
  fail "detach: $(cat /tmp/detach.out)"
trap - EXIT
stop_daemon "$pid" /tmp/serve.log
for f in "$top" "$ov" "$mir"; do
  [ -f "$f" ] || continue
  check "$(basename "$f") is qemu-img check clean" qemu-img check -q "$f"
done
qemu-img convert -O raw "$mir" $W/mir.raw || fail "qemu-img convert of the mirror"
check "the mirror (what the device served last) holds what the guest read" cmp $W/back $W/mir.raw
rm -rf "$W" "$top" "$ov" "$mir"
