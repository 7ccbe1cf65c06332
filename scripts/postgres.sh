#!/usr/bin/env bash
# Start a local PostgreSQL server for shared Optuna studies and the tests; print its URL.
#
#   export DNTSYNC_TEST_PG_URL="$(scripts/postgres.sh)"
#   dntsync tune --storage "$(scripts/postgres.sh)"
#
# Idempotent: installs Debian's `postgresql` with apt when missing, creates and starts the
# cluster listening on loopback only (127.0.0.1), creates the role and the database when
# missing, and prints postgresql://USER:PASSWORD@127.0.0.1:PORT/DB on stdout (all else goes
# to stderr). Needs root (or password-less sudo) for apt and for starting the cluster; the
# server itself runs as the `postgres` user (PostgreSQL refuses to run as root).
# For workers on other machines, see docs/tuning.md (listen on a reachable address instead).
#
# Settings (environment): DNTSYNC_PG_USER (dntsync), DNTSYNC_PG_PASSWORD (dntsync),
# DNTSYNC_PG_DB (dntsync), DNTSYNC_PG_PORT (the cluster's port; 5432 for a new cluster).
set -euo pipefail

PG_USER=${DNTSYNC_PG_USER:-dntsync}
PG_PASSWORD=${DNTSYNC_PG_PASSWORD:-dntsync}
PG_DB=${DNTSYNC_PG_DB:-dntsync}
CLUSTER=main

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
    else die "needs root or password-less sudo to run: $*"
    fi
}
as_postgres() { as_root runuser -u postgres -- "$@"; }

# 1. Debian's package
if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    log "installing postgresql with apt"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)

# 2. the cluster, on loopback only
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$VERSION $CLUSTER"; then
    log "creating cluster $VERSION/$CLUSTER"
    as_root pg_createcluster ${DNTSYNC_PG_PORT:+--port "$DNTSYNC_PG_PORT"} "$VERSION" "$CLUSTER" >&2
fi
# Settings go in a drop-in file, read after postgresql.conf (Debian's include_dir conf.d).
restart=no
DROPIN=/etc/postgresql/$VERSION/$CLUSTER/conf.d/dntsync.conf
wanted="listen_addresses = '127.0.0.1'"
if [ -n "${DNTSYNC_PG_PORT:-}" ]; then wanted="$wanted
port = $DNTSYNC_PG_PORT"; fi
if [ "$(as_root cat "$DROPIN" 2>/dev/null)" != "$wanted" ]; then
    printf '%s\n' "$wanted" | as_root tee "$DROPIN" >/dev/null
    restart=yes
fi
PORT=${DNTSYNC_PG_PORT:-$(pg_lsclusters -h "$VERSION" "$CLUSTER" | awk '{print $3}')}

# 3. running (pg_ctlcluster starts the server as the postgres user)
status=$(pg_lsclusters -h "$VERSION" "$CLUSTER" | awk '{print $4}')
if [ "$status" != online ]; then
    log "starting cluster $VERSION/$CLUSTER on 127.0.0.1:$PORT"
    as_root pg_ctlcluster "$VERSION" "$CLUSTER" start >&2 \
        || die "could not start the cluster; see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
elif [ "$restart" = yes ]; then
    log "restarting cluster $VERSION/$CLUSTER for its new settings"
    as_root pg_ctlcluster "$VERSION" "$CLUSTER" restart >&2
fi
pg_isready -q -h 127.0.0.1 -p "$PORT" -t 30 || die "the server does not answer on 127.0.0.1:$PORT"

# 4. role and database
sql() { as_postgres psql -p "$PORT" -X -q -t -A -v ON_ERROR_STOP=1 -d postgres -c "$1"; }
quoted_password=${PG_PASSWORD//\'/\'\'}
if [ "$(sql "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" = 1 ]; then
    sql "ALTER ROLE \"$PG_USER\" WITH LOGIN PASSWORD '$quoted_password'" >/dev/null
else
    log "creating role $PG_USER"
    sql "CREATE ROLE \"$PG_USER\" WITH LOGIN PASSWORD '$quoted_password'" >/dev/null
fi
if [ "$(sql "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    log "creating database $PG_DB"
    sql "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\"" >/dev/null
fi

# 5. a password login over TCP, as the workers will connect
PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PORT" -U "$PG_USER" -d "$PG_DB" -X -q -t -A \
    -c "SELECT 1" >/dev/null || die "cannot log in as $PG_USER over 127.0.0.1:$PORT"
echo "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PORT/$PG_DB"
