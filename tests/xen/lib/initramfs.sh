# Sourced by tests/xen/run: builds dom0's initramfs (an uncompressed newc cpio) from the
# unpacked packages ($ROOT, $KVER, $XV), busybox, the xdisk binaries and tests/xen/{dom0,scenarios}.
# A scenario asks for more (fio, Debian's qemu-system-xen, ...) with a line
# `# lab-needs: WORD...` in its script; that goes in only when the plan has the scenario
# (see add_need).

# Kernel modules dom0 loads (dependencies are added from modules.dep): the Xen devices and
# backends, loop, and virtio-blk + ext4 for the data disk (tmpfs has no O_DIRECT).
DOM0_MODULES="xenfs xen-privcmd xen-evtchn xen-gntdev xen-gntalloc xen-blkback xen-blkfront loop
  virtio_pci virtio_blk ext4 crc32c_generic crc32c-intel"

# copy_libs DEST BINARY...: the shared libraries BINARY needs (ldd), from the unpacked packages
# or the host, at the same paths under DEST.
copy_libs() {
  local dest=$1 b l d
  shift
  for b in "$@"; do
    LD_LIBRARY_PATH="$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/usr/lib/xen-$XV/lib/x86_64-linux-gnu${QEMU_XEN_ROOT:+:$QEMU_XEN_ROOT/usr/lib/x86_64-linux-gnu}" \
      ldd "$b" 2>/dev/null |
      awk '/=> \// { print $3 } /^\t\/lib64/ { print $1 } /not found/ { print "MISSING " $1 }' |
      while read -r l rest; do
        if [ "$l" = MISSING ]; then lab_log "warning: $b needs $rest, not found"; continue; fi
        d=${l#"$ROOT"}
        [ -n "${QEMU_XEN_ROOT:-}" ] && d=${d#"$QEMU_XEN_ROOT"}
        [ -e "$dest$d" ] && continue
        mkdir -p "$dest$(dirname "$d")" && cp -L "$l" "$dest$d"
      done
  done
}

# add_modules DEST NAME...: the modules and everything they depend on, then depmod.
add_modules() {
  local dest=$1 m f dep
  shift
  local mdir="$ROOT/lib/modules/$KVER"
  for m in "$@"; do
    f=$(grep -E "/$m\.ko(\.[a-z]+)?:" "$mdir/modules.dep" | head -1)
    if [ -z "$f" ]; then
      grep -qE "/$m\.ko" "$mdir/modules.builtin" || lab_log "warning: module $m not found"
      continue
    fi
    for dep in ${f/:/}; do
      mkdir -p "$dest/lib/modules/$KVER/$(dirname "$dep")"
      cp "$mdir/$dep" "$dest/lib/modules/$KVER/$dep"
    done
  done
  cp "$mdir"/modules.builtin* "$mdir/modules.order" "$dest/lib/modules/$KVER/" 2>/dev/null
  depmod -b "$dest" "$KVER"
}

# build_initramfs OUT_CPIO PLAN_FILE XDISK_BIN [EXTRA_BIN...]
build_initramfs() {
  local out=$1 plan=$2 xdisk=$3
  shift 3
  local r="$OUT/dom0-root"
  rm -rf "$r"
  mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,run,tmp,var,data,usr/bin,usr/sbin,usr/local/bin,usr/lib/x86_64-linux-gnu,lab}
  ln -s usr/lib "$r/lib"; ln -s usr/lib "$r/lib64"; ln -s ../run "$r/var/run"; ln -s ../run/lock "$r/var/lock"
  cp /bin/busybox "$r/bin/busybox"
  local a
  for a in $(/bin/busybox --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
  cp -L /lib64/ld-linux-x86-64.so.2 "$r/usr/lib/ld-linux-x86-64.so.2"
  add_modules "$r" $DOM0_MODULES >/dev/null

  # Xen: all its tools and libraries (small), xenstore-* as links to the multi-call binary.
  mkdir -p "$r/usr/lib/xen-$XV"
  cp -a "$ROOT/usr/lib/xen-$XV/bin" "$ROOT/usr/lib/xen-$XV/lib" "$r/usr/lib/xen-$XV/"
  cp -a "$ROOT"/usr/lib/x86_64-linux-gnu/lib* "$r/usr/lib/x86_64-linux-gnu/"
  cp "$ROOT/usr/bin/xenstore" "$r/usr/bin/"
  for a in read write ls list rm exists chmod watch; do ln -s xenstore "$r/usr/bin/xenstore-$a"; done
  ln -s "../lib/xen-$XV/bin/xl" "$r/usr/sbin/xl" 2>/dev/null || true
  cp -a "$ROOT/etc/xen" "$r/etc/"
  # bash and flock for libxl's hotplug scripts; libgcc_s for xl (pthread_cancel).
  cp /usr/bin/bash /usr/bin/flock "$r/usr/bin/"
  ln -s ../usr/bin/bash "$r/bin/bash" # the scripts' #!/bin/bash (/bin is busybox's, not /usr/bin)
  cp -L "$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ { print $NF; exit }')" "$r/usr/lib/x86_64-linux-gnu/"
  copy_libs "$r" "$ROOT/usr/lib/xen-$XV/bin/"{xenstored,xen-init-dom0,xenconsoled,xl,libxl-save-helper} \
    "$ROOT/usr/bin/xenstore" /usr/bin/bash /usr/bin/flock
  echo "root:x:0:0:root:/root:/bin/sh" > "$r/etc/passwd"
  echo "root:x:0:" > "$r/etc/group"

  # xdisk and any extra binaries, stripped of debug info (the initramfs is loaded by QEMU).
  local b
  for b in "$xdisk" "$@"; do
    # Only ELF files are stripped (a guest kernel's bzImage is also a PE file strip would
    # rewrite).
    if command -v strip >/dev/null 2>&1 && [ "$(head -c 4 "$b" | od -A n -t x1 | tr -d ' ')" = 7f454c46 ]; then
      strip --strip-debug -o "$r/usr/local/bin/$(basename "$b")" "$b"
    else
      cp "$b" "$r/usr/local/bin/"
    fi
    copy_libs "$r" "$b"
  done

  # qemu-img, the oracle the scenarios check images with (the host's, with its libraries).
  if command -v qemu-img >/dev/null 2>&1; then
    cp "$(command -v qemu-img)" "$r/usr/bin/qemu-img"
    copy_libs "$r" "$(command -v qemu-img)"
  else
    lab_log "warning: no qemu-img on the host; scenarios that need it will fail"
  fi

  # What the planned scenarios ask for ("# lab-needs: ..." in their scripts), only then: the
  # comparison's fio and QEMU add ~100 MB that every other run would carry for nothing.
  local need
  for need in $(planned_needs "$plan"); do
    add_need "$r" "$need" || lab_log "warning: could not add $need to dom0; the scenarios that need it will fail"
  done

  # The lab itself: init, helpers, scenarios, the plan.
  cp "$HERE/dom0/init" "$r/init"
  cp "$HERE/dom0/lib.sh" "$r/lab/lib.sh"
  cp -a "$HERE/scenarios" "$r/lab/scenarios"
  cp "$plan" "$r/lab/plan"
  cp -a "$REPO/dist" "$r/lab/dist"
  chmod +x "$r/init" "$r"/lab/scenarios/*

  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out"
}

# planned_needs PLAN_FILE: the words of the "# lab-needs: WORD..." lines of the planned
# scenarios' scripts, each once.
planned_needs() {
  local name _
  while read -r name _; do
    case $name in '' | '#'*) continue ;; esac
    sed -n 's/^# lab-needs://p' "$HERE/scenarios/$name.sh" 2>/dev/null
  done < "$1" | tr ' ' '\n' | awk 'NF && !seen[$0]++'
}

# add_need DEST WORD: `ceph` is the Ceph test cluster on the host and dom0's way to it
# (lib/ceph.sh); `qemu-xen` is Debian's qemu-system-xen (downloaded, see fetch_qemu_xen),
# at its Debian path /usr/libexec/xen-qemu-system-i386; any other word is a host command (e.g.
# fio, losetup from util-linux, strace), installed with apt if missing (package of the same
# name), copied to /usr/local/bin with its libraries. Busybox's sh runs its own applets before
# PATH: call a command that is also an applet (losetup) by its full path.
add_need() {
  local dest=$1 need=$2 b why
  if [ "$need" = pvboot-image ]; then
    # Not a dom0 binary: the guest disk goes onto the data disk (see boot_once).
    build_pvboot_image "$OUT/data-seed"
    return
  fi
  if [ "$need" = ceph ]; then
    # The cluster on the host, dom0's Ceph files and network (lib/ceph.sh); librbd and its
    # libraries are in already (xdisk links them); the NIC's driver.
    add_modules "$dest" virtio_net >/dev/null || return 1
    lab_ceph_prepare "$dest"
    return
  fi
  if [ "$need" = qemu-xen ]; then
    why=$(fetch_qemu_xen) || { lab_log "qemu-system-xen: $why"; return 1; }
    # fetch_qemu_xen ran in a subshell: set its variables here too.
    QEMU_XEN_ROOT="$CACHE/root-qemu-xen"
    QEMU_XEN="$QEMU_XEN_ROOT/usr/libexec/xen-qemu-system-i386"
    mkdir -p "$dest/usr/libexec"
    cp "$QEMU_XEN" "$dest/usr/libexec/"
    copy_libs "$dest" "$QEMU_XEN"
    return 0
  fi
  if ! b=$(command -v "$need"); then
    lab_log "installing $need"
    apt_update_once || true
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$need" >/dev/null
    b=$(command -v "$need") || return 1
  fi
  cp -L "$b" "$dest/usr/local/bin/$need"
  copy_libs "$dest" "$b"
}
