# shellcheck shell=bash
# Sourced by tests/xen/run: the host half of the scenarios that need the Ceph test cluster
# (`# lab-needs: ceph`, e.g. xdisk-rbd). Only when such a scenario is planned:
#   - tests/ceph/start (the throwaway single-node cluster on 127.0.0.1; reused if running),
#     in the background from the lab's start (lab_ceph_start_early);
#   - a Ceph user for dom0 (client.xdisk-lab-TAG, `profile rbd` on the pool) and the RBD images
#     the scenario serves, made with the host's xdisk (`xdisk img create ... rbd:...`);
#   - dom0's network: QEMU user networking with `restrict=on` (the guest reaches neither the
#     host nor anything beyond it) and one `guestfwd` per Ceph port: a guest connection to
#     $LAB_CEPH_FWD:PORT runs `socat STDIO TCP:127.0.0.1:PORT` on the host. So dom0 reaches the
#     cluster's own ports on the host's loopback and nothing else. The monitor and OSD
#     addresses in Ceph's maps are 127.0.0.1:PORT: the scenario forwards those in dom0 to
#     $LAB_CEPH_FWD:PORT (socat), with the same port numbers (msgr2 checks the address
#     it reached against the one the map names).
#   - after the run, the host checks what dom0 wrote (host_check_NAME: `rbd export`,
#     qemu-img's rbd driver), then removes the images and the user and stops the cluster if
#     the lab started it (on any exit: an EXIT trap).
# Sets LAB_QEMU_NET (QEMU's network options; `-nic none` unless a scenario needs Ceph).

# shellcheck disable=SC2034 # used by tests/xen/run
LAB_QEMU_NET=(-nic none)
LAB_CEPH_FWD=10.0.2.100
LAB_CEPH_CONF=
LAB_CEPH_STARTED=0
LAB_CEPH_USER=
LAB_CEPH_IMAGES=()
LAB_CEPH_PATTERN=
LAB_CEPH_START_PID=

# lab_ceph_start_early SCENARIO...: when one of them needs Ceph, starts tests/ceph/start in the
# background (~10 s, while the lab fetches, builds and packs); lab_ceph_prepare waits for it.
lab_ceph_start_early() {
  local name
  for name in "$@"; do
    grep -qE '^# lab-needs:.*\bceph\b' "$HERE/scenarios/$name.sh" 2>/dev/null || continue
    trap lab_ceph_cleanup EXIT
    "$REPO/tests/ceph/start" >"$OUT/ceph-start.out" 2>"$OUT/ceph-start.log" &
    LAB_CEPH_START_PID=$!
    return 0
  done
}

lab_ceph_() { timeout 30 ceph -c "$LAB_CEPH_CONF" --connect-timeout 15 "$@"; }

# lab_ceph_ports: the TCP ports clients connect to (the monitors' and the OSDs' public
# addresses, v2 and v1), one a line.
lab_ceph_ports() {
  {
    lab_ceph_ mon dump -f json 2>/dev/null
    echo
    lab_ceph_ osd dump -f json 2>/dev/null
  } | python3 -c '
import json, sys
ports = set()
for line in sys.stdin:
    if not line.strip():
        continue
    d = json.loads(line)
    for e in d.get("mons", []) + d.get("osds", []):
        for a in e["public_addrs"]["addrvec"]:
            host, port = a["addr"].rsplit(":", 1)
            if host != "127.0.0.1":
                sys.exit("not on loopback: " + a["addr"])
            ports.add(int(port))
print("\n".join(map(str, sorted(ports))))'
}

