# fifo.sh: a database client kept connected on a FIFO across the pre- and post-script.
# Sourced by the baseline scripts; POSIX sh, no bashisms.
#
# The pattern of the best public pre/post-script samples, done carefully:
#   * one client per database, reading its commands from a FIFO;
#   * a "keeper" process holds the FIFO's write end open, so the client never reads EOF
#     between the scripts; when the keeper ends (after MAX_HOLD seconds, or at post) the
#     client reads EOF and exits, and a session-bound lock dies with its session: that is
#     the baseline's watchdog;
#   * every client connects first and prints a "ready" marker; only then are the lock
#     statements sent to all of them, back to back, so the first lock is not held while
#     later clients are still starting;
#   * the pre-script returns only once every client has printed a marker that follows the
#     lock statement (clients stop at the first error), so "exit 0" means "locked";
#   * commands go to the FIFO through a read-write open (1<>), which never blocks, even if
#     the client is gone.
# Every client's state lives in STATE/<n>/: in (FIFO), out (its output), keeper, client (pids).

# start_client DIR MAX_HOLD FIRST_LINES COMMAND...: start COMMAND reading DIR/in and
# writing DIR/out, and give it FIRST_LINES (settings and a statement that prints "ready").
# The keeper writes them: it opens the FIFO as soon as the client does, so nothing is lost
# (data written to a FIFO nobody holds open is discarded) and the script never blocks on
# the open. Once the client printed "ready", both hold the FIFO open and send is safe.
start_client() {
    _dir=$1 _hold=$2 _first=$3
    shift 3
    rm -rf "$_dir" && mkdir -p "$_dir" && mkfifo "$_dir/in" && : > "$_dir/out" || return 1
    { printf '%s\n' "$_first"; exec sleep "$_hold"; } > "$_dir/in" 2>/dev/null </dev/null &
    echo $! > "$_dir/keeper"
    "$@" < "$_dir/in" >> "$_dir/out" 2>&1 &
    echo $! > "$_dir/client"
}

# send DIR LINE...: give the client in DIR these lines (once start_client's keeper holds
# the FIFO open).
send() {
    _dir=$1
    shift
    printf '%s\n' "$@" 1<>"$_dir/in"
}

# alive PID: the process runs (a zombie does not count: an orphan that exited waits for
# init to reap it, and kill -0 still succeeds on it meanwhile).
alive() {
    read -r _st < "/proc/$1/stat" 2>/dev/null || return 1
    case ${_st##*) } in Z*|X*) return 1 ;; esac
}

# has_line FILE LINE: FILE holds LINE (shell builtins only: no process per poll).
has_line() {
    while IFS= read -r _line; do
        [ "$_line" = "$2" ] && return 0
    done < "$1"
    return 1
}

# send_all STATE LINE...: give every client under STATE these lines.
send_all() {
    _state=$1
    shift
    for _d in "$_state"/*/; do
        send "$_d" "$@"
    done
}

# wait_all STATE MARKER SECONDS: every client under STATE printed MARKER (polled every
# 2 ms). Fails as soon as a client died (its statement failed) or time ran out (about
# SECONDS: the count of polls is what is bounded).
wait_all() {
    _ticks=$(( $3 * 500 ))
    for _d in "$1"/*/; do
        read -r _pid < "$_d/client"
        until has_line "$_d/out" "$2"; do
            alive "$_pid" || return 1
            _ticks=$(( _ticks - 1 ))
            [ "$_ticks" -gt 0 ] || return 1
            sleep 0.002
        done
    done
}

# release_all STATE LINE...: send LINEs to every client, then end the keepers so each
# client reads EOF after them and exits (ending its session).
release_all() {
    _state=$1
    shift
    for _d in "$_state"/*/; do
        [ -p "$_d/in" ] && send "$_d" "$@"
    done
    for _d in "$_state"/*/; do
        [ -f "$_d/keeper" ] && read -r _pid < "$_d/keeper" && alive "$_pid" && kill "$_pid"
    done
    return 0
}

# no_errors STATE PATTERN: no client's output has a line matching the case PATTERN.
no_errors() {
    _status=0
    for _d in "$1"/*/; do
        [ -f "$_d/out" ] || continue
        while IFS= read -r _line; do
            # shellcheck disable=SC2254 # PATTERN is a pattern on purpose
            case $_line in $2) echo "$_d: $_line" >&2; _status=1 ;; esac
        done < "$_d/out"
    done
    return $_status
}

# finish_all STATE PATTERN SECONDS: wait for every client to exit; fail if one is still
# running at the end, or printed an error (a line matching PATTERN): its lock was lost or
# its release failed.
finish_all() {
    _ticks=$(( $3 * 200 ))
    _late=0
    for _d in "$1"/*/; do
        [ -f "$_d/client" ] || continue
        read -r _pid < "$_d/client"
        while alive "$_pid" && [ "$_ticks" -gt 0 ]; do
            _ticks=$(( _ticks - 1 ))
            sleep 0.005
        done
        alive "$_pid" && { kill "$_pid"; _late=1; }
    done
    no_errors "$1" "$2" && [ "$_late" = 0 ]
}

# retire STATE: keep the last run's state as STATE.done, so a second post-script finds
# nothing held and does nothing.
retire() {
    rm -rf "$1.done" && mv "$1" "$1.done"
}
