# shellcheck shell=dash
# Helpers for the lab's scenario scripts (sourced: `. /lab/lib.sh`). A scenario passes when
# it exits 0; `fail WHY` ends it with a reason that tests/xen/run prints.

fail() {
  echo "why: $*"
  exit 1
}

# check DESCRIPTION CMD...: runs CMD, fails the scenario with DESCRIPTION if it fails.
check() {
  local what=$1
  shift
  if "$@"; then
    echo "ok: $what"
  else
    fail "$what"
  fi
}

# wait_for SECONDS CMD...: polls CMD every 0.1 s until it succeeds; false on timeout.
wait_for() {
  local n=$(($1 * 10))
  shift
  while ! "$@"; do
    n=$((n - 1))
    [ $n -gt 0 ] || return 1
    usleep 100000
  done
}

up() { cut -d' ' -f1 /proc/uptime; }

# report TEXT: a line for the lab's user (tests/xen/run --show prints these, without the "| ").
report() {
  echo "| $*"
}

# secs_since T0: seconds since T0 (a value of `up`), two decimals.
secs_since() {
  awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'
}

# stop_daemon PID LOG: SIGTERM, wait, show the log's tail; fails the scenario unless it exited 0.
stop_daemon() {
  local rc
  kill -TERM "$1"
  wait "$1"
  rc=$?
  tail -20 "$2"
  [ $rc = 0 ] || fail "xdisk serve exited with $rc"
}

# lab_reset: puts dom0 back as a scenario found it, whatever the scenario left (a failure, a
# timeout): guests destroyed, xdisk/QEMU/fio processes stopped, dom0's disks detached and their
# xenstore nodes removed, loop devices freed. Prints a "cleanup: ..." line per thing it undid
# (nothing when all was clean). The lab's /init runs it after every scenario, so one failure
# never fails the next scenario; the lab-cleanup scenario tests it.
lab_reset() {
  local id v t d
  for id in $(xl list 2>/dev/null | awk 'NR > 1 && $2 != 0 { print $2 }'); do
    echo "cleanup: xl destroy $id"
    timeout 30 xl destroy "$id" >/dev/null 2>&1
  done
  # The disks' users first, while their backends still answer: a reader killed after its
  # backend stops waits for ever in the kernel (D state), and then dom0's blkfront cannot
  # remove the disk and blocks xenwatch, so no disk attaches again until dom0 reboots.
  lab_stop 10 fio dd
  # Disks libxl attached to dom0, while their backend still runs.
  for v in $(xl block-list 0 2>/dev/null | awk 'NR > 1 { print $1 }'); do
    echo "cleanup: xl block-detach 0 $v"
    timeout 20 xl block-detach 0 "$v" >/dev/null 2>&1 ||
      timeout 20 xl block-detach -f 0 "$v" >/dev/null 2>&1
  done
  # Then the backends (xdisk serve closes its disks on SIGTERM) and device models.
  lab_stop 15 xdisk qemu-system-i386
  # Port forwarders (xdisk-rbd's way to the host's Ceph cluster).
  lab_stop 5 socat nc
  xenstore-rm /local/domain/0/image/device-model-pid 2>/dev/null
  # Then any backend or frontend node left for dom0.
  for t in xdisk qdisk vbd vbd3; do
    for d in $(xenstore-list "/local/domain/0/backend/$t/0" 2>/dev/null); do
      echo "cleanup: backend/$t/0/$d"
      xenstore-write "/local/domain/0/backend/$t/0/$d/state" 6 2>/dev/null
      xenstore-rm "/local/domain/0/backend/$t/0/$d"
    done
  done
  for d in $(xenstore-list /local/domain/0/device/vbd 2>/dev/null); do
    echo "cleanup: device/vbd/$d"
    xenstore-rm "/local/domain/0/device/vbd/$d"
  done
  n=50
  while ls /dev/xvd* >/dev/null 2>&1 && [ $n -gt 0 ]; do
    usleep 100000
    n=$((n - 1))
  done
  ls /dev/xvd* >/dev/null 2>&1 && echo "cleanup: still there: $(ls /dev/xvd* | tr '\n' ' ')"
  for d in /sys/block/loop*/loop/backing_file; do
    [ -f "$d" ] || continue
    d=${d#/sys/block/}
    d=/dev/${d%%/*}
    echo "cleanup: losetup -d $d"
    losetup -d "$d" 2>/dev/null
  done
  return 0
}

# lab_stop SECS NAME...: SIGTERM to every process called NAME, SIGKILL to those left after SECS.
lab_stop() {
  local secs=$1 p n
  shift
  for p in $(pidof "$@" 2>/dev/null); do
    echo "cleanup: kill $p ($(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-80))"
    kill -TERM "$p" 2>/dev/null
  done
  n=$((secs * 10))
  while [ -n "$(pidof "$@" 2>/dev/null)" ] && [ $n -gt 0 ]; do
    usleep 100000
    n=$((n - 1))
  done
  for p in $(pidof "$@" 2>/dev/null); do
    echo "cleanup: kill -9 $p"
    kill -KILL "$p" 2>/dev/null
  done
}
