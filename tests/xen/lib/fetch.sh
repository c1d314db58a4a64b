# Sourced by tests/xen/run: host tools, the Xen and kernel packages, and the boot images.
# Sets XV (Xen version), KVER (kernel release), ROOT (unpacked packages), XEN_ELF, VMLINUX.

lab_log() { echo "xen-lab: $*" >&2; }

# as_root CMD...: runs CMD as root (directly, or through sudo).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

APT_UPDATED=
apt_update_once() {
  [ -n "$APT_UPDATED" ] && return 0
  APT_UPDATED=1
  lab_log "apt-get update"
  as_root apt-get update -qq >/dev/null
}

# Installs the host tools the lab needs through the project's one installer (scripts/setup:
# one apt transaction, QEMU and qemu-img of the same release, re-checked afterwards). QEMU's
# absence after that is a skip, not a failure.
ensure_host_tools() {
  export PATH="$PATH:/sbin:/usr/sbin"
  "$REPO/scripts/setup" >&2 || lab_log "scripts/setup failed; the checks below say what is missing"
}

# Whether QEMU can run here at all (prints the reason when not).
qemu_usable() {
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "qemu-system-x86_64 is not installed and could not be installed"
    return 1
  fi
  if ! qemu-system-x86_64 -version >/dev/null 2>&1; then
    echo "qemu-system-x86_64 does not run: $(qemu-system-x86_64 -version 2>&1 | head -1)"
    return 1
  fi
  if ! qemu-system-x86_64 -accel help 2>/dev/null | grep -qx tcg; then
    echo "qemu-system-x86_64 has no TCG accelerator"
    return 1
  fi
}

