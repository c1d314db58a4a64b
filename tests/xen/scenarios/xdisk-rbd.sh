#!/bin/sh
# Xen lab: dom0 disks whose bytes live in Ceph RBD (issue 13). The host runs the throwaway
# Ceph cluster (tests/ceph/start, on 127.0.0.1) and made two 64 MiB RBD images with its xdisk
# (`xdisk img create -f raw|qcow2 rbd:rbd/...`); tests/xen/lib/ceph.sh says how dom0 reaches
# it: QEMU user networking with restrict=on and a guestfwd per Ceph port to the host's
# 127.0.0.1. Here:
#   - the NIC (virtio-net) comes up as 10.0.2.15; socat forwards 127.0.0.1:PORT (the
#     addresses in Ceph's maps) to $CEPH_FWD:PORT for each monitor and OSD port, with
#     TCP_NODELAY; the monitor answers through it, the host (10.0.2.2) does not (restrict=on);
#   - `xdisk serve` + `xdisk attach` of the raw image (`rbd:...:conf=/lab/ceph/ceph.conf`,
#     O_DIRECT, librbd's cache off) and of the qcow2 image (everything in the name:
#     `mon_host=`, `id=`, `key=`, no ceph.conf); dom0's xen-blkfront gets /dev/xvdX;
#   - 2 MiB of random bytes written through each with O_DIRECT (32 requests of 4 KiB, then
#     15 of 128 KiB) and a flush, read back with O_DIRECT; `xdisk stat` counts no error;
#     detach leaves nothing.
# The host then reads all of both images with `rbd export` and qemu-img's rbd driver (the
# pattern where dom0 wrote it, zeros elsewhere; `qemu-img check` of the qcow2 image):
# host_check_xdisk_rbd in tests/xen/lib/ceph.sh. Under TCG a 4 KiB write through librbd in
# dom0 takes ~0.15 s (raw) to ~0.25 s (qcow2): the sizes are kept small.
# lab-needs: socat ceph
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
W=$LAB_DATA/rbd
MiB=1048576
[ -f /lab/ceph/env ] || fail "no /lab/ceph/env: the host's Ceph set-up failed (see tests/xen/run's output)"
# shellcheck disable=SC1091
. /lab/ceph/env
[ -f "$W/pattern" ] || fail "no $W/pattern on the data disk"

serve_pid='' fwd_pids='' devs=''
cleanup() {
  for d in $devs; do
    test -b "$d" && timeout 30 xdisk detach --force --control "$sock" "$d" >/dev/null 2>&1
  done
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid"
  # shellcheck disable=SC2086
  [ -n "$fwd_pids" ] && kill $fwd_pids 2>/dev/null
  rm -f "$W"/back-*
  # The network goes as it came: with dom0's virtio-net up, the scenarios after this one ran
  # slower in a way that favours the kernel's blkback (xdisk-compare's 64k random reads
  # 0.64-0.69 of blkback's after it, 1.03-1.09 without; the same with only the NIC brought up
  # and nothing else of this scenario: QEMU's user networking under TCG, see docs/xen.md).
  if [ -n "${ifc:-}" ]; then
    ip addr flush dev "$ifc" 2>/dev/null
    ip link set "$ifc" down 2>/dev/null
  fi
  modprobe -r virtio_net 2>/dev/null
  return 0
}
trap cleanup EXIT

