#!/usr/bin/env bash
# Start an MLflow tracking server with model registry for dae-cf jobs.
#
#   mlflow/start_server.sh                                  # sqlite store, loopback, port 5000
#   mlflow/start_server.sh --port 5050 --store /data/mlflow
#   mlflow/start_server.sh --backend-uri postgresql://mlflow@db.internal:5432/mlflow
#   mlflow/start_server.sh --host 0.0.0.0 -- --allowed-hosts mlflow.lab.internal   # reachable from the network
#
# Options (each also settable by the environment variable in brackets):
#   --store DIR          folder for the sqlite database and the artifacts   [DAE_CF_MLFLOW_STORE, default runs/mlflow]
#   --backend-uri URI    run and registry store: sqlite:///... or postgresql://user:pass@host:port/db
#                                                                           [DAE_CF_MLFLOW_BACKEND, default sqlite in DIR]
#   --artifacts DIR      local artifact root, served through the server     [DAE_CF_MLFLOW_ARTIFACTS, default DIR/artifacts]
#   --host HOST          interface to bind                                  [DAE_CF_MLFLOW_HOST, default 127.0.0.1]
#   --port PORT                                                             [DAE_CF_MLFLOW_PORT, default 5000]
#   --workers N          server worker processes                            [DAE_CF_MLFLOW_WORKERS, default 2]
#   -- ARGS              anything after -- goes to `mlflow server` unchanged
#
# The server proxies artifacts (--serve-artifacts), so clients need only its URL, never the artifact folder.
# It runs in the foreground; stop it with Ctrl-C (or a signal to this process group).
set -euo pipefail

store="${DAE_CF_MLFLOW_STORE:-runs/mlflow}"
backend="${DAE_CF_MLFLOW_BACKEND:-}"
artifacts="${DAE_CF_MLFLOW_ARTIFACTS:-}"
host="${DAE_CF_MLFLOW_HOST:-127.0.0.1}"
port="${DAE_CF_MLFLOW_PORT:-5000}"
workers="${DAE_CF_MLFLOW_WORKERS:-2}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
extra=()

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "start_server.sh: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) need_value "$@"; store="$2"; shift 2 ;;
    --backend-uri) need_value "$@"; backend="$2"; shift 2 ;;
    --artifacts) need_value "$@"; artifacts="$2"; shift 2 ;;
    --host) need_value "$@"; host="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --workers) need_value "$@"; workers="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "start_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v "$mlflow_bin" > /dev/null; then
  echo "start_server.sh: '$mlflow_bin' not found; activate the project environment (. .venv/bin/activate)" >&2
  exit 2
fi
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "start_server.sh: --port must be a number in 1..65535, got '$port'" >&2
  exit 2
fi

mkdir -p "$store"
store="$(cd "$store" && pwd)"
backend="${backend:-sqlite:///${store}/mlflow.db}"
artifacts="${artifacts:-${store}/artifacts}"
mkdir -p "$artifacts"
artifacts="$(cd "$artifacts" && pwd)"

case "$backend" in
  sqlite:///*) ;;
  postgresql://*|postgresql+psycopg2://*)
    python_bin="$(dirname "$(command -v "$mlflow_bin")")/python"  # the interpreter mlflow runs in
    [[ -x "$python_bin" ]] || python_bin=python
    if ! "$python_bin" -c "import psycopg2" 2> /dev/null; then
      echo "start_server.sh: a PostgreSQL backend needs psycopg2 (pip install psycopg2-binary)" >&2
      exit 2
    fi ;;
  *) echo "start_server.sh: --backend-uri must start with sqlite:/// or postgresql://, got '$backend'" >&2; exit 2 ;;
esac

if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && "$host" != "::1" ]]; then
  echo "start_server.sh: binding to $host: the server is reachable from the network and has no authentication;" \
       "restrict clients with '-- --allowed-hosts NAME' and a firewall" >&2
fi

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's own job runner (GenAI scorers, trace archival) is unused here and would start eight more processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
shown_backend="$(printf '%s' "${backend%%\?*}" | sed -E 's#//[^@/]*@#//***@#')"  # never print a password
echo "MLflow server: http://${host}:${port}  store: ${shown_backend}  artifacts: ${artifacts}" >&2
echo "point jobs at it with: export MLFLOW_TRACKING_URI=http://${host}:${port}" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" \
  ${extra[@]+"${extra[@]}"}
