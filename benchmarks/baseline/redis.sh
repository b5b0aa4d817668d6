#!/bin/sh
# Baseline for Redis: CLIENT PAUSE ... WRITE from a redis-cli kept open on a FIFO, CLIENT
# UNPAUSE at post. The pause is kept by the server; its own timeout (MAX_HOLD) is the
# watchdog.
# usage: sh redis.sh pre|post STATE_DIR MAX_HOLD SOCKET...
set -u
. "${0%/*}/fifo.sh"
phase=$1 state=$2 max_hold=$3
shift 3
case $phase in
pre)
    i=0
    for socket in "$@"; do
        i=$(( i + 1 ))
        start_client "$state/$i" "$max_hold" "ECHO ready" redis-cli -s "$socket" || exit 1
    done
    if wait_all "$state" ready 30; then
        send_all "$state" "CLIENT PAUSE $(( max_hold * 1000 )) WRITE" "ECHO paused"
        # redis-cli goes on after an error: the marker alone does not prove the pause.
        wait_all "$state" paused 30 && no_errors "$state" "*ERR*" && exit 0
    fi
    release_all "$state" "CLIENT UNPAUSE"
    exit 1 ;;
post)
    [ -d "$state" ] || exit 0
    release_all "$state" "CLIENT UNPAUSE"
    finish_all "$state" "*ERR*" 10 || { retire "$state"; exit 1; }
    retire "$state" ;;
esac