# download_debs PKG...: apt-get downloads the packages into $CACHE/debs (an apt-get update and
# a retry if the first try fails); prints why and fails if it cannot.
download_debs() {
  [ $# -gt 0 ] || return 0
  lab_log "downloading $*"
  (cd "$CACHE/debs" && apt-get download -q "$@" >/dev/null 2>"$CACHE/debs/download.err") && return 0
  apt_update_once || true
  (cd "$CACHE/debs" && apt-get download -q "$@" >/dev/null 2>"$CACHE/debs/download.err") && return 0
  echo "apt-get download $* failed: $(tail -3 "$CACHE/debs/download.err" | tr '\n' ' ')"
  return 1
}

# apt_dep PKG PATTERN: the first dependency of PKG matching PATTERN (an awk regex).
apt_dep() {
  apt-cache depends "$1" 2>/dev/null | awk -v re="$2" '$1 == "Depends:" && $2 ~ re { print $2; exit }'
}

# Resolves, downloads (into $CACHE/debs, kept between runs) and unpacks the packages, holding
# a lock on the cache (several worktrees may run the lab at once).
fetch_packages() {
  local rc
  mkdir -p "$CACHE"
  exec 9> "$CACHE/.lock"
  flock 9 || true
  fetch_packages_locked
  rc=$?
  exec 9>&-
  return $rc
}

fetch_packages_locked() {
  local kpkg xpkg
  kpkg=$(apt_dep linux-image-amd64 '^linux-image-[0-9]')
  xpkg=$(apt_dep xen-system-amd64 '^xen-hypervisor-[0-9]')
  if [ -z "$kpkg" ] || [ -z "$xpkg" ]; then
    apt_update_once || true
    kpkg=$(apt_dep linux-image-amd64 '^linux-image-[0-9]')
    xpkg=$(apt_dep xen-system-amd64 '^xen-hypervisor-[0-9]')
  fi
  if [ -z "$kpkg" ]; then
    # Offline: reuse whatever kernel the cache has.
    kpkg=$(ls "$CACHE"/debs/linux-image-[0-9]*_amd64.deb 2>/dev/null | sed 's|.*/||; s|_.*||' | sort -V | tail -1)
  fi
  [ -n "$xpkg" ] || xpkg=$(ls "$CACHE"/debs/xen-hypervisor-[0-9]*.deb 2>/dev/null | sed 's|.*/||; s|_.*||' | tail -1)
  [ -n "$kpkg" ] && [ -n "$xpkg" ] || { echo "cannot resolve the kernel/Xen package names (apt-cache)"; return 1; }
  XV=${xpkg#xen-hypervisor-}; XV=${XV%-amd64}
  KVER=${kpkg#linux-image-}
  local pkgs=("$xpkg" "xen-utils-$XV" xen-utils-common xenstore-utils libxencall1 libxenevtchn1
    libxenforeignmemory1 libxengnttab1 "libxenmisc$XV" libxenstore4 libxentoollog1 libyajl2 libxenhypfs1
    libxendevicemodel1 libxentoolcore1 "$kpkg")
  mkdir -p "$CACHE/debs"
  local p missing=()
  for p in "${pkgs[@]}"; do
    compgen -G "$CACHE/debs/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  download_debs "${missing[@]}" || return 1
  ROOT="$CACHE/root-xen$XV-$KVER"
  local stamp debs=()
  for p in "${pkgs[@]}"; do debs+=("$(ls "$CACHE"/debs/"${p}"_*.deb | sort -V | tail -1)"); done
  stamp=$(printf '%s\n' "${debs[@]}" | xargs -n1 basename)
  if [ "$(cat "$ROOT/.stamp" 2>/dev/null)" != "$stamp" ]; then
    lab_log "unpacking ${#debs[@]} packages into $ROOT"
    rm -rf "$ROOT"; mkdir -p "$ROOT"
    for p in "${debs[@]}"; do dpkg-deb -x "$p" "$ROOT" || { echo "dpkg-deb -x $p failed"; return 1; }; done
    # The package leaves modules.dep to its postinst: make it here.
    depmod -b "$ROOT" "$KVER" || { echo "depmod -b $ROOT $KVER failed"; return 1; }
    echo "$stamp" > "$ROOT/.stamp"
  fi
  # Boot images: QEMU's multiboot loader wants Xen's ELF uncompressed, and decompressing the
  # kernel or the initramfs under TCG costs many seconds, so both go in uncompressed.
  XEN_ELF="$ROOT/.boot/xen"
  VMLINUX="$ROOT/.boot/vmlinux"
  if [ ! -s "$XEN_ELF" ] || [ ! -s "$VMLINUX" ]; then
    mkdir -p "$ROOT/.boot"
    zcat "$ROOT/boot/xen-$XV-amd64.gz" > "$XEN_ELF.tmp" || { echo "no $ROOT/boot/xen-$XV-amd64.gz"; return 1; }
    local off
    off=$(LC_ALL=C grep -abo -m1 $'\xfd7zXZ' "$ROOT/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1)
    [ -n "$off" ] || { echo "no xz payload in vmlinuz-$KVER"; return 1; }
    tail -c +"$((off + 1))" "$ROOT/boot/vmlinuz-$KVER" | xz -dc --single-stream > "$VMLINUX.tmp" 2>/dev/null
    file "$VMLINUX.tmp" | grep -q 'ELF 64-bit' || { echo "could not extract vmlinux from vmlinuz-$KVER"; return 1; }
    mv "$XEN_ELF.tmp" "$XEN_ELF"; mv "$VMLINUX.tmp" "$VMLINUX"
  fi
}

# fetch_qemu_xen: Debian's qemu-system-xen (QEMU's Xen disk backend, qdisk, for the scenarios
# that compare against it) and those of its library dependencies that neither the host nor the
# Xen packages provide, downloaded into $CACHE/debs and unpacked into their own root (so the
# Xen root above stays as it is for runs that do not need QEMU). Sets QEMU_XEN_ROOT and
# QEMU_XEN (the binary). Run only when the plan needs it.
fetch_qemu_xen() {
  local rc
  mkdir -p "$CACHE"
  exec 9> "$CACHE/.lock"
  flock 9 || true
  fetch_qemu_xen_locked
  rc=$?
  exec 9>&-
  return $rc
}

fetch_qemu_xen_locked() {
  local pkgs=(qemu-system-xen) p missing=()
  # Library dependencies (not the firmware and data packages: a xenpv machine needs none).
  for p in $(apt-cache depends qemu-system-xen 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^lib/ { print $2 }'); do
    case $p in libxen* | libyajl*) continue ;; esac # from the Xen packages ($ROOT)
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || pkgs+=("$p")
  done
  mkdir -p "$CACHE/debs"
  for p in "${pkgs[@]}"; do
    compgen -G "$CACHE/debs/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  download_debs "${missing[@]}" || return 1
  local debs=() stamp
  for p in "${pkgs[@]}"; do debs+=("$(ls "$CACHE"/debs/"${p}"_*.deb | sort -V | tail -1)"); done
  stamp=$(printf '%s\n' "${debs[@]}" | xargs -n1 basename)
  QEMU_XEN_ROOT="$CACHE/root-qemu-xen"
  QEMU_XEN="$QEMU_XEN_ROOT/usr/libexec/xen-qemu-system-i386"
  if [ "$(cat "$QEMU_XEN_ROOT/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$QEMU_XEN" ]; then
    lab_log "unpacking ${#debs[@]} packages into $QEMU_XEN_ROOT"
    rm -rf "$QEMU_XEN_ROOT"; mkdir -p "$QEMU_XEN_ROOT"
    for p in "${debs[@]}"; do dpkg-deb -x "$p" "$QEMU_XEN_ROOT" || { echo "dpkg-deb -x $p failed"; return 1; }; done
    [ -x "$QEMU_XEN" ] || { echo "no xen-qemu-system-i386 in qemu-system-xen"; return 1; }
    echo "$stamp" > "$QEMU_XEN_ROOT/.stamp"
  fi
}
