#!/bin/sh
# dom0 is up as Xen's control domain, xenstored answers, the Xen devices are there, and the
# data disk takes O_DIRECT.
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
[ -s /run/lab-setup-errors ] && fail "setup: $(tr '\n' ';' < /run/lab-setup-errors)"
check "dom0 is the control domain" grep -q control_d /proc/xen/capabilities
echo "xen $(cat /sys/hypervisor/version/major).$(cat /sys/hypervisor/version/minor)$(cat /sys/hypervisor/version/extra), kernel $(uname -r)"
for d in evtchn gntdev gntalloc privcmd xenbus xenbus_backend; do
  check "/dev/xen/$d" test -c /dev/xen/$d
done
check "xenstored running" kill -0 "$(cat /run/xenstored.pid)"
check "xenstore: domid of dom0" test "$(xenstore-read domid)" = 0
check "xenstore: dom0 name" test "$(xenstore-read /local/domain/0/name)" = Domain-0
check "xenstore: write/read" sh -c 'xenstore-write /lab/boot ok && test "$(xenstore-read /lab/boot)" = ok && xenstore-rm /lab/boot'
check "xl info" sh -c 'xl info > /tmp/xl-info 2>&1'
grep -E '^(xen_version|nr_cpus|total_memory|free_memory|xen_commandline)' /tmp/xl-info
check "xl list shows Domain-0" sh -c 'xl list 2>&1 | grep -q "^Domain-0 "'
check "data disk mounted" grep -q ' /data ext4 ' /proc/mounts
check "O_DIRECT on the data disk" dd if=/dev/zero of=/data/odirect bs=4096 count=16 oflag=direct
rm -f /data/odirect