# lab_ceph_prepare DEST_ROOT: the cluster, the user, the images, dom0's files (under
# DEST_ROOT/lab/ceph) and QEMU's network options. Fails with a message on stderr.
lab_ceph_prepare() {
  local dest=$1 out t0 ports p fwd=() socat
  t0=$(date +%s.%N)
  trap lab_ceph_cleanup EXIT
  if ! command -v ceph >/dev/null || ! command -v rbd >/dev/null; then
    lab_log "ceph: no ceph/rbd commands (scripts/setup installs ceph-common)"
    return 1
  fi
  socat=$(command -v socat) || { lab_log "ceph: no socat on the host (scripts/setup installs it)"; return 1; }
  if [ -z "$LAB_CEPH_START_PID" ]; then
    "$REPO/tests/ceph/start" >"$OUT/ceph-start.out" 2>"$OUT/ceph-start.log" &
    LAB_CEPH_START_PID=$!
  fi
  if ! wait "$LAB_CEPH_START_PID"; then
    LAB_CEPH_START_PID=
    lab_log "ceph: tests/ceph/start failed: $(tail -3 "$OUT/ceph-start.log")"
    return 1
  fi
  LAB_CEPH_START_PID=
  out=$(tail -1 "$OUT/ceph-start.out")
  grep -q 'running already' "$OUT/ceph-start.log" || LAB_CEPH_STARTED=1
  LAB_CEPH_CONF=${out##*XDISK_CEPH_CONF=}
  ports=$(lab_ceph_ports) || { lab_log "ceph: reading the cluster's ports failed: $ports"; return 1; }
  [ -n "$ports" ] || { lab_log "ceph: no monitor or OSD port in the maps"; return 1; }

  # Names of this run's own (a cluster found running may serve another lab run, or tests).
  local tag raw qcow
  tag=$(date +%s)-$$
  LAB_CEPH_USER=xdisk-lab-$tag
  mkdir -p "$dest/lab/ceph"
  lab_ceph_ auth get-or-create "client.$LAB_CEPH_USER" mon 'profile rbd' osd 'profile rbd pool=rbd' \
    -o "$dest/lab/ceph/keyring" >/dev/null || { lab_log "ceph: creating client.$LAB_CEPH_USER failed"; return 1; }
  local key
  key=$(lab_ceph_ auth get-key "client.$LAB_CEPH_USER") || { lab_log "ceph: no key for client.$LAB_CEPH_USER"; return 1; }
  # dom0's ceph.conf: the monitors as the cluster names them, the user's keyring, no log or
  # admin socket files (dom0 has no /var/log/ceph).
  {
    echo "[global]"
    grep -E '^mon host *=' "$LAB_CEPH_CONF"
    echo "auth client required = cephx"
    echo "ms bind ipv6 = false"
    echo "keyring = /lab/ceph/keyring"
    echo "log file ="
    echo "admin socket ="
  } > "$dest/lab/ceph/ceph.conf"

  # The images: raw and qcow2 stored in RBD, 64 MiB, made by the host's xdisk.
  raw=xdisk-lab-$tag-raw
  qcow=xdisk-lab-$tag-qcow2
  "$XDISK" img create -f raw "rbd:rbd/$raw:conf=$LAB_CEPH_CONF" 64M >/dev/null ||
    { lab_log "ceph: xdisk img create -f raw rbd:rbd/$raw failed"; return 1; }
  LAB_CEPH_IMAGES+=("$raw")
  "$XDISK" img create -f qcow2 "rbd:rbd/$qcow:conf=$LAB_CEPH_CONF" 64M >/dev/null ||
    { lab_log "ceph: xdisk img create -f qcow2 rbd:rbd/$qcow failed"; return 1; }
  LAB_CEPH_IMAGES+=("$qcow")
  # The pattern dom0 writes (on the data disk: 2 MiB of random bytes), kept for the check.
  LAB_CEPH_PATTERN="$OUT/rbd-pattern"
  head -c 2097152 /dev/urandom > "$LAB_CEPH_PATTERN"
  mkdir -p "$OUT/data-seed/rbd"
  cp "$LAB_CEPH_PATTERN" "$OUT/data-seed/rbd/pattern"
  {
    echo "CEPH_FWD=$LAB_CEPH_FWD"
    echo "CEPH_PORTS='$(echo "$ports" | tr '\n' ' ' | sed 's/ $//')'"
    echo "CEPH_USER=$LAB_CEPH_USER"
    echo "CEPH_KEY='$key'"
    echo "RBD_RAW=$raw"
    echo "RBD_QCOW2=$qcow"
  } > "$dest/lab/ceph/env"

  # slirp runs the command per connection, its stdio a TCP socket to QEMU; TCP_NODELAY on
  # both of the relay's sockets (see the scenario's forwarders). ",," is a comma in QEMU's
  # option syntax.
  for p in $ports; do fwd+=("guestfwd=tcp:$LAB_CEPH_FWD:$p-cmd:$socat STDIO,,nodelay TCP:127.0.0.1:$p,,nodelay"); done
  # shellcheck disable=SC2034,SC2054 # used by tests/xen/run; commas belong to QEMU options
  LAB_QEMU_NET=(-netdev "user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.2,$(IFS=,; echo "${fwd[*]}")"
    -device virtio-net-pci,netdev=n0)
  lab_log "ceph: cluster $LAB_CEPH_CONF ($([ $LAB_CEPH_STARTED = 1 ] && echo started || echo "running already")), ports $(echo "$ports" | tr '\n' ' ')images $raw $qcow; $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
}

# host_check_xdisk_rbd: the host's view of what the xdisk-rbd scenario wrote from dom0.
# Raw: `rbd export`, the pattern at 4 MiB and zeros elsewhere. qcow2 in RBD: qemu-img's rbd
# driver (`qemu-img check`, `qemu-img convert`), the pattern at 1 MiB and zeros elsewhere.
# Prints `why: ...` and fails on a difference.
host_check_xdisk_rbd() {
  local w="$OUT/rbd-check" raw=${LAB_CEPH_IMAGES[0]} qcow=${LAB_CEPH_IMAGES[1]} t0
  t0=$(date +%s.%N)
  rm -rf "$w"; mkdir -p "$w"
  timeout 120 rbd -c "$LAB_CEPH_CONF" export "rbd/$raw" "$w/raw.img" >/dev/null 2>"$w/err" ||
    { echo "why: rbd export rbd/$raw: $(tail -1 "$w/err")"; return 1; }
  truncate -s 64M "$w/want-raw"
  dd if="$LAB_CEPH_PATTERN" of="$w/want-raw" bs=1M seek=4 conv=notrunc status=none
  cmp -s "$w/raw.img" "$w/want-raw" ||
    { echo "why: rbd export of rbd/$raw differs from what dom0 wrote: $(cmp "$w/raw.img" "$w/want-raw" 2>&1 | head -1)"; return 1; }
  echo "ok: rbd export rbd/$raw: the pattern at 4 MiB, zeros elsewhere"
  local q="rbd:rbd/$qcow:conf=$LAB_CEPH_CONF"
  timeout 120 qemu-img check -f qcow2 "$q" > "$w/check" 2>&1 ||
    { echo "why: qemu-img check of $q: $(tail -2 "$w/check" | tr '\n' ' ')"; return 1; }
  echo "ok: qemu-img check -f qcow2 rbd:rbd/$qcow: $(grep -m1 -E 'No errors|image-end' "$w/check")"
  timeout 120 qemu-img convert -f qcow2 -O raw "$q" "$w/qcow.img" 2>"$w/err" ||
    { echo "why: qemu-img convert $q: $(tail -1 "$w/err")"; return 1; }
  truncate -s 64M "$w/want-qcow"
  dd if="$LAB_CEPH_PATTERN" of="$w/want-qcow" bs=1M seek=1 conv=notrunc status=none
  cmp -s "$w/qcow.img" "$w/want-qcow" ||
    { echo "why: qemu-img's read of rbd:rbd/$qcow differs from what dom0 wrote: $(cmp "$w/qcow.img" "$w/want-qcow" 2>&1 | head -1)"; return 1; }
  echo "ok: qemu-img convert rbd:rbd/$qcow (qcow2): the pattern at 1 MiB, zeros elsewhere"
  echo "host check $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
  rm -rf "$w"
}

# lab_ceph_cleanup: the images, the user, and the cluster if the lab started it.
lab_ceph_cleanup() {
  if [ -n "$LAB_CEPH_START_PID" ]; then
    # Started early, never used (the lab stopped before): let it finish, then stop it, unless
    # it found a cluster running already.
    wait "$LAB_CEPH_START_PID" 2>/dev/null
    LAB_CEPH_START_PID=
    if grep -q XDISK_CEPH_CONF= "$OUT/ceph-start.out" 2>/dev/null && ! grep -q 'running already' "$OUT/ceph-start.log"; then
      "$REPO/tests/ceph/stop" >/dev/null 2>&1
      lab_log "ceph: cluster stopped"
    fi
  fi
  [ -n "$LAB_CEPH_CONF" ] || return 0
  local i
  for i in "${LAB_CEPH_IMAGES[@]}"; do
    timeout 60 rbd -c "$LAB_CEPH_CONF" rm --no-progress "rbd/$i" >/dev/null 2>&1 ||
      lab_log "ceph: could not remove rbd/$i"
  done
  [ -n "$LAB_CEPH_USER" ] && lab_ceph_ auth del "client.$LAB_CEPH_USER" >/dev/null 2>&1
  if [ "$LAB_CEPH_STARTED" = 1 ]; then
    "$REPO/tests/ceph/stop" >/dev/null 2>&1 || lab_log "ceph: tests/ceph/stop failed"
    lab_log "ceph: cluster stopped"
  fi
  LAB_CEPH_CONF=
}
