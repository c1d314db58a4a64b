#!/bin/sh
# Scenario 3 of the Xen lab: several devices at once from one `xdisk serve`, some with broken
# images. Three good disks (raw, qcow2, qcow2 over a backing file) carry I/O the whole time
# while xdisk is given: a qcow2 with a garbage header, a missing file, a qcow2 whose backing
# file is gone (all refused at attach with the reason, nothing left in xenstore), and a qcow2
# that opens but has a corrupt L1 entry (requests in that range fail with an I/O error, the rest
# of that disk still works). The good disks' data stays intact, the daemon lives on, errors are
# counted on the broken disk only, everything detaches cleanly.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
D=$LAB_DATA/multi
MiB=1048576
command -v qemu-img >/dev/null || fail "no qemu-img in dom0 (the oracle)"
rm -rf "$D"; mkdir -p "$D"

# Good images.
dd if=/dev/zero of="$D/good.raw" bs=1M count=0 seek=32 2>/dev/null
qemu-img create -q -f qcow2 "$D/good.qcow2" 32M || fail "qemu-img create"
dd if=/dev/urandom of="$D/base.raw" bs=1M count=4 2>/dev/null
qemu-img create -q -f qcow2 -b "$D/base.raw" -F raw "$D/overlay.qcow2" 32M || fail "qemu-img create -b"
# Broken images.
{ printf 'QFI\373\000\000\000\003'; head -c 4088 /dev/urandom; } > "$D/garbage.qcow2"
qemu-img create -q -f qcow2 -b "$D/gone.raw" -F raw -u "$D/nobacking.qcow2" 32M || fail "qemu-img create -u"
# corrupt.qcow2: 8 MiB of data in 4 KiB clusters (one L2 table maps 2 MiB), then L1[1]
# pointed 1 TiB past the end of the file: 2..4 MiB is unreadable, the rest is fine.
dd if=/dev/urandom of="$D/corrupt.src" bs=1M count=8 2>/dev/null
qemu-img convert -O qcow2 -o cluster_size=4096 "$D/corrupt.src" "$D/corrupt.qcow2" || fail "qemu-img convert"
l1=$(printf '%d' "0x$(od -A n -t x1 -j 40 -N 8 "$D/corrupt.qcow2" | tr -d ' \n')")
echo "corrupt.qcow2: L1 table at $l1"
printf '\200\000\001\000\000\000\000\000' | dd of="$D/corrupt.qcow2" bs=1 seek=$((l1 + 8)) conv=notrunc 2>/dev/null

XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/serve.log 2>&1 &
pid=$!
stop() { kill "$pid" 2>/dev/null; kill $loops 2>/dev/null; }
loops=
trap stop EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"

attach() {
  xdisk attach "$@" --control "$sock" --timeout 60 2>/tmp/attach.err ||
    fail "attach $*: $(cat /tmp/attach.err) / $(tail -3 /tmp/serve.log)"
}
g1=$(attach "$D/good.raw" --format raw)
g2=$(attach "$D/good.qcow2" --direct-io)
g3=$(attach "$D/overlay.qcow2" --format qcow2)
echo "good disks: $g1 $g2 $g3"

# Background I/O on the good disks: each loop writes its own pattern over and over, with fsync.
n=0
for g in $g1 $g2 $g3; do
  n=$((n + 1))
  dd if=/dev/urandom of=/tmp/pat$n bs=1M count=2 2>/dev/null
  (
    i=0
    while [ ! -e /tmp/stop-loops ]; do
      dd if=/tmp/pat$n of="$g" bs=1M seek=$((4 + (i % 4) * 2)) conv=notrunc,fsync 2>/dev/null ||
        { echo "loop $g: write failed" >> /tmp/loop-errors; break; }
      dd if="$g" of=/tmp/rd$n bs=1M skip=$((4 + (i % 4) * 2)) count=2 iflag=direct 2>/dev/null ||
        { echo "loop $g: read failed" >> /tmp/loop-errors; break; }
      cmp -s /tmp/pat$n /tmp/rd$n || { echo "loop $g: data mismatch" >> /tmp/loop-errors; break; }
      i=$((i + 1))
      echo $i > /tmp/loop$n.count
    done
  ) &
  loops="$loops $!"
done
rm -f /tmp/loop-errors /tmp/stop-loops

