#!/usr/bin/env bash
# A private, throw-away PostgreSQL server for the database tests (Debian's postgresql package).
#
#   eval "$(bash .ci/postgres.sh start)"   # installs postgresql if needed, starts a server on
#                                           # 127.0.0.1 (free port), creates a database, and prints
#                                           # export WHYMATCH_TEST_POSTGRES_URL=postgresql+psycopg://...
#                                           #        WHYMATCH_TEST_POSTGRES_DIR=<data dir>
#   bash .ci/postgres.sh stop              # stops the server in $WHYMATCH_TEST_POSTGRES_DIR, removes it
#
# Only the export lines go to stdout; progress goes to stderr.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

as_owner() {  # run a command as the server's owner: `postgres` when we are root, else ourselves
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
    local bin
    bin=$(pg_bin || true)
    if [ -z "$bin" ]; then
        if [ "$(id -u)" != 0 ]; then log "postgresql is not installed and we are not root"; exit 1; fi
        log "installing Debian's postgresql"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends postgresql >&2
        bin=$(pg_bin)
    fi
    # The package's own cluster is not used (nor started) here.
    local dir port password
    dir=$(mktemp -d /tmp/whymatch-pg.XXXXXX)
    chmod 700 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    printf '%s\n' "$password" > "$dir/.pw"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/.pw"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/.pw" --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-locale >/dev/null
    rm -f "$dir/.pw"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" start >&2
    as_owner "$bin/createdb" -h "$dir" -p "$port" -U postgres whymatch_test
    log "server on 127.0.0.1:$port (data in $dir)"
    echo "export WHYMATCH_TEST_POSTGRES_URL='postgresql+psycopg://postgres:$password@127.0.0.1:$port/whymatch_test'"
    echo "export WHYMATCH_TEST_POSTGRES_DIR='$dir'"
}

stop() {
    local dir=${WHYMATCH_TEST_POSTGRES_DIR:-}
    [ -n "$dir" ] && [ -d "$dir/data" ] || { log "no server to stop"; return 0; }
    as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
