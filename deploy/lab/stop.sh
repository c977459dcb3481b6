#!/usr/bin/env bash
# Stop the registry and the dockerd that deploy/lab/setup.sh started, found by their pid files in
# ${FARM_LAB_STATE:-<repo>/.lab}. Harmless when they are not running. Data (registry blobs,
# docker images, the busybox layout) stays, so the next setup.sh is quick.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${FARM_LAB_STATE:-$repo/.lab}

# stop NAME PIDFILE COMM: TERM the process if it is alive and still the one we started (its comm
# matches, so a recycled pid is left alone), wait up to 20 s, then KILL.
stop() {
  local name=$1 pidfile=$2 comm=$3 pid
  if [ ! -f "$pidfile" ]; then
    printf '%-9s %s\n' "$name:" "skip: no pid file"
    return
  fi
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]; then
    rm -f "$pidfile"
    printf '%-9s %s\n' "$name:" "skip: not running (removed stale $pidfile)"
    return
  fi
  kill -TERM "$pid"
  local tries=80
  while kill -0 "$pid" 2>/dev/null && ((tries-- > 0)); do
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid"
    printf '%-9s %s\n' "$name:" "killed pid $pid (did not stop within 20 s)"
  else
    printf '%-9s %s\n' "$name:" "stopped pid $pid"
  fi
  rm -f "$pidfile"
}

# dockerd first: it may still be talking to the registry.
stop dockerd "$state/dockerd.pid" dockerd
stop registry "$state/registry/registry.pid" docker-registry