# ---- the network: the NIC, loopback, the forwarders ----------------------------------------
t0=$(up)
modprobe virtio_net || fail "modprobe virtio_net"
ip link set lo up
# The NIC: the interface with a device behind it (virtio-net), not lo.
nic() { for i in /sys/class/net/*/device; do [ -e "$i" ] && basename "$(dirname "$i")" && return 0; done; return 1; }
wait_for 10 nic >/dev/null || fail "no network interface after loading virtio_net"
ifc=$(nic)
ip addr add 10.0.2.15/24 dev "$ifc" || fail "ip addr add 10.0.2.15/24 dev $ifc"
ip link set "$ifc" up || fail "ip link set $ifc up"
echo "network: $ifc $(ip -4 addr show "$ifc" | awk '/inet / { print $2 }'); Ceph ports $CEPH_PORTS via $CEPH_FWD"
# socat, not busybox nc: socat sets TCP_NODELAY (nc cannot, and Nagle may hold a relay's
# second small write until the first is acknowledged). With nc the same I/O took longer in one
# comparison here, on a noisy host: not a clean measure of how much of it was Nagle.
for p in $CEPH_PORTS; do
  socat "TCP-LISTEN:$p,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:$CEPH_FWD:$p,nodelay" \
    </dev/null >/dev/null 2>&1 &
  fwd_pids="$fwd_pids $!"
done
# banner HOST PORT: the first bytes a server sends (a Ceph v2 endpoint: "ceph v2"); empty
# if no connection within 1 s (a dropped SYN: restrict=on drops, it does not refuse).
banner() {
  timeout 3 socat -T 1 -u "TCP:$1:$2,connect-timeout=1" STDOUT 2>/dev/null | head -c 7
}
mon_answers() { [ "$(banner 127.0.0.1 3300)" = "ceph v2" ]; }
wait_for 30 mon_answers ||
  fail "the monitor does not answer on 127.0.0.1:3300 (forwarded to $CEPH_FWD:3300): '$(banner 127.0.0.1 3300)'"
echo "ok: the monitor answers through the forwarder ('ceph v2')"
check "the host itself (10.0.2.2:3300) is not reachable (restrict=on)" \
  test -z "$(banner 10.0.2.2 3300)"
check "a port not forwarded ($CEPH_FWD:22) is not reachable" test -z "$(banner "$CEPH_FWD" 22)"
report "rbd: network + forwarders up in $(secs_since "$t0") s"

# ---- the disks ---------------------------------------------------------------------------
XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
  > /tmp/serve-rbd.log 2>&1 &
serve_pid=$!
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve-rbd.log)"

# The raw disk's requests have a deadline of 8 s (the default is 30): the last step holds
# one past it.
DEADLINE=8
raw_name="rbd:rbd/$RBD_RAW:conf=/lab/ceph/ceph.conf:id=$CEPH_USER:xdisk_deadline=$DEADLINE"
qcow_name="rbd:rbd/$RBD_QCOW2:id=$CEPH_USER:mon_host=127.0.0.1\\:3300:key=$CEPH_KEY"
# Both at once (librbd's start-up costs seconds of CPU under TCG; dom0 has two vCPUs), with
# explicit device numbers (two `--devid auto` at once could pick the same one).
dev=/dev/xvda dev2=/dev/xvdb
devs="$dev $dev2"
t0=$(up)
(xdisk attach --format raw --direct-io --devid xvda --control "$sock" --timeout 120 "$raw_name" >/dev/null 2>/tmp/attach1.err
 echo $? > /tmp/attach1.rc; secs_since "$t0" > /tmp/attach1.t) &
p1=$!
(xdisk attach --format qcow2 --devid xvdb --control "$sock" --timeout 120 "$qcow_name" >/dev/null 2>/tmp/attach2.err
 echo $? > /tmp/attach2.rc; secs_since "$t0" > /tmp/attach2.t) &
p2=$!
# (By pid: a bare `wait` would wait for the forwarders and the daemon too.)
wait $p1 $p2
[ "$(cat /tmp/attach1.rc)" = 0 ] || fail "attach $raw_name: $(cat /tmp/attach1.err) / $(tail -3 /tmp/serve-rbd.log)"
[ "$(cat /tmp/attach2.rc)" = 0 ] ||
  fail "attach rbd:rbd/$RBD_QCOW2 (qcow2, key in the name): $(sed 's/key=[^:]*/key=.../' /tmp/attach2.err) / $(tail -3 /tmp/serve-rbd.log)"
t_raw=$(cat /tmp/attach1.t) t_qcow=$(cat /tmp/attach2.t)
echo "raw rbd:rbd/$RBD_RAW attached as $dev in ${t_raw}s, qcow2 rbd:rbd/$RBD_QCOW2 as $dev2 in ${t_qcow}s (at once)"
report "rbd: attach (both at once) raw ${t_raw} s, qcow2 ${t_qcow} s"
for d in $dev $dev2; do
  check "$d is a block device" test -b "$d"
  check "$d has the image's size (64 MiB)" test "$(blockdev --getsize64 "$d")" = $((64 * MiB))
done
params=$(xenstore-read /local/domain/0/backend/xdisk/0/51712/params) || fail "no params for $dev in xenstore"
echo "params of $dev: $params"
case $params in aio:rbd:rbd/"$RBD_RAW":*) echo "ok: params names the RBD image" ;; *) fail "params: $params" ;; esac

# write_check DEV SEEK_MIB LABEL: the 2 MiB pattern at SEEK_MIB (32 O_DIRECT writes of 4 KiB,
# then 15 of 128 KiB, then fsync = flush), read back with O_DIRECT (1 MiB requests).
write_check() {
  d=$1 seek=$2 label=$3
  t=$(up)
  dd if="$W/pattern" of="$d" bs=4k count=32 seek=$((seek * 256)) oflag=direct conv=notrunc 2>/dev/null ||
    fail "4 KiB O_DIRECT writes to $d ($label)"
  w4=$(secs_since "$t")
  t=$(up)
  dd if="$W/pattern" of="$d" bs=128k skip=1 seek=$((seek * 8 + 1)) count=15 oflag=direct conv=notrunc,fsync 2>/dev/null ||
    fail "128 KiB O_DIRECT writes to $d ($label)"
  w=$(secs_since "$t")
  t=$(up)
  dd if="$d" of="$W/back-$seek" bs=1M skip="$seek" count=2 iflag=direct 2>/dev/null || fail "reading $d ($label)"
  r=$(secs_since "$t")
  check "the pattern reads back through $d ($label)" cmp "$W/pattern" "$W/back-$seek"
  report "rbd: $label: O_DIRECT writes: 32 x 4k in ${w4} s, 15 x 128k + flush in ${w} s; 2 x 1M read back in ${r} s"
}
# Both disks at once, too.
t0=$(up)
(write_check "$dev" 4 "raw in RBD" > /tmp/wc1.out 2>&1; echo $? > /tmp/wc1.rc) &
p1=$!
(write_check "$dev2" 1 "qcow2 in RBD" > /tmp/wc2.out 2>&1; echo $? > /tmp/wc2.rc) &
p2=$!
wait $p1 $p2
cat /tmp/wc1.out /tmp/wc2.out
for i in 1 2; do
  [ "$(cat /tmp/wc$i.rc)" = 0 ] || fail "$(sed -n 's/^why: //p' /tmp/wc$i.out | tail -1)"
