#!/usr/bin/env bash
# Stop the test cluster that start.sh started under FOLDER: cancel every job and wait until the queue is empty (a
# daemon stopped under a running job leaves its processes behind), then stop slurmd, slurmctld and munged by their
# pid files and wait until they are gone. Exit status 1 if jobs stayed queued or a daemon had to be killed.
set -uo pipefail

folder=${1:?"usage: $0 FOLDER (the folder given to start.sh)"}
export SLURM_CONF="$folder/slurm.conf"
daemons=(slurmd slurmctld munged)
status=0

# The pid in DAEMON's pid file, if that process still runs that daemon (a pid file may outlive its process).
daemon_pid() {
    local pid
    pid=$(cat "$folder/$1.pid" 2>/dev/null) && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}
# Whether PID still runs (a zombie has ended: it only waits for its parent to collect its exit status).
running() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

if [ -n "$(daemon_pid slurmctld)" ]; then
    scancel --user="$(id -un)" 2>/dev/null
    for _ in $(seq 200); do
        [ -z "$(squeue --noheader --format=%i 2>/dev/null)" ] && break
        sleep 0.05
    done
    queued=$(squeue --noheader --format='%i %T' 2>/dev/null | tr '\n' ' ')
    if [ -n "$queued" ]; then
        echo "slurm test cluster: jobs still queued 10 s after scancel: $queued" >&2
        status=1
    fi
fi

# All three at once: no job is left that needs them. The daemons remove their pid files as they exit.
pids=()
for daemon in "${daemons[@]}"; do
    pid=$(daemon_pid "$daemon") && pids+=("$pid") && kill "$pid"
done
for _ in $(seq 200); do
    left=()
    for pid in "${pids[@]}"; do
        running "$pid" && left+=("$pid")
    done
    [ ${#left[@]} = 0 ] && exit $status
    sleep 0.05
done
echo "slurm test cluster: daemon processes ${left[*]} ignored SIGTERM for 10 s; killed" >&2
kill -9 "${left[@]}"
exit 1