# refused BROKEN WHY_PATTERN ARGS...: the attach fails, says why, leaves no nodes.
refused() {
  img=$1 why=$2
  shift 2
  if dev=$(xdisk attach "$img" "$@" --control "$sock" --timeout 60 2>/tmp/attach.err); then
    fail "attach of broken $img succeeded ($dev)"
  fi
  echo "attach $img refused: $(cat /tmp/attach.err)"
  grep -qiE "$why" /tmp/attach.err || fail "attach $img: reason not given (want /$why/): $(cat /tmp/attach.err)"
  if xenstore-ls -f /local/domain/0/backend/xdisk 2>/dev/null | grep -q "params = .*$img"; then
    fail "nodes left after the refused attach of $img"
  fi
}
refused "$D/garbage.qcow2" "qcow2|header|version|cluster" --format qcow2
refused "$D/missing.raw" "no such file|not found|cannot open" --format raw
refused "$D/nobacking.qcow2" "backing|gone.raw|no such file" --format qcow2

# The corrupt one attaches: its good range works, its bad range fails, nothing else suffers.
bad=$(attach "$D/corrupt.qcow2" --format qcow2)
echo "corrupt image attached as $bad"
dd if="$bad" of=/tmp/c0 bs=1M count=2 iflag=direct 2>/dev/null || fail "reading the intact range of $bad"
dd if="$D/corrupt.src" of=/tmp/w0 bs=1M count=2 2>/dev/null
check "the intact range of the corrupt image reads right" cmp /tmp/c0 /tmp/w0
if dd if="$bad" of=/tmp/c1 bs=1M skip=2 count=2 iflag=direct 2>/tmp/c1.err; then
  fail "reading the range behind the corrupt L1 entry succeeded"
fi
echo "the corrupt range fails: $(tail -1 /tmp/c1.err)"
dd if="$bad" of=/tmp/c2 bs=1M skip=4 count=4 iflag=direct 2>/dev/null || fail "reading past the corrupt range of $bad"
dd if="$D/corrupt.src" of=/tmp/w2 bs=1M skip=4 count=4 2>/dev/null
check "past the corrupt range, the image reads right" cmp /tmp/c2 /tmp/w2

# Let the loops run on a little, then stop them.
sleep 3
touch /tmp/stop-loops
for l in $loops; do wait "$l"; done
loops=
[ -s /tmp/loop-errors ] && fail "I/O on a good disk failed: $(cat /tmp/loop-errors)"
for n in 1 2 3; do
  c=$(cat /tmp/loop$n.count 2>/dev/null || echo 0)
  echo "good disk $n: $c write+read rounds"
  [ "$c" -gt 0 ] || fail "good disk $n did no I/O"
done
check "the daemon still runs" kill -0 "$pid"

xdisk stat --control "$sock"
xdisk stat --json --control "$sock" > /tmp/stat.json || fail "xdisk stat --json"
for g in $g1 $g2 $g3; do
  xdisk stat --json --control "$sock" "$g" > /tmp/stat.json || fail "xdisk stat --json $g"
  check "no error counted on the good disk $g" sh -c "! grep -q '\"errors\": [1-9]' /tmp/stat.json"
done
xdisk stat --json --control "$sock" "$bad" > /tmp/stat.json || fail "xdisk stat --json $bad"
check "errors counted on the corrupt disk" grep -q '"errors": [1-9]' /tmp/stat.json

for g in $g1 $g2 $g3 $bad; do
  xdisk detach "$g" --control "$sock" || fail "detach $g: $(tail -3 /tmp/serve.log)"
done
wait_for 10 sh -c "! ls /dev/xvd* >/dev/null 2>&1" || fail "device nodes still there: $(ls /dev/xvd*)"
check "no backend nodes left" sh -c "! xenstore-exists /local/domain/0/backend/xdisk"
check "no frontend nodes left" sh -c "! xenstore-ls /local/domain/0/device/vbd 2>/dev/null | grep -q ."
for i in good.qcow2 overlay.qcow2; do
  qemu-img check -q "$D/$i" || fail "qemu-img check $i: not clean"
done
qemu-img convert -O raw "$D/overlay.qcow2" /tmp/ov.raw
dd if=/tmp/ov.raw of=/tmp/ov-tail bs=1M skip=$((4 + 3 * 2)) count=2 2>/dev/null
dd if=/tmp/ov.raw of=/tmp/ov-head bs=1M count=4 2>/dev/null
check "the overlay's backing data is intact" cmp /tmp/ov-head "$D/base.raw"

trap - EXIT
stop_daemon "$pid" /tmp/serve.log
