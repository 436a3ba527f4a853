#!/usr/bin/env bash
# Create and start a PostgreSQL cluster for the MLflow tracking server: databases `mlflow` (runs + registry)
# and `mlflow_auth` (users and permissions of the basic-auth app), owned by one login role.
#
#   DAE_CF_PG_PASSWORD_FILE=~/.config/dae-cf/pg-password mlflow/start_postgres.sh            # runs/postgres, :5432
#   mlflow/start_postgres.sh /data/mlflow-pg --port 5433 --password-file /etc/dae-cf/pg-password
#   mlflow/start_postgres.sh /data/mlflow-pg --stop
#
# Options (each also settable by the environment variable in brackets):
#   DIR                   cluster folder, created by initdb when empty       [DAE_CF_PG_DIR, default runs/postgres]
#   --port PORT           loopback TCP port                                  [DAE_CF_PG_PORT, default 5432]
#   --role NAME           login role owning both databases                   [DAE_CF_PG_ROLE, default mlflow]
#   --password-file FILE  file whose first line is the role's password       [DAE_CF_PG_PASSWORD_FILE]
#                         (or the password itself in DAE_CF_PG_PASSWORD); there is no default password
#   --os-user USER        system user owning the cluster when run as root   [DAE_CF_PG_OS_USER, default postgres]
#   --stop                stop the cluster in DIR (a no-op when it is not running)
#
# The server listens on 127.0.0.1 only, plus a Unix socket inside DIR (local connections of the owning system
# user, no password; TCP connections need the role's password, scram-sha-256). Starting a running cluster says
# so and exits 0. Point start_server.sh at it with
#   --backend-uri postgresql://ROLE@127.0.0.1:PORT/mlflow   and the password in PGPASSWORD or ~/.pgpass.
set -euo pipefail

dir="${DAE_CF_PG_DIR:-runs/postgres}"
port="${DAE_CF_PG_PORT:-5432}"
role="${DAE_CF_PG_ROLE:-mlflow}"
password_file="${DAE_CF_PG_PASSWORD_FILE:-}"
os_user="${DAE_CF_PG_OS_USER:-postgres}"
stop=0

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "error: start_postgres.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --role) need_value "$@"; role="$2"; shift 2 ;;
    --password-file) need_value "$@"; password_file="$2"; shift 2 ;;
    --os-user) need_value "$@"; os_user="$2"; shift 2 ;;
    --stop) stop=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) dir="$1"; shift ;;
  esac
done

# Debian keeps the server programs out of PATH, in /usr/lib/postgresql/<major>/bin; take the newest there.
find_pg_bin() {
  if [[ -n "${DAE_CF_PG_BIN:-}" ]]; then echo "$DAE_CF_PG_BIN"; return; fi
  if command -v initdb > /dev/null && command -v pg_ctl > /dev/null; then dirname "$(command -v initdb)"; return; fi
  local newest
  newest="$(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -V | tail -n 1)"
  [[ -n "$newest" ]] && echo "$newest"
}
pg_bin="$(find_pg_bin || true)"
[[ -n "$pg_bin" && -x "$pg_bin/initdb" && -x "$pg_bin/pg_ctl" ]] \
  || fail "PostgreSQL server programs (initdb, pg_ctl) not found; install them (apt-get install postgresql) or set DAE_CF_PG_BIN to their folder"
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || fail "--port must be a number in 1..65535, got '$port'"
[[ "$role" =~ ^[a-z_][a-z0-9_]*$ ]] || fail "--role must be a lower-case SQL name (letters, digits, _), got '$role'"

# initdb refuses to run as root: as root, the cluster belongs to a system user and every server program runs as it.
as_owner=()
if [[ "$(id -u)" == 0 ]]; then
  id "$os_user" > /dev/null 2>&1 \
    || fail "running as root needs a system user to own the cluster; '$os_user' does not exist (create it or pass --os-user)"
  as_owner=(runuser -u "$os_user" --)
fi
run_owner() { ${as_owner[@]+"${as_owner[@]}"} "$@"; }

dir="$(realpath -m "$dir")"
pg_ctl_run() { run_owner "$pg_bin/pg_ctl" -D "$dir" "$@"; }

