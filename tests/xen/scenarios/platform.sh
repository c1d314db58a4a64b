#!/bin/sh
# The real-Xen platform of xdisk-xen (gntalloc -> gntdev maps, grant copy, unmap notify, evtchn).
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
xdisk xen-selftest platform --data-dir "$LAB_DATA" > /tmp/selftest.log 2>&1
rc=$?
cat /tmp/selftest.log
[ $rc = 0 ] || fail "xdisk xen-selftest platform: $(tail -1 /tmp/selftest.log)"
