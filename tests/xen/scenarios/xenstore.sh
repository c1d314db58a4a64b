#!/bin/sh
# The Rust xenstore client against the C xenstored, over its socket and /dev/xen/xenbus; the
# C tools then read what it left.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
xdisk xen-selftest xenstore --xenstore /run/xenstored/socket --xenstore /dev/xen/xenbus \
  > /tmp/selftest.log 2>&1
rc=$?
cat /tmp/selftest.log
[ $rc = 0 ] || fail "xdisk xen-selftest xenstore: $(tail -1 /tmp/selftest.log)"
for t in t0 t1; do
  check "C xenstore-read sees result-$t" test "$(xenstore-read /local/domain/0/xdisk-selftest/result-$t)" = PASS
done
xenstore-rm /local/domain/0/xdisk-selftest
