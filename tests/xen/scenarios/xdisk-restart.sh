#!/bin/sh
# Edges of local attach, with dom0's xen-blkfront (Linux 6.1): detaching a disk that is held
# open succeeds (blkfront closes anyway; the open descriptor gets errors); a restart of the
# daemon closes its disks for good (blkfront stays Closed), and `xdisk detach` + `attach`
# bring the disk back.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
sock=/run/xdisk/control.sock
raw=$LAB_DATA/restart.raw
dd if=/dev/urandom of="$raw" bs=1M count=1 2>/dev/null
dd if=/dev/zero of="$raw" bs=1M count=0 seek=32 2>/dev/null
want=$(dd if="$raw" bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
pid=
start() {
  XDISK_LOG=info xdisk serve --platform=xen --backend-type xdisk --domain 0 --control "$sock" \
    >> /tmp/serve.log 2>&1 &
  pid=$!
  wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"
}
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; }
trap stop EXIT
start
dev=$(xdisk attach "$raw" --format raw --timeout 60) || fail "attach"
exec 3<"$dev"
xdisk detach "$dev" --timeout 10 || fail "detach of an open disk"
exec 3<&-
check "no nodes left after detaching an open disk" sh -c "! xenstore-exists /local/domain/0/backend/xdisk"

dev=$(xdisk attach "$raw" --format raw --timeout 60) || fail "attach again"
kill -TERM "$pid"
wait "$pid" || fail "xdisk serve exited with $?"
check "the backend closed" test "$(xenstore-read /local/domain/0/backend/xdisk/0/51712/state)" = 6
start
xdisk detach "$dev" --timeout 10 || fail "detach after the restart"
dev=$(xdisk attach "$raw" --format raw --timeout 60) || fail "attach after the restart"
got=$(dd if="$dev" bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
check "data read after the restart" test "$got" = "$want"
xdisk detach "$dev" --timeout 10 || fail "final detach"
trap - EXIT
kill -TERM "$pid"
wait "$pid" || fail "xdisk serve exited with $?"
