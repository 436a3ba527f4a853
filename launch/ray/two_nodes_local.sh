#!/usr/bin/env bash
# A two-node Ray cluster on one host, for the head sweep over many findings (jobs/sweep_cxr.yaml):
#   launch/ray/two_nodes_local.sh start     # head (1 CPU, resource node_head) + worker (1 CPU, resource node_worker)
#   launch/ray/two_nodes_local.sh status    # the nodes, and the lines a driver exports to join
#   launch/ray/two_nodes_local.sh stop      # ends both nodes (only this cluster's processes)
# Settings (environment): RAY_LOCAL_PORT (head GCS port, default 6390), RAY_LOCAL_DIR (state, default
# /tmp/dae-cf-ray-<port>), RAY_LOCAL_CPUS (cores per node, default 1), RAY (the ray command, default .venv/bin/ray).
#
# Each node has its own temp dir (session, logs, sockets) under RAY_LOCAL_DIR, so `stop` ends exactly the
# processes started here (their command lines name that folder): it never runs `ray stop`, which would end every
# Ray on the host. The cluster uses Ray's token authentication with its own token (RAY_LOCAL_DIR/auth_token,
# mode 600); a driver joins with
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<RAY_LOCAL_DIR>/auth_token
#   dae-cf sweep --latents ... --config jobs/sweep_cxr.yaml --address 127.0.0.1:<port>
set -euo pipefail

PORT="${RAY_LOCAL_PORT:-6390}"
DIR="${RAY_LOCAL_DIR:-/tmp/dae-cf-ray-${PORT}}"
CPUS="${RAY_LOCAL_CPUS:-1}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-${HERE}/.venv/bin/ray}"
ADDRESS="127.0.0.1:${PORT}"
export RAY_DISABLE_USAGE_STATS=1 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="${DIR}/auth_token"

die() { echo "error: $*" >&2; exit 2; }

pids_of_cluster() {  # processes whose command line names this cluster's folder (head and worker nodes)
    ps -eo pid=,args= | awk -v dir="${DIR}/" 'index($0, dir) && !/awk/ {print $1}'
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/${PORT}") 2>/dev/null; }

start() {
    [[ -x "${RAY}" ]] || die "no ray command at ${RAY}; install the project (pip install -e '.[dist]') or set RAY"
    if answers; then
        die "something already listens on ${ADDRESS}; '$0 status' shows it, or pick another RAY_LOCAL_PORT"
    fi
    mkdir -p "${DIR}/head" "${DIR}/worker"
    if [[ ! -s "${RAY_AUTH_TOKEN_PATH}" ]]; then
        (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "${RAY_AUTH_TOKEN_PATH}")
    fi
    "${RAY}" start --head --port "${PORT}" --node-ip-address 127.0.0.1 --num-cpus "${CPUS}" \
        --resources '{"node_head": 1}' --temp-dir "${DIR}/head" --include-dashboard false \
        --disable-usage-stats >"${DIR}/head.log" 2>&1 || { tail -5 "${DIR}/head.log" >&2; die "head did not start (${DIR}/head.log)"; }
    "${RAY}" start --address "${ADDRESS}" --node-ip-address 127.0.0.1 --num-cpus "${CPUS}" \
        --resources '{"node_worker": 1}' --temp-dir "${DIR}/worker" \
        --disable-usage-stats >"${DIR}/worker.log" 2>&1 || { tail -5 "${DIR}/worker.log" >&2; stop; die "worker did not start (${DIR}/worker.log)"; }
    echo "started: head and worker at ${ADDRESS} (state ${DIR})"
    drivers
}

drivers() {
    echo "join with: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH}; ... --address ${ADDRESS}"
}

status() {
    answers || die "no cluster answers at ${ADDRESS} (start it with '$0 start')"
    "${RAY}" status --address "${ADDRESS}"
    drivers
}

stop() {
    local pids
    pids="$(pids_of_cluster)"
    if [[ -z "${pids}" ]]; then
        echo "stopped: nothing of ${DIR} was running"
        return 0
    fi
    # shellcheck disable=SC2086
    kill ${pids} 2>/dev/null || true
    for _ in $(seq 20); do
        [[ -z "$(pids_of_cluster)" ]] && break
        sleep 0.5
    done
    pids="$(pids_of_cluster)"
    # shellcheck disable=SC2086
    [[ -n "${pids}" ]] && kill -9 ${pids} 2>/dev/null || true
    echo "stopped: head and worker of ${ADDRESS}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
