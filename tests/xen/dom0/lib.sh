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
