#!/usr/bin/env bash
# MLflow tracking server with a database backend store and a server-proxied artifact store.
#
#   cluster/mlflow/server.sh run DIR     # foreground; `cluster/local.sh up` runs it this way
#   cluster/mlflow/server.sh stop DIR    # stops the PostgreSQL this script started (no-op for sqlite)
#
# Environment (defaults in brackets):
#   MLFLOW_HOST [127.0.0.1]  MLFLOW_PORT [5000]  MLFLOW_BACKEND [sqlite|postgres]
#   MLFLOW_ALLOWED_HOSTS  the Host headers clients send, e.g. mlflow:5000 (MLflow's default: localhost,
#                         127.0.0.1 and private IPs; any other name or address is refused with 403)
#   MLFLOW_CORS_ALLOWED_ORIGINS  the origins of the pages users browse the UI from, e.g. http://mlflow:5000
#                         (MLflow's default: localhost origins only; the UI's POST requests from any other
#                         origin get 403 "Blocked cross-origin request", and its runs table stays empty)
#   PG_HOST [127.0.0.1]  PG_PORT [5433]  PGDATA [DIR/pgdata]   (as root, user postgres must be able to reach it)
#   MLFLOW_BACKEND_STORE_URI       use an existing database, e.g. postgresql+psycopg://mlflow@db:5432/mlflow;
#                                  pass the password in PGPASSWORD or ~/.pgpass, never in this URI
#   MLFLOW_ARTIFACTS_DESTINATION   e.g. s3://bucket/mlflow (credentials from the usual AWS variables)
# With MLFLOW_BACKEND=postgres and no URI, a throw-away PostgreSQL cluster is created in PGDATA,
# listening on PG_HOST (a loopback address) only with trust auth: fine for one machine, never for a shared
# server.
set -euo pipefail
cmd=${1:?usage: server.sh run|stop DIR}
dir=$(mkdir -p "${2:?usage: server.sh run|stop DIR}" && cd "$2" && pwd)
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
backend=${MLFLOW_BACKEND:-sqlite}
pg_host=${PG_HOST:-127.0.0.1}
pg_port=${PG_PORT:-5433}
pgdata=${PGDATA:-$dir/pgdata}
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
export PATH=${pgbin:+$pgbin:}$PATH

# PostgreSQL refuses to run as root, so as root its files belong to (and it runs as) user postgres.
# (From / : postgres may not be allowed into the caller's directory.)
# (The local cluster's bind shim is not for PostgreSQL, which may not be able to read it.)
as_pg() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- env -u LD_PRELOAD "$@"); else env -u LD_PRELOAD "$@"; fi; }

start_postgres() {
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    [ "$(id -u)" = 0 ] && chown postgres: "$pgdata"
    as_pg initdb -D "$pgdata" -U postgres --auth=trust >"$dir/initdb.log"
  fi
  if ! as_pg pg_ctl -D "$pgdata" status >/dev/null 2>&1; then
    as_pg pg_ctl -D "$pgdata" -l "$pgdata/server.log" -w \
      -o "-p $pg_port -k $pgdata -c listen_addresses=$pg_host" start >/dev/null
  fi
  as_pg psql -h "$pg_host" -p "$pg_port" -U postgres -tAc "select 1 from pg_database where datname='mlflow'" \
    | grep -q 1 || as_pg createdb -h "$pg_host" -p "$pg_port" -U postgres mlflow
}

case $cmd in
  run)
    if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
      case $backend in
        sqlite) MLFLOW_BACKEND_STORE_URI=sqlite:///$dir/mlflow.db ;;
        # SQLAlchemy 2 maps plain postgresql:// to psycopg 3 as well; the explicit driver documents it.
        postgres) start_postgres; MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://postgres@$pg_host:$pg_port/mlflow ;;
        *) echo "MLFLOW_BACKEND must be sqlite or postgres, not '$backend'" >&2; exit 2 ;;
      esac
    fi
    # The job runner would add 7 huey worker processes (~1.3 GB); training never uses it.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    exec mlflow server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
      --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$dir/artifacts}" \
      --host "$host" --port "$port" --workers 1 ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} \
      ${MLFLOW_CORS_ALLOWED_ORIGINS:+--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS"}
    ;;
  stop)
    if [ -f "$pgdata/postmaster.pid" ]; then as_pg pg_ctl -D "$pgdata" -m fast -w stop >/dev/null; fi
    ;;
  *) echo "usage: server.sh run|stop DIR" >&2; exit 2 ;;
esac
