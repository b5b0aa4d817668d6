#!/bin/sh
# Baseline for PostgreSQL: the non-exclusive low-level backup API in a psql kept open on a
# FIFO: pg_backup_start at pre, pg_backup_stop in the same session at post, its backup
# label kept with the client's state (STATE_DIR.done/<n>/backup_label).
# usage: sh postgresql.sh pre|post STATE_DIR MAX_HOLD SOCKET_DIR:PORT...
set -u
. "${0%/*}/fifo.sh"
phase=$1 state=$2 max_hold=$3
shift 3
case $phase in
pre)
    i=0
    for server in "$@"; do
        i=$(( i + 1 ))
        start_client "$state/$i" "$max_hold" "SELECT 'ready';" \
            psql -X -q -A -t -v ON_ERROR_STOP=1 -h "${server%:*}" -p "${server##*:}" \
            -U postgres postgres || exit 1
    done
    if wait_all "$state" ready 30; then
        send_all "$state" "SELECT 'locked' FROM pg_backup_start('baseline', fast => true);"
        wait_all "$state" locked 60 && exit 0
    fi
    release_all "$state" "SELECT labelfile FROM pg_backup_stop();"
    exit 1 ;;
post)
    [ -d "$state" ] || exit 0
    release_all "$state" "SELECT labelfile FROM pg_backup_stop();"
    status=0
    finish_all "$state" "*ERROR*" 60 || status=1
    for d in "$state"/*/; do
        has_line "$d/out" "LABEL: baseline" || { echo "$d: no backup label" >&2; status=1; }
        cp "$d/out" "$d/backup_label"
    done
    retire "$state"
    exit $status ;;
esac