if (( stop )); then
  if [[ -f "$dir/PG_VERSION" ]] && pg_ctl_run status > /dev/null 2>&1; then
    pg_ctl_run stop -m fast -w > /dev/null
    echo "PostgreSQL in $dir stopped" >&2
  else
    echo "PostgreSQL in $dir is not running" >&2
  fi
  exit 0
fi

if [[ -f "$dir/PG_VERSION" ]] && pg_ctl_run status > /dev/null 2>&1; then
  echo "PostgreSQL in $dir is already running ($(sed -n 4p "$dir/postmaster.pid" 2> /dev/null || echo "port ?"))" >&2
  exit 0
fi

# The role's password: needed to create the role; read before any change so that a missing one leaves nothing behind.
password="${DAE_CF_PG_PASSWORD:-}"
if [[ -z "$password" && -n "$password_file" ]]; then
  [[ -r "$password_file" ]] || fail "--password-file $password_file cannot be read"
  password="$(head -n 1 "$password_file")"
fi
fresh=0
[[ -f "$dir/PG_VERSION" ]] || fresh=1
if (( fresh )) && [[ -z "$password" ]]; then
  fail "no password for role '$role': put it in a file outside the repository and pass --password-file FILE (or DAE_CF_PG_PASSWORD_FILE), or set DAE_CF_PG_PASSWORD"
fi

if (( fresh )); then
  mkdir -p "$dir"
  if (( ${#as_owner[@]} )) && ! run_owner test -x "$(dirname "$dir")"; then
    rmdir "$dir" 2> /dev/null || true
    fail "the system user '$os_user' cannot enter $(dirname "$dir"); put the cluster in a folder it can reach (e.g. under /srv, /var/lib or /tmp)"
  fi
  [[ -z "$(ls -A "$dir")" ]] || fail "$dir is neither empty nor a PostgreSQL cluster; pass an empty or new folder"
  chmod 700 "$dir"
  if (( ${#as_owner[@]} )); then chown "$os_user": "$dir"; fi
  # Local (socket) connections: the owning system user only, by peer identity; TCP: passwords, scram-sha-256.
  run_owner "$pg_bin/initdb" -D "$dir" --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 \
    --locale=C.UTF-8 > "$dir.initdb.log" 2>&1 \
    || { cat "$dir.initdb.log" >&2; fail "initdb failed in $dir (its output is above)"; }
  rm -f "$dir.initdb.log"
  {
    echo "# dae-cf: loopback only; the Unix socket lives in the cluster folder, so no system folder is needed"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $port"
    echo "unix_socket_directories = '$dir'"
    echo "max_connections = 100"
  } | run_owner tee -a "$dir/postgresql.conf" > /dev/null
fi

run_owner "$pg_bin/pg_ctl" -D "$dir" -l "$dir/server.log" -o "-p $port" -w -t 60 start > /dev/null \
  || { tail -n 20 "$dir/server.log" >&2 || true; fail "PostgreSQL did not start in $dir (see $dir/server.log)"; }

if (( fresh )); then
  # The password travels on stdin, never on a command line that `ps` shows; quotes are doubled for SQL.
  quoted="${password//\'/\'\'}"
  psql_bin="$pg_bin/psql"; [[ -x "$psql_bin" ]] || psql_bin=psql
  printf '%s\n' \
    "CREATE ROLE \"$role\" LOGIN PASSWORD '$quoted';" \
    "CREATE DATABASE mlflow OWNER \"$role\";" \
    "CREATE DATABASE mlflow_auth OWNER \"$role\";" \
    | run_owner "$psql_bin" -h "$dir" -p "$port" -d postgres -v ON_ERROR_STOP=1 -q -f - > /dev/null \
    || { run_owner "$pg_bin/pg_ctl" -D "$dir" stop -m fast > /dev/null || true
         fail "creating role '$role' and the databases failed; remove $dir and start again"; }
fi
echo "PostgreSQL: 127.0.0.1:$port  cluster: $dir  databases: mlflow, mlflow_auth  role: $role" >&2
echo "backend URI: postgresql://$role@127.0.0.1:$port/mlflow  (password: PGPASSWORD or ~/.pgpass)" >&2