done
report "rbd: both disks written and read back in $(secs_since "$t0") s"

xdisk stat --json --control "$sock" > /tmp/stat-rbd.json || fail "xdisk stat --json"
xdisk stat --control "$sock" | sed 's/key=[^: ]*/key=.../g'
check "stat counts writes" grep -q '"wr_req": [1-9]' /tmp/stat-rbd.json
check "stat counts flushes" grep -q '"f_req": [1-9]' /tmp/stat-rbd.json
check "no request failed" sh -c "! grep -q '\"errors\": [1-9]' /tmp/stat-rbd.json"
check "the key is not shown by xdisk stat" sh -c "! grep -qF '$CEPH_KEY' /tmp/stat-rbd.json"
check "blkfront saw no failed operation" sh -c "! dmesg | grep -q 'op failed'"

# ---- a request the cluster holds past its deadline -----------------------------------------
# librbd works on dom0's granted pages directly (no bounce buffer). With the forwarders
# stopped (SIGSTOP: the cluster stops answering, as a storage network that went away) librbd
# keeps a read; xdisk answers it at its deadline with an error, after taking the guest's pages
# out of librbd's reach (an anonymous mmap over them, which makes gntdev unmap the grants).
# blkfront checks that the backend unmapped a request's grants when it is answered (Linux
# since XSA-396: "backed has not unmapped grant", and the disk is failed). When the forwarders
# go on, librbd's late completion lands in xdisk's private pages and the disk works on.
rm -f /tmp/held.rc /tmp/held.t /tmp/held.err
# Every socat: the listeners and the children they forked for librbd's open connections.
socats=$(pidof socat) || fail "no socat running"
# shellcheck disable=SC2086
kill -STOP $socats
t0=$(up)
(dd if="$dev" of=/dev/null bs=64k count=1 skip=100 iflag=direct 2>/tmp/held.err
 echo $? > /tmp/held.rc; secs_since "$t0" > /tmp/held.t) &
p1=$!
wait_for $((DEADLINE * 5)) test -f /tmp/held.t
answered=$?
# shellcheck disable=SC2086
kill -CONT $socats
[ "$answered" = 0 ] ||
  fail "a read the cluster held was not answered within $((DEADLINE * 5)) s (deadline $DEADLINE s): $(tail -5 /tmp/serve-rbd.log)"
wait $p1
held=$(cat /tmp/held.t)
echo "the held read: exit $(cat /tmp/held.rc) after $held s: $(tail -1 /tmp/held.err)"
check "the held read failed (EIO)" test "$(cat /tmp/held.rc)" != 0
check "it was answered at its deadline, not before ($held s, deadline $DEADLINE s)" \
  awk -v h="$held" -v d="$DEADLINE" 'BEGIN { exit !(h >= d - 0.5) }'
check "blkfront found the request's grants unmapped when answered" \
  sh -c "! dmesg | grep -q 'not unmapped grant'"
check "xdisk detached the request's pages (librbd had them, no bounce buffer)" \
  grep -q "guest pages detached" /tmp/serve-rbd.log
report "rbd: a read held by the cluster answered with EIO after $held s (deadline $DEADLINE s), its pages detached"
rm -f "$W/back-4"
dd if="$dev" of="$W/back-4" bs=1M skip=4 count=2 iflag=direct 2>/dev/null ||
  fail "reading $dev after the held read: $(tail -3 /tmp/serve-rbd.log)"
check "the disk reads the pattern again after the held read" cmp "$W/pattern" "$W/back-4"
xdisk stat --json --control "$sock" > /tmp/stat-rbd.json || fail "xdisk stat --json"
check "stat counts the held read as an error" grep -q '"errors": 1' /tmp/stat-rbd.json

for d in $dev $dev2; do
  xdisk detach "$d" --control "$sock" || fail "detach $d: $(tail -3 /tmp/serve-rbd.log)"
done
devs=''
wait_for 10 sh -c "! test -b $dev && ! test -b $dev2" || fail "device nodes still there"
check "no backend nodes left" sh -c "! xenstore-exists /local/domain/0/backend/xdisk"
check "no frontend nodes left" sh -c "! xenstore-ls /local/domain/0/device/vbd 2>/dev/null | grep -q ."
stop_daemon "$serve_pid" /tmp/serve-rbd.log
serve_pid=''
