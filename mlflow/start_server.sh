#!/usr/bin/env bash
# Start an MLflow tracking server with model registry for dae-cf jobs.
#
#   mlflow/start_server.sh                                  # sqlite store, loopback, port 5000
#   mlflow/start_server.sh --port 5050 --store /data/mlflow
#   mlflow/start_server.sh --backend-uri postgresql://mlflow@127.0.0.1:5432/mlflow --db-password-file F
#   mlflow/start_server.sh --auth --admin-password-file ~/.config/dae-cf/mlflow-admin  # users and permissions
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
#   --db-password-file F PostgreSQL password (first line of F), handed to the server as PGPASSWORD so that the
#                        URI needs none                        [DAE_CF_PG_PASSWORD_FILE, or DAE_CF_PG_PASSWORD itself]
#   --auth               MLflow's basic-auth app: every request needs a user  [DAE_CF_MLFLOW_AUTH=1]
#   --admin-user NAME    the admin user, created at the first start          [DAE_CF_MLFLOW_ADMIN_USER, default admin]
#   --admin-password-file F  the admin's password (first line of F, >= 12 characters); no default
#                                                 [DAE_CF_MLFLOW_ADMIN_PASSWORD_FILE, or DAE_CF_MLFLOW_ADMIN_PASSWORD]
#   --auth-db-uri URI    users and permissions store  [DAE_CF_MLFLOW_AUTH_DB, default: sqlite DIR/basic_auth.db, or
#                        the PostgreSQL backend's database name + _auth (mlflow -> mlflow_auth)]
#   --default-permission P  what a user may do with what others created: NO_PERMISSIONS or READ
#                                                  [DAE_CF_MLFLOW_DEFAULT_PERMISSION, default NO_PERMISSIONS]
#   --auth-cache-seconds S  how long a worker trusts a checked password (0: check every request, ~0.15 s of CPU
#                        each); a changed password reaches the other workers within S  [DAE_CF_MLFLOW_AUTH_CACHE_S, 60]
#   -- ARGS              anything after -- goes to `mlflow server` unchanged
#
# The server proxies artifacts (--serve-artifacts), so clients need only its URL, never the artifact folder.
# With --auth the auth config (DIR/basic_auth.ini) and the CSRF secret (DIR/flask_secret_key) are written into the
# store folder, mode 600. The admin password only creates the admin at the first start; later starts ignore it
# (change a password through the API, mlflow/README.md). Clients pass MLFLOW_TRACKING_USERNAME / _PASSWORD.
# It runs in the foreground; stop it with Ctrl-C (or a signal to this process group).
set -euo pipefail

store="${DAE_CF_MLFLOW_STORE:-runs/mlflow}"
backend="${DAE_CF_MLFLOW_BACKEND:-}"
artifacts="${DAE_CF_MLFLOW_ARTIFACTS:-}"
host="${DAE_CF_MLFLOW_HOST:-127.0.0.1}"
port="${DAE_CF_MLFLOW_PORT:-5000}"
workers="${DAE_CF_MLFLOW_WORKERS:-2}"
db_password_file="${DAE_CF_PG_PASSWORD_FILE:-}"
auth="${DAE_CF_MLFLOW_AUTH:-0}"
admin_user="${DAE_CF_MLFLOW_ADMIN_USER:-admin}"
admin_password_file="${DAE_CF_MLFLOW_ADMIN_PASSWORD_FILE:-}"
auth_db="${DAE_CF_MLFLOW_AUTH_DB:-}"
default_permission="${DAE_CF_MLFLOW_DEFAULT_PERMISSION:-NO_PERMISSIONS}"
auth_cache_s="${DAE_CF_MLFLOW_AUTH_CACHE_S:-60}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
extra=()

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "error: start_server.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value (see --help)"; }
first_line() { [[ -r "$1" ]] || fail "$2 $1 cannot be read"; head -n 1 "$1"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) need_value "$@"; store="$2"; shift 2 ;;
    --backend-uri) need_value "$@"; backend="$2"; shift 2 ;;
    --artifacts) need_value "$@"; artifacts="$2"; shift 2 ;;
    --host) need_value "$@"; host="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --workers) need_value "$@"; workers="$2"; shift 2 ;;
    --db-password-file) need_value "$@"; db_password_file="$2"; shift 2 ;;
    --auth) auth=1; shift ;;
    --admin-user) need_value "$@"; admin_user="$2"; shift 2 ;;
    --admin-password-file) need_value "$@"; admin_password_file="$2"; shift 2 ;;
    --auth-db-uri) need_value "$@"; auth_db="$2"; shift 2 ;;
    --default-permission) need_value "$@"; default_permission="$2"; shift 2 ;;
    --auth-cache-seconds) need_value "$@"; auth_cache_s="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown option $1 (see --help)" ;;
  esac
done

