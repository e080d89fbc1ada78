#!/usr/bin/env bash
# Start a single-node Slurm test cluster (munged, slurmctld, slurmd) entirely under FOLDER, as root and without
# systemd, for the tests of the sbatch layer. Prints the path of its slurm.conf: export it as SLURM_CONF to reach the
# cluster. Stop it with stop.sh FOLDER. Needs the Debian packages slurm-wlm and munge (Slurm 22.05).
# Exit status 0 once a probe job has run (about 3 s), 1 with the reason on stderr otherwise (nothing left running).
set -euo pipefail

folder=${1:?"usage: $0 FOLDER (a new or empty folder for the cluster's key, socket, state and logs)"}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$folder"
folder=$(cd "$folder" && pwd)

fail() {
    echo "slurm test cluster: $1" >&2
    "$here/stop.sh" "$folder" >/dev/null 2>&1 || true
    exit 1
}
log_tail() { tail -n 3 "$folder/log/$1.log" 2>/dev/null | tr '\n' ' '; }

PATH="$PATH:/usr/sbin:/sbin"  # the daemons' folders, which a user's PATH may lack
for program in munged mungekey slurmctld slurmd sinfo sbatch squeue scancel python3; do
    command -v "$program" >/dev/null || fail "$program not found: install the Debian packages slurm-wlm and munge"
done
[ "$(id -u)" = 0 ] || fail "needs root (slurmd starts each job as its submitting user)"
if [ -e "$folder/slurm.conf" ]; then  # not fail(): that would stop the cluster there
    echo "slurm test cluster: $folder already holds a cluster: stop it with stop.sh, or use a new folder" >&2
    exit 1
fi

mkdir -p "$folder/munge" "$folder/state" "$folder/spool" "$folder/log"
chmod 755 "$folder/munge"  # munged refuses a socket folder that others may write to

# Two free TCP ports for slurmctld and slurmd, so that several test clusters can run on one machine.
read -r controller_port node_port < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in sockets))')

# "NodeName=HOST CPUs=... RealMemory=..." of this machine as slurmd sees it; its NodeName is `hostname -s`.
# The daemons talk over 127.0.0.1, so that the host name need not resolve.
node_line=$(slurmd -C | head -n 1)

cat > "$folder/slurm.conf" <<CONF
ClusterName=nnunetmargintest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$controller_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$folder/munge/munge.socket
StateSaveLocation=$folder/state
SlurmdSpoolDir=$folder/spool
SlurmctldPidFile=$folder/slurmctld.pid
SlurmdPidFile=$folder/slurmd.pid
SlurmctldLogFile=$folder/log/slurmctld.log
SlurmdLogFile=$folder/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# Cores are allocated, memory is not (a job without --mem would otherwise hold all of the node's memory).
SelectTypeParameters=CR_Core
# Start a submitted job at once instead of up to 3 s later.
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
GresTypes=gpu
$node_line NodeAddr=127.0.0.1 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# Two stand-in GPUs, so that jobs may ask for --gres=gpu:N; task/none confines nothing, so no device is touched.
echo "Name=gpu File=/dev/null,/dev/zero" > "$folder/gres.conf"
export SLURM_CONF="$folder/slurm.conf"

mungekey --create --keyfile="$folder/munge.key" >/dev/null 2>&1 || fail "mungekey could not create a key"
munged --force --key-file="$folder/munge.key" --socket="$folder/munge/munge.socket" \
    --pid-file="$folder/munged.pid" --log-file="$folder/log/munged.log" --seed-file="$folder/munged.seed" \
    >>"$folder/log/munged.log" 2>&1 || fail "munged did not start: $(log_tail munged)"
slurmctld -i >>"$folder/log/slurmctld.log" 2>&1 || fail "slurmctld did not start: $(log_tail slurmctld)"
slurmd >>"$folder/log/slurmd.log" 2>&1 || fail "slurmd did not start: $(log_tail slurmd)"

# Ready once a job has run: the controller's first scheduling pass comes about 3 s after its start.
probe=$(sbatch --parsable --job-name=probe --output="$folder/log/probe.log" --wrap=true 2>&1) \
    || fail "the probe job was refused: $probe $(log_tail slurmctld)"
for _ in $(seq 200); do
    if [ -z "$(squeue --noheader --jobs="$probe" --states=PENDING,RUNNING,COMPLETING 2>/dev/null)" ]; then
        state=$(squeue --noheader --jobs="$probe" --states=all --format=%T 2>/dev/null)
        [ "$state" = COMPLETED ] || fail "the probe job ended $state: $(log_tail slurmd)"
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 0.05
done
fail "the probe job did not run in 10 s: $(log_tail slurmctld) $(log_tail slurmd)"
