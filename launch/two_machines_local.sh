#!/usr/bin/env bash
# Rehearse a two-node training run on one host: two Accelerate "machines" (machine_rank 0 and 1, one process each)
# that meet over 127.0.0.1, exactly as two nodes of a cluster meet over the rank-0 node's address.
#
#   launch/two_machines_local.sh [--port P] [--logs DIR] -- [train_dae.py arguments...]
#
# Each machine writes its own log (DIR/machine0.log, DIR/machine1.log; default: a temporary folder, printed). When
# one machine fails the other is stopped, and the exit status is the failed machine's. Environment: ACCELERATE
# (default: the accelerate next to the Python in use), LAUNCH_CONFIG (default launch/accelerate/cpu_2machines.yaml).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
port=29541
logs=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (usage: $0 [--port P] [--logs DIR] -- [train_dae.py arguments])" >&2; exit 2 ;;
  esac
done
python_bin="${PYTHON:-python3}"
config="${LAUNCH_CONFIG:-$repo/launch/accelerate/cpu_2machines.yaml}"
[[ -f "$config" ]] || { echo "error: launch config $config not found: set LAUNCH_CONFIG to an Accelerate config" >&2; exit 2; }
logs="${logs:-$(mktemp -d -t dae-cf-2machines.XXXXXX)}"
mkdir -p "$logs"
echo "two machines on 127.0.0.1:$port, logs in $logs"

pids=()
for rank in 0 1; do
  # Each machine in its own session (process group), so stopping or killing one takes its launcher and worker
  # together, as a node's death would. One thread per process: two processes must not oversubscribe a small host.
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 setsid "$python_bin" -m accelerate.commands.launch \
    --config_file "$config" --machine_rank "$rank" --main_process_ip 127.0.0.1 --main_process_port "$port" \
    "$repo/harness/train_dae.py" "$@" >"$logs/machine$rank.log" 2>&1 &
  pids+=("$!")
  echo "$!" >"$logs/machine$rank.pid"
done

stop_all() { for pid in "${pids[@]}"; do [[ -n "$pid" ]] && kill -TERM -- "-$pid" 2>/dev/null; done; return 0; }
trap 'stop_all; exit 130' INT TERM

# Poll both machines: the first one to fail stops the other (a peer waiting on a dead node would otherwise sit in
# a collective until its timeout).
status=0
while :; do
  alive=0
  for i in 0 1; do
    pid="${pids[$i]}"
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      alive=1
    else
      code=0
      wait "$pid" || code=$?
      pids[$i]=""
      if (( code != 0 )); then
        status=$code
        echo "machine $i failed (exit $code): stopping the other; see $logs/machine$i.log" >&2
        stop_all
        wait || true
        exit "$status"
      fi
    fi
  done
  (( alive )) || break
  sleep 1
done
exit "$status"
