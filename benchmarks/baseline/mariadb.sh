#!/bin/sh
# Baseline for MariaDB/MySQL: FLUSH TABLES WITH READ LOCK in a mariadb client kept open on
# a FIFO (UNLOCK TABLES at post). Naive on purpose, like the public samples: no
# lock_wait_timeout, no check for long-running queries.
# usage: sh mariadb.sh pre|post STATE_DIR MAX_HOLD SOCKET...
set -u
. "${0%/*}/fifo.sh"
phase=$1 state=$2 max_hold=$3
shift 3
case $phase in
pre)
    i=0
    for socket in "$@"; do
        i=$(( i + 1 ))
        # -n: flush the output after each statement; batch mode stops at the first error.
        start_client "$state/$i" "$max_hold" "SELECT 'ready';" \
            mariadb -n -N -B -S "$socket" -u root || exit 1
    done
    if wait_all "$state" ready 30; then
        send_all "$state" "FLUSH TABLES WITH READ LOCK;" "SELECT 'locked';"
        wait_all "$state" locked 600 && exit 0
    fi
    release_all "$state" "UNLOCK TABLES;"
    exit 1 ;;
post)
    [ -d "$state" ] || exit 0
    release_all "$state" "UNLOCK TABLES;"
    finish_all "$state" "ERROR*" 10 || { retire "$state"; exit 1; }
    retire "$state" ;;
esac
