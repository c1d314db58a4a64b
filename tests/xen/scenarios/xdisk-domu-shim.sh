#!/bin/sh
# A PV domU whose disk is backendtype=qdisk, with device_model_override pointing at
# `xdisk qemu-shim`: libxl starts the shim as the domain's device model, the shim serves the
# disk, the guest's xen-blkfront reads and writes it, a second disk is hot-plugged with
# `xl block-attach` and read; after the guest powers off, libxl kills the shim and nothing is
# left in xenstore.
# The guest kernel is Debian's (tests/xen/run puts its vmlinuz in dom0's /usr/local/bin).
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
K=$(ls /usr/local/bin/vmlinuz-* /usr/local/bin/vmlinux 2>/dev/null | head -1)
[ -f "$K" ] || fail "no guest kernel in /usr/local/bin (tests/xen/run adds it for xdisk-domu-* scenarios)"

# The guest's initramfs, made here from dom0's busybox and modules.
D=/tmp/domu-root
rm -rf "$D"
mkdir -p "$D/bin" "$D/dev" "$D/proc" "$D/sys" "$D/lib" "$D/tmp"
cp /bin/busybox "$D/bin/"
for a in sh mount modprobe md5sum dd sync poweroff usleep cut cat echo head; do
  ln -s busybox "$D/bin/$a"
done
cp -a /lib/modules "$D/lib/"
cat > "$D/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "DOMU: init"
modprobe xen-blkfront
i=0; while [ ! -b /dev/xvda ] && [ $i -lt 200 ]; do usleep 100000; i=$((i+1)); done
if [ -b /dev/xvda ]; then
  echo "DOMU: xvda md5=$(dd if=/dev/xvda bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
  echo "DOMU-WROTE-THIS" > /tmp/m
  dd if=/tmp/m of=/dev/xvda bs=512 seek=4096 conv=fsync 2>/dev/null && echo "DOMU: wrote"
else
  echo "DOMU: no xvda"
fi
# A disk hot-plugged by dom0 (xl block-attach) while the guest runs.
i=0; while [ ! -b /dev/xvdb ] && [ $i -lt 900 ]; do usleep 100000; i=$((i+1)); done
if [ -b /dev/xvdb ]; then
  echo "DOMU: xvdb md5=$(dd if=/dev/xvdb bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
else
  echo "DOMU: no xvdb"
fi
echo "DOMU: poweroff"
poweroff -f
INIT
chmod +x "$D/init"
(cd "$D" && find . | cpio -o -H newc 2>/dev/null) > /tmp/domu.cpio || fail "guest initramfs"

# The disk: 1 MiB of random data at the start of a 16 MiB qcow2 image.
dd if=/dev/urandom of=/tmp/base.raw bs=1M count=1 2>/dev/null
dd if=/dev/zero of=/tmp/base.raw bs=1M seek=16 count=0 2>/dev/null
want=$(dd if=/tmp/base.raw bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
img=$LAB_DATA/domu.qcow2
rm -f "$img"
xdisk img convert -f raw -O qcow2 /tmp/base.raw "$img" || fail "xdisk img convert"

cat > /tmp/xdisk-qemu-shim <<'SHIM'
#!/bin/sh
XDISK_LOG=info exec xdisk qemu-shim -- "$@"
SHIM
chmod +x /tmp/xdisk-qemu-shim
cat > /tmp/domu1.cfg <<CFG
name = "domu1"
type = "pv"
kernel = "$K"
ramdisk = "/tmp/domu.cpio"
extra = "console=hvc0 loglevel=4"
memory = 256
vcpus = 1
disk = [ 'format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=$img' ]
device_model_version = "qemu-xen"
device_model_override = "/tmp/xdisk-qemu-shim"
on_poweroff = "destroy"
on_crash = "destroy"
CFG
xl -vvv create /tmp/domu1.cfg > /tmp/xl.log 2>&1
rc=$?
if [ $rc != 0 ]; then
  grep -v '^domainbuilder' /tmp/xl.log | tail -60
  echo "--- device model log"
  tail -30 /var/log/xen/qemu-dm-domu1.log 2>/dev/null
  fail "xl create exited with $rc: $(grep -iE 'error|fault' /tmp/xl.log | tail -2 | tr '\n' ' ')"
fi
grep -v '^domainbuilder' /tmp/xl.log | tail -15
domid=$(xl domid domu1)
echo "domU is domain $domid"
dmpid=$(xenstore-read "/local/domain/$domid/image/device-model-pid" 2>/dev/null)
echo "device model pid $dmpid: $(tr '\0' ' ' < /proc/"$dmpid"/cmdline 2>/dev/null)"
check "device-model state running" test "$(xenstore-read /local/domain/0/device-model/"$domid"/state)" = running
xenstore-ls -f "/local/domain/0/backend/qdisk/$domid" 2>&1 | head -30

if ! wait_for 200 grep -aq "DOMU: wrote" /var/log/xen/console/guest-domu1.log; then
  echo "--- guest console (tail)"
  tail -25 /var/log/xen/console/guest-domu1.log
  xl list
  fail "the guest did not write xvda: $(grep -a DOMU /var/log/xen/console/guest-domu1.log | tail -2)"
fi
# Hotplug: a second, read-only raw disk, served by the running shim.
dd if=/dev/urandom of=/tmp/hot.raw bs=1M count=1 2>/dev/null
dd if=/dev/zero of=/tmp/hot.raw bs=1M seek=8 count=0 2>/dev/null
want_hot=$(dd if=/tmp/hot.raw bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
cp /tmp/hot.raw "$LAB_DATA/hot.raw"
xl block-attach domu1 "format=raw,vdev=xvdb,access=ro,backendtype=qdisk,target=$LAB_DATA/hot.raw" ||
  fail "xl block-attach"
wait_for 180 sh -c "! xl list domu1 >/dev/null 2>&1" || fail "domU still running after 180 s"
echo "--- guest console"
grep -a 'DOMU' /var/log/xen/console/guest-domu1.log
echo "--- device model log"
tail -20 /var/log/xen/qemu-dm-domu1.log 2>/dev/null
grep -aq "DOMU: xvda md5=$want" /var/log/xen/console/guest-domu1.log || fail "the guest did not read the disk's data"
grep -aq "DOMU: wrote" /var/log/xen/console/guest-domu1.log || fail "the guest could not write"
grep -aq "DOMU: xvdb md5=$want_hot" /var/log/xen/console/guest-domu1.log ||
  fail "the guest did not read the hot-plugged disk"
wait_for 20 sh -c "! kill -0 $dmpid 2>/dev/null" || fail "the shim (pid $dmpid) still runs after the domain died"
check "no qdisk nodes left for the domain" sh -c "! xenstore-exists /local/domain/0/backend/qdisk/$domid"
xdisk img check "$img" || fail "image not clean"
xdisk img convert -O raw "$img" /tmp/after.raw || fail "convert back"
got=$(dd if=/tmp/after.raw bs=512 skip=4096 count=1 2>/dev/null | head -c 15)
check "the guest's write is in the image" test "$got" = DOMU-WROTE-THIS