command -v "$mlflow_bin" > /dev/null \
  || fail "'$mlflow_bin' not found; activate the project environment (. .venv/bin/activate)"
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  fail "--port must be a number in 1..65535, got '$port'"
fi
[[ "$auth" == 0 || "$auth" == 1 ]] || fail "DAE_CF_MLFLOW_AUTH must be 0 or 1, got '$auth'"
admin_password="${DAE_CF_MLFLOW_ADMIN_PASSWORD:-}"
if [[ "$auth" == 1 ]]; then  # every check before anything is written
  [[ -n "$admin_password" || -z "$admin_password_file" ]] \
    || admin_password="$(first_line "$admin_password_file" --admin-password-file)"
  [[ -n "$admin_password" ]] || fail "--auth needs the admin password: pass --admin-password-file FILE (a file" \
    "outside the repository, mode 600) or set DAE_CF_MLFLOW_ADMIN_PASSWORD"
  (( ${#admin_password} >= 12 )) || fail "the admin password must have at least 12 characters (MLflow's rule)"
  [[ "$admin_user" =~ ^[A-Za-z0-9_.@-]+$ ]] || fail "--admin-user must be letters, digits, _ . @ -, got '$admin_user'"
  case "$default_permission" in
    NO_PERMISSIONS|READ) ;;
    *) fail "--default-permission must be NO_PERMISSIONS or READ, got '$default_permission'" ;;
  esac
  [[ "$auth_cache_s" =~ ^[0-9]+$ ]] || fail "--auth-cache-seconds must be a whole number >= 0, got '$auth_cache_s'"
fi
db_password="${DAE_CF_PG_PASSWORD:-}"
[[ -n "$db_password" || -z "$db_password_file" ]] || db_password="$(first_line "$db_password_file" --db-password-file)"

mkdir -p "$store"
store="$(cd "$store" && pwd)"
backend="${backend:-sqlite:///${store}/mlflow.db}"
artifacts="${artifacts:-${store}/artifacts}"
mkdir -p "$artifacts"
artifacts="$(cd "$artifacts" && pwd)"

# SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; the `server` extra installs psycopg2.
[[ "$backend" == postgresql://* ]] && backend="postgresql+psycopg2://${backend#postgresql://}"
case "$backend" in
  sqlite:///*) ;;
  postgresql+psycopg2://*)
    python_bin="$(dirname "$(command -v "$mlflow_bin")")/python"  # the interpreter mlflow runs in
    [[ -x "$python_bin" ]] || python_bin=python
    "$python_bin" -c "import psycopg2" 2> /dev/null \
      || fail "a PostgreSQL backend needs psycopg2: pip install -e '.[server]' (or psycopg2-binary)" ;;
  *) fail "--backend-uri must start with sqlite:/// or postgresql://, got '$backend'" ;;
esac

if [[ "$auth" == 1 ]]; then
  if [[ -z "$auth_db" ]]; then
    case "$backend" in
      sqlite:///*) auth_db="sqlite:///${store}/basic_auth.db" ;;
      *) query=""; [[ "$backend" == *\?* ]] && query="?${backend#*\?}"
         base="${backend%%\?*}"; auth_db="${base%/*}/${base##*/}_auth${query}" ;;  # .../mlflow -> .../mlflow_auth
    esac
  fi
  # Written whole and then moved, mode 600 from the start: it names the admin's password. MLflow reads it with
  # configparser, whose interpolation takes % as a reference: %% stands for one %.
  umask 077
  printf '%s\n' "[mlflow]" "default_permission = ${default_permission}" "database_uri = ${auth_db//%/%%}" \
    "admin_username = ${admin_user}" "admin_password = ${admin_password//%/%%}" \
    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" \
    "auth_cache_ttl_seconds = ${auth_cache_s}" > "${store}/.basic_auth.ini.tmp"
  mv -f "${store}/.basic_auth.ini.tmp" "${store}/basic_auth.ini"
  # Flask's CSRF secret (the auth app's forms) must be the same in every worker and across restarts.
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    [[ -s "${store}/flask_secret_key" ]] \
      || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "${store}/.flask_secret_key.tmp"
           mv -f "${store}/.flask_secret_key.tmp" "${store}/flask_secret_key"; }
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "${store}/flask_secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  umask 022
  export MLFLOW_AUTH_CONFIG_PATH="${store}/basic_auth.ini"
  unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_USERNAME  # they would override the file
  extra=(--app-name basic-auth ${extra[@]+"${extra[@]}"})
fi
[[ -z "$db_password" ]] || export PGPASSWORD="$db_password"  # libpq reads it; no password on the command line

if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && "$host" != "::1" ]]; then
  if [[ "$auth" == 1 ]]; then
    echo "start_server.sh: binding to $host: basic auth sends passwords readable on the wire; put a TLS proxy" \
         "in front and restrict clients with '-- --allowed-hosts NAME'" >&2
  else
    echo "start_server.sh: binding to $host: the server is reachable from the network and has no authentication" \
         "(--auth); restrict clients with '-- --allowed-hosts NAME' and a firewall" >&2
  fi
fi

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's own job runner (GenAI scorers, trace archival) is unused here and would start eight more processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
shown_backend="$(printf '%s' "${backend%%\?*}" | sed -E 's#//[^@/]*@#//***@#')"  # never print a password
shown_auth=""; [[ "$auth" == 1 ]] && shown_auth="  auth: basic (admin user ${admin_user}, default ${default_permission})"
echo "MLflow server: http://${host}:${port}  store: ${shown_backend}  artifacts: ${artifacts}${shown_auth}" >&2
echo "point jobs at it with: export MLFLOW_TRACKING_URI=http://${host}:${port}" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "$workers" \
  ${extra[@]+"${extra[@]}"}
