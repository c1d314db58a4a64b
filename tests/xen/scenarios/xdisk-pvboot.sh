#!/bin/sh
# The original promise: a PV guest boots from its qcow2 disk with xdisk's pygrub.
#
# The guest disk (made on the host by tests/xen/lib/pvboot.sh: MBR, ext4 root, Debian's
# kernel, a tiny initramfs that prints its command line, a Debian-shaped grub.cfg whose
# default is the second entry, compressed qcow2) is on the data disk. First `xdisk boot` reads
# it directly (-n, then extracting). Then the real flow: `xl create` of a PV guest with
# `bootloader = "/usr/lib/xdisk/pygrub"` and disk 'format=qcow2,...,backendtype=qdisk':
# libxl local-attaches the qcow2 in dom0 through `xdisk serve` (dom0's qdisk backend), runs
# the bootloader on the /dev/xvdX it got (interactive on libxl's pty: the menu times out
# after grub.cfg's 2 s), detaches, builds the guest from the extracted kernel and ramdisk, and
# starts the guest's disk backend (`xdisk qemu-shim`). The guest's console must show the
# second entry's command line; afterwards nothing is left (no local-attach nodes, no
# bootloader files, the shim gone) and the image is unchanged (qemu-img check clean).
# The boot is tried twice at most (domU boots under TCG are the slowest part of the lab).
# lab-needs: pvboot-image
# shellcheck source=../dom0/lib.sh
. /lab/lib.sh
img=$LAB_DATA/pvboot.qcow2
[ -f "$img" ] || fail "no $img on the data disk (tests/xen/run builds it for lab-needs: pvboot-image)"
want="console=hvc0 quiet xdisk.marker=second"

# 1. Direct: xdisk boot on the qcow2 file.
sum0=$(md5sum < "$img" | cut -d' ' -f1)
out=$(xdisk boot -q -n "$img" 2>&1) || fail "xdisk boot -n: $out"
echo "xdisk boot -q -n: $out"
case $out in *"xdisk.marker=second"*) ;; *) fail "xdisk boot picked the wrong entry: $out" ;; esac
mkdir -p /tmp/bootout
t0=$(up)
out=$(xdisk boot -q --output-format=simple --output-directory=/tmp/bootout "$img" 2>&1) || fail "xdisk boot: $out"
report "xdisk boot on the compressed qcow2 (extracting a $(($(wc -c < "$(echo "$out" | sed -n 's/^kernel //p')") / 1024)) KiB kernel): $(secs_since "$t0") s"
k=$(echo "$out" | sed -n 's/^kernel //p')
[ -s "$k" ] || fail "no extracted kernel: $out"
check "the kernel file is mode 0600" test "$(stat -c %a "$k")" = 600
l=$(xdisk boot -q -l "$img" 2>&1) || fail "xdisk boot -l: $l"
check "three entries listed" test "$(echo "$l" | grep -c '^title: ')" = 3
rm -rf /tmp/bootout

# 2. The real flow through libxl.
sock=/run/xdisk/control.sock
mkdir -p /run/xdisk /usr/lib/xdisk
ln -sf "$(command -v xdisk)" /usr/lib/xdisk/pygrub
XDISK_LOG=info xdisk serve --platform=xen --backend-type qdisk --backend-type xdisk --domain 0 \
  --control "$sock" --foreground > /tmp/serve.log 2>&1 &
spid=$!
stop() { kill "$spid" 2>/dev/null; }
trap stop EXIT
wait_for 15 test -S "$sock" || fail "no control socket: $(tail -3 /tmp/serve.log)"
# The same image through a local attach (what libxl hands pygrub): xdisk boot on /dev/xvdX.
dev=$(xdisk attach "$img" --format qcow2 --control "$sock" --timeout 60 2>/tmp/attach.err) ||
  fail "xdisk attach: $(cat /tmp/attach.err)"
mkdir -p /tmp/bootout
t0=$(up)
out=$(xdisk boot -q --output-format=simple --output-directory=/tmp/bootout "$dev" 2>&1) || fail "xdisk boot $dev: $out"
report "xdisk boot on the local attach $dev (blkfront -> xdisk serve -> qcow2): $(secs_since "$t0") s"
case $out in *"xdisk.marker=second"*) ;; *) fail "xdisk boot on $dev: wrong entry: $out" ;; esac
rm -rf /tmp/bootout
xdisk detach "$(basename "$dev")" --control "$sock" || fail "detach $dev"
cat > /tmp/xdisk-qemu-shim <<'SHIM'
#!/bin/sh
XDISK_LOG=info exec xdisk qemu-shim -- "$@"
SHIM
chmod +x /tmp/xdisk-qemu-shim
cat > /tmp/pvboot.cfg <<CFG
name = "pvboot"
type = "pv"
bootloader = "/usr/lib/xdisk/pygrub"
memory = 192
vcpus = 1
disk = [ 'format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=$img' ]
device_model_version = "qemu-xen"
device_model_override = "/tmp/xdisk-qemu-shim"
on_poweroff = "destroy"
on_crash = "destroy"
CFG
con=/var/log/xen/console/guest-pvboot.log
booted=0
for try in 1 2; do
  rm -f "$con"
  t0=$(up)
  if ! xl -vvv create /tmp/pvboot.cfg > /tmp/xl.log 2>&1; then
    echo "--- xl create (try $try) failed"
    grep -v '^domainbuilder' /tmp/xl.log | grep -iE 'bootloader|error|fail|attach' | tail -30
    tail -15 /tmp/serve.log
    xl destroy pvboot 2>/dev/null
    continue
  fi
  report "xl create with bootloader=/usr/lib/xdisk/pygrub: $(secs_since "$t0") s (local attach, bootloader, domain build)"
  grep -iE 'bootloader' /tmp/xl.log | grep -v '^domainbuilder' | tail -8
  if wait_for 240 grep -aq "PVBOOT: done" "$con"; then
    booted=1
    report "guest console: $(grep -a 'PVBOOT: cmdline' "$con" | tr -d '\r' | head -1) after $(secs_since "$t0") s"
    break
  fi
  echo "--- guest console (try $try, tail)"
  tail -30 "$con" 2>/dev/null
  xl list
  xl destroy pvboot 2>/dev/null
done
[ $booted = 1 ] || fail "the guest did not boot from its qcow2 disk (2 tries): $(grep -iE 'bootloader|error' /tmp/xl.log | tail -2 | tr '\n' ' ')"
grep -a 'PVBOOT' "$con"
line=$(grep -a 'PVBOOT: cmdline=' "$con" | tr -d '\r' | head -1)
case $line in *"$want"*) echo "ok: the default (second) entry's command line" ;; *) fail "wrong command line: $line" ;; esac
case $line in *"xdisk.marker=first"*) fail "the first entry booted: $line" ;; esac
wait_for 60 sh -c "! xl list pvboot >/dev/null 2>&1" || fail "the guest is still there after it powered off"
wait_for 20 sh -c "! pgrep -f 'xdisk qemu-shim' >/dev/null" || fail "the shim still runs after the domain died"
check "no local-attach disk left in dom0 (backend/qdisk/0)" sh -c "[ -z \"\$(xenstore-ls /local/domain/0/backend/qdisk/0 2>/dev/null)\" ]"
check "no bootloader files left" sh -c "! ls /var/run/xen/bootloader.* 2>/dev/null | grep -q ."
stop; wait "$spid" 2>/dev/null; trap - EXIT
qemu-img check -q "$img" || fail "qemu-img check of the guest image"
check "the image is unchanged" test "$(md5sum < "$img" | cut -d' ' -f1)" = "$sum0"
