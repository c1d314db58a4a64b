#!/bin/sh
# Xen lab: dom0 disks whose bytes live behind NBD. `xdisk nbd` serves, in dom0:
#   server A on a unix socket: export `raw` (a raw file) and export `qraw` (the raw bytes of a
#            qcow2 file: the format runs in the disk backend, over NBD: "format over storage");
#   server B on TCP 127.0.0.1:10810: export `q1` (a qcow2 file, the format in the server).
# `xdisk serve` (started with the systemd unit's command line) serves them to dom0's
# xen-blkfront through xdisk's NBD client:
#   xvda  xdisk attach 'nbd+unix:///raw?socket=...'                   (local attach, probed)
#   xvdb  xl block-attach 0 'format=raw,...,backendtype=qdisk,target=nbd://127.0.0.1:10810/q1'
#   xvdc  xl block-attach 0 'format=qcow2,...,backendtype=qdisk,target=nbd+unix:///qraw?socket=...'
# Each reads byte-identical to the pattern and to qemu-img's read of the same export; O_DIRECT
# writes (inside the data, and where nothing was allocated) and a flush read back; discard (if
# offered) reads zero. Server B stops under xvdb once it was checked: a read fails with EIO
# within the client's bounded reconnection (5 attempts, ~9.3 s; meanwhile the other disks are
# checked and detached and server A stops), a later read fails at once, xvdb detaches. No node
# is left in xenstore; after the servers exit the files hold what the disks showed and both
# qcow2 files check clean.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
ctl=/run/xdisk/control.sock
run=/run/xdisk-nbd
raw=$LAB_DATA/nbd-a.raw
q1=$LAB_DATA/nbd-b.qcow2
q2=$LAB_DATA/nbd-a.qcow2
MiB=1048576
SIZE=4
A="nbd+unix:///raw?socket=$run/a.sock"
AQ="nbd+unix:///qraw?socket=$run/a.sock"
B="nbd://127.0.0.1:10810/q1"
command -v qemu-img >/dev/null || fail "no qemu-img in dom0 (the oracle)"

# vdev_num xvdX: its device number.
vdev_num() {
  case $1 in xvda) echo 51712 ;; xvdb) echo 51728 ;; xvdc) echo 51744 ;; esac
}

