#!/bin/sh
# scripts/bounded.sh SECONDS COMMAND [ARG ...]: COMMAND with a time limit, left in the caller's process group.
#
# Why not timeout(1): it moves its command into a process group of its own, where a terminal's Ctrl-C never arrives
# (make run ignored Ctrl-C for up to TIMEOUT seconds), and with --foreground it sends a second SIGINT after the
# terminal's, on which MPICH's mpiexec ends the job with a status that is a race (0 included). Here the command
# replaces this shell (same process, same group: Ctrl-C reaches it once), and a watcher that ignores Ctrl-C sends it
# SIGTERM once it outlives the limit (SIGKILL 10 s later); the status is then the command's own (143 for mpirun).
limit=$1
shift
me=$$
(
    trap '' INT
    i=0
    while kill -0 "$me" 2>/dev/null; do  # polls each second, so it ends within a second of the command
        if [ "$i" -ge "$limit" ]; then
            echo "bounded.sh: still running after $limit s, terminated: $*" >&2
            kill -TERM "$me" 2>/dev/null
            sleep 10
            kill -KILL "$me" 2>/dev/null
            exit 0
        fi
        sleep 1
        i=$((i + 1))
    done
) </dev/null >/dev/null &
exec "$@"
