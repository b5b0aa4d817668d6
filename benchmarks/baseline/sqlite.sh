#!/bin/sh
# Baseline for SQLite: hold each database's write lock with a sqlite3 shell kept open on a
# FIFO (BEGIN IMMEDIATE at pre, ROLLBACK at post).
# usage: sh sqlite.sh pre|post STATE_DIR MAX_HOLD DB...
set -u
. "${0%/*}/fifo.sh"
phase=$1 state=$2 max_hold=$3
shift 3
case $phase in
pre)
    i=0
    for db in "$@"; do
        i=$(( i + 1 ))
        start_client "$state/$i" "$max_hold" ".bail on
.timeout 10000
SELECT 'ready';" sqlite3 "$db" || exit 1
    done
    if wait_all "$state" ready 30; then
        send_all "$state" "BEGIN IMMEDIATE;" "SELECT 'locked';"
        wait_all "$state" locked 30 && exit 0
    fi
    release_all "$state" "ROLLBACK;"
    exit 1 ;;
post)
    [ -d "$state" ] || exit 0
    release_all "$state" "ROLLBACK;"
    finish_all "$state" "*rror*" 10 || { retire "$state"; exit 1; }
    retire "$state" ;;
esac