serve_pid='' reader=''
# On any exit: readers first, then the disks while their backend answers, then the daemon,
# then the NBD servers, then any node left (the order of lab_reset in tests/xen/dom0/lib.sh).
cleanup() {
  [ -n "$reader" ] && kill "$reader" 2>/dev/null
  for v in xvdb xvdc; do
    xenstore-exists "/local/domain/0/backend/qdisk/0/$(vdev_num $v)" 2>/dev/null || continue
    timeout 20 xl block-detach 0 "$v" >/dev/null 2>&1 || timeout 20 xl block-detach -f 0 "$v" >/dev/null 2>&1
  done
  xenstore-exists /local/domain/0/device/vbd/51712 2>/dev/null &&
    timeout 20 xdisk detach --force --control "$ctl" xvda >/dev/null 2>&1
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid"
  for p in "$run"/*.pid; do
    [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null
  done
  for v in xvda xvdb xvdc; do
    n=$(vdev_num $v)
    for t in qdisk xdisk; do xenstore-rm "/local/domain/0/backend/$t/0/$n" 2>/dev/null; done
    xenstore-rm "/local/domain/0/device/vbd/$n" 2>/dev/null
  done
  return 0
}
trap cleanup EXIT

# gone VDEV: no /dev node, no backend node of either type, no frontend node.
gone() {
  n=$(vdev_num "$1")
  ! test -b "/dev/$1" && ! xenstore-exists "/local/domain/0/backend/qdisk/0/$n" &&
    ! xenstore-exists "/local/domain/0/backend/xdisk/0/$n" &&
    ! xenstore-exists "/local/domain/0/device/vbd/$n"
}

# stop_server NAME: SIGTERM to NBD server NAME, waits until it exited.
stop_server() {
  p=$(cat "$run/$1.pid") || fail "no pid file of server $1"
  kill -TERM "$p"
  wait_for 15 sh -c "! kill -0 $p 2>/dev/null" || fail "NBD server $1 did not exit on SIGTERM"
}

t0=$(up)
# ---- images: 4 MiB each, 2 MiB of random data at 1 MiB, zeroes around ----------------------
rm -rf "$run" && mkdir -p "$run" /run/xdisk && chmod 0700 /run/xdisk
rm -f "$raw" "$q1" "$q2"
for k in a b c; do
  dd if=/dev/zero of=/tmp/want-$k bs=1M count=0 seek=$SIZE 2>/dev/null
  dd if=/dev/urandom of=/tmp/want-$k bs=1M seek=1 count=2 conv=notrunc 2>/dev/null || fail "making a pattern"
done
cp /tmp/want-a "$raw" || fail "copying the raw image"
for x in "$q1:/tmp/want-b" "$q2:/tmp/want-c"; do
  f=${x%%:*}
  xdisk img create -f qcow2 "$f" ${SIZE}M >/dev/null || fail "xdisk img create $f"
  xdisk img convert -n -f raw -O qcow2 "${x#*:}" "$f" || fail "xdisk img convert -n into $f"
done
# A qcow2 image on an NBD export cannot grow the export (xdisk's client does not resize): new
# clusters must fit in the file as served, as for a qcow2 on a block device. Room for the
# writes below: free clusters past the image's end (refcount 0, the checks stay clean).
truncate -s $((2 * SIZE))M "$q2" || fail "truncate $q2"

# ---- the servers, the oracle's reads, the daemon --------------------------------------------
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
xdisk nbd --fork --pid-file "$run/a.pid" -t -e 8 --discard unmap -k "$run/a.sock" \
  --export "raw=raw:$raw" --export "qraw=raw:$q2" > /tmp/nbd-a.log 2>&1 ||
  fail "xdisk nbd (A): $(tail -3 /tmp/nbd-a.log)"
xdisk nbd --fork --pid-file "$run/b.pid" -t -e 8 --discard unmap -b 127.0.0.1 -p 10810 \
  -f qcow2 -x q1 "$q1" > /tmp/nbd-b.log 2>&1 || fail "xdisk nbd (B): $(tail -3 /tmp/nbd-b.log)"
# qemu-img reads the same exports (another client of the same servers), while disks attach.
(qemu-img convert -f raw -O raw "$A" /tmp/qi-a && qemu-img convert -f raw -O raw "$B" /tmp/qi-b &&
  qemu-img convert -f qcow2 -O raw "$AQ" /tmp/qi-c) > /tmp/qi.log 2>&1 &
oracle=$!

cmd=$(sed -n 's|^ExecStart=/usr/bin/xdisk ||p' /lab/dist/systemd/xdisk.service)
case $cmd in serve\ *--control\ "$ctl"*) ;; *) fail "unexpected ExecStart in xdisk.service: $cmd" ;; esac
# shellcheck disable=SC2086 # the unit's arguments, split as systemd does
XDISK_LOG=info xdisk $cmd > /tmp/serve.log 2>&1 &
serve_pid=$!
wait_for 15 test -S "$ctl" || fail "no control socket: $(tail -3 /tmp/serve.log)"
echo "images, servers and daemon up after $(secs_since "$t0") s"

# ---- attach: xdisk attach (in the background) and xl block-attach ---------------------------
xdisk attach "$A" --devid xvda --control "$ctl" --timeout 30 > /tmp/attach.out 2>/tmp/attach.err &
attacher=$!
# block_attach SPEC VDEV: xl block-attach 0, then waits for /dev/VDEV.
block_attach() {
  xl block-attach 0 "$1" > /tmp/xl-attach.log 2>&1 ||
    fail "xl block-attach 0 '$1': $(tail -3 /tmp/xl-attach.log | tr '\n' ' ') / $(tail -3 /tmp/serve.log | tr '\n' ' ')"
  wait_for 30 test -b "/dev/$2" || fail "no /dev/$2 after xl block-attach: $(tail -3 /tmp/serve.log)"
}
block_attach "format=raw,vdev=xvdb,access=rw,backendtype=qdisk,target=$B" xvdb
block_attach "format=qcow2,vdev=xvdc,access=rw,backendtype=qdisk,target=$AQ" xvdc
wait "$attacher" || fail "xdisk attach $A: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
check "xdisk attach printed /dev/xvda" test "$(cat /tmp/attach.out)" = /dev/xvda
check "params: the probed format and the NBD URI" \
  test "$(xenstore-read /local/domain/0/backend/xdisk/0/51712/params)" = "aio:$A"
check "libxl wrote params aio:$B" test "$(xenstore-read /local/domain/0/backend/qdisk/0/51728/params)" = "aio:$B"
check "libxl wrote params qcow2:$AQ" test "$(xenstore-read /local/domain/0/backend/qdisk/0/51744/params)" = "qcow2:$AQ"
xl block-list 0 > /tmp/block-list
check "xl block-list shows xvdb and xvdc" sh -c "grep -q '^51728 ' /tmp/block-list && grep -q '^51744 ' /tmp/block-list"
echo "attached after $(secs_since "$t0") s"

# ---- reads, writes, flush, discard ---------------------------------------------------------
wait "$oracle" || fail "qemu-img convert of an export: $(tail -3 /tmp/qi.log)"
dd if=/dev/urandom of=/tmp/w bs=64k count=5 2>/dev/null
dd if=/dev/zero of=/tmp/z bs=1M count=1 2>/dev/null
discards=''
# io_checks K VDEV: reads, writes, flushes, discards through /dev/VDEV (pattern /tmp/want-K).
io_checks() {
  k=$1 v=$2 d=/dev/$2
  check "$v has the image's size" test "$(blockdev --getsize64 "$d")" = $((SIZE * MiB))
  dd if="$d" of=/tmp/dev-$k bs=1M iflag=direct 2>/dev/null || fail "reading $d"
  check "$v reads the pattern" cmp /tmp/want-$k /tmp/dev-$k
  check "qemu-img reads the pattern from $v's export" cmp /tmp/want-$k /tmp/qi-$k
  # 320 KiB at 2 MiB + 64 KiB (inside the data) and at 3 MiB + 64 KiB (never written: the
  # qcow2s allocate), O_DIRECT, each followed by a flush (fsync of the block device).
  dd if=/tmp/w of="$d" bs=64k seek=33 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "O_DIRECT write to $d"
  dd if=/tmp/w of="$d" bs=64k seek=49 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "O_DIRECT write to $d at 3 MiB"
  dd if=/tmp/w of=/tmp/want-$k bs=64k seek=33 conv=notrunc 2>/dev/null
  dd if=/tmp/w of=/tmp/want-$k bs=64k seek=49 conv=notrunc 2>/dev/null
  if [ "$(cat /sys/block/$v/queue/discard_max_bytes)" -gt 0 ]; then
    blkdiscard -o $MiB -l $MiB "$d" || fail "blkdiscard $d"
    dd if=/tmp/z of=/tmp/want-$k bs=1M seek=1 conv=notrunc 2>/dev/null
    discards="$discards $v"
  fi
  # Read back what changed: 1 MiB .. 2.5 MiB (the discard, the first write), the second write.
  dd if="$d" of=/tmp/back bs=64k skip=16 count=24 iflag=direct 2>/dev/null || fail "reading $d again"
  dd if="$d" bs=64k skip=49 count=5 iflag=direct >> /tmp/back 2>/dev/null || fail "reading $d again"
  { dd if=/tmp/want-$k bs=64k skip=16 count=24; dd if=/tmp/want-$k bs=64k skip=49 count=5; } > /tmp/wantback 2>/dev/null
  check "$v reads back its writes (and discard)" cmp /tmp/wantback /tmp/back
  xdisk stat --json --control "$ctl" "$v" > /tmp/stat.json || fail "xdisk stat --json $v"
  check "the daemon counted $v's flushes" grep -q '"f_req": [1-9]' /tmp/stat.json
  check "no request of $v failed" sh -c "! grep -q '\"errors\": [1-9]' /tmp/stat.json"
}

io_checks b xvdb
# Server B stops under xvdb; a read is issued (it must fail within the client's bounded
# reconnection) while the other disks are checked.
stop_server b
rm -f /tmp/dd-fail.*
tk=$(up)
(dd if=/dev/xvdb of=/dev/null bs=4k skip=100 count=1 iflag=direct 2>/tmp/dd-fail.err
  echo $? > /tmp/dd-fail.rc && up > /tmp/dd-fail.end) &
reader=$!
io_checks a xvda
io_checks c xvdc
echo "discard offered and done on:${discards:- none}"
check "blkfront saw no failed operation" sh -c "! dmesg | grep -q 'op failed'"
echo "read/write/flush/discard done after $(secs_since "$t0") s"

# ---- xvda and xvdc detach, server A stops, its files ------------------------------------------
xdisk detach xvda --control "$ctl" || fail "xdisk detach xvda: $(tail -3 /tmp/serve.log)"
xl block-detach 0 xvdc > /tmp/xl-detach.log 2>&1 || fail "xl block-detach 0 xvdc: $(tail -3 /tmp/xl-detach.log)"
for v in xvda xvdc; do
  wait_for 20 gone "$v" || fail "$v: nodes left after detach: $(xenstore-ls /local/domain/0/backend 2>&1 | head -5)"
done
echo "ok: xvda and xvdc detached, nothing left in xenstore"
# The daemon closes a detached disk's image after the nodes went (xvdc's qcow2 writes what it
# still holds): only then may its server go.
wait_for 30 sh -c "! xdisk stat --control $ctl xvda >/dev/null 2>&1 && ! xdisk stat --control $ctl xvdc >/dev/null 2>&1" ||
  fail "the daemon still lists xvda or xvdc: $(xdisk stat --control "$ctl" 2>&1 | head -5)"
stop_server a
check "the raw file holds what xvda showed" cmp "$raw" /tmp/want-a
xdisk img check "$q2" > /tmp/check.out 2>&1 || fail "xdisk img check $q2: $(tail -3 /tmp/check.out)"
qemu-img check "$q2" > /tmp/check.out 2>&1 || fail "qemu-img check $q2: $(tail -3 /tmp/check.out)"
qemu-img convert -O raw "$q2" /tmp/host.raw || fail "qemu-img convert $q2"
check "$q2 holds what xvdc showed" cmp /tmp/want-c /tmp/host.raw

# ---- the read of xvdb, whose server stopped --------------------------------------------------
wait_for 25 test -s /tmp/dd-fail.end || fail "a read of /dev/xvdb still hangs $(secs_since "$tk") s after its server stopped"
wait "$reader"
reader=''
rc=$(cat /tmp/dd-fail.rc)
fail_secs=$(awk -v a="$tk" -v b="$(cat /tmp/dd-fail.end)" 'BEGIN { printf "%.2f", b - a }')
echo "read of xvdb after its server stopped: exit $rc after $fail_secs s: $(cat /tmp/dd-fail.err)"
check "the read failed" test "$rc" != 0
check "within the client's bounded reconnection (~9.3 s, < 20 s)" awk -v s="$fail_secs" 'BEGIN { exit !(s < 20) }'
check "with an I/O error" grep -qiE 'input/output error|I/O error' /tmp/dd-fail.err
t1=$(up)
dd if=/dev/xvdb of=/dev/null bs=4k skip=200 count=1 iflag=direct 2>/dev/null && fail "a later read succeeded"
again=$(secs_since "$t1")
check "a later read fails at once ($again s)" awk -v s="$again" 'BEGIN { exit !(s < 3) }'
xl block-detach 0 xvdb > /tmp/xl-detach.log 2>&1 || fail "xl block-detach 0 xvdb after its server stopped: $(tail -3 /tmp/xl-detach.log)"
wait_for 20 gone xvdb || fail "xvdb: nodes left after detach"
echo "ok: xvdb detached after $(secs_since "$t0") s"

# ---- the daemon stops; server B's image ------------------------------------------------------
stop_daemon "$serve_pid" /tmp/serve.log
serve_pid=''
xdisk img check "$q1" > /tmp/check.out 2>&1 || fail "xdisk img check $q1: $(tail -3 /tmp/check.out)"
qemu-img check "$q1" > /tmp/check.out 2>&1 || fail "qemu-img check $q1: $(tail -3 /tmp/check.out)"
qemu-img convert -O raw "$q1" /tmp/host.raw || fail "qemu-img convert $q1"
check "$q1 holds what xvdb showed" cmp /tmp/want-b /tmp/host.raw
trap - EXIT
report "xdisk-nbd: dom0 disks behind xdisk nbd: xvda (xdisk attach, raw, unix), xvdb (xl block-attach, qcow2 in the server, TCP), xvdc (xl block-attach, qcow2 over a raw export); discard on:${discards:- none}; a read after the server stopped failed (EIO) within ${fail_secs}s; $(secs_since "$t0")s"
