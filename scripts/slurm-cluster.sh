#!/usr/bin/env bash
# A real Slurm 22.05 "cluster" on this one host, for the Slurm tests and for trying `torchx run -s slurm`.
# Debian 12, as root. Idempotent: running `start` again only starts what is not running.
#
#   scripts/slurm-cluster.sh [start]   install if missing, configure, start, wait until the nodes are idle
#   scripts/slurm-cluster.sh stop      cancel all jobs, stop the daemons this script started
#   scripts/slurm-cluster.sh status    daemons and `sinfo`
#
# Knobs (environment): SLURM_DIR (state and logs, default /var/tmp/torchx-diloco-slurm),
# SLURM_NODES (fake nodes, default 4), SLURM_NODE_CPUS (CPUs each advertises, default 4),
# SLURM_NODE_MEM (MB each advertises, default 16000).
#
# Why several fake nodes: sched/backfill, the only scheduler that starts heterogeneous jobs (TorchX submits one
# het job per app: a component per role replica), reserves whole nodes while planning; with a single node the
# components of one job wait for each other forever (Reason=Resources). So each fake node runs its own
# `slurmd -N <name>` on its own port, its name resolves to 127.0.0.1, and it lives in its own UTS namespace so
# `hostname` inside a job step is the node name (torchrun's rendezvous decides "am I the store host?" by name).
# No slurmdbd/MariaDB (~190 MB): `sacct` is not available; the project's TorchX plugin copes without it, and
# MinJobAge keeps finished jobs visible to squeue/scontrol for an hour.
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/var/tmp/torchx-diloco-slurm}
SLURM_NODES=${SLURM_NODES:-4}
SLURM_NODE_CPUS=${SLURM_NODE_CPUS:-4}
SLURM_NODE_MEM=${SLURM_NODE_MEM:-16000}
NODE_PREFIX=dlnode            # nodes: dlnode1 .. dlnodeN
STATE=$SLURM_DIR/state
LOGS=$SLURM_DIR/log
CONF=/etc/slurm/slurm.conf
HOSTS_TAG="# torchx-diloco slurm nodes"
export DEBIAN_FRONTEND=noninteractive

say() { echo "[slurm-cluster $(date +%T)] $*"; }
die() { echo "slurm-cluster: $*" >&2; exit 1; }

# a pid file that names a live process (a zombie is not alive: PID 1 here reaps orphans lazily)
alive() {
  [ -s "$1" ] || return 1
  local st
  st=$(awk '{print $3}' "/proc/$(cat "$1")/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

stop_pidfile() {  # SIGTERM, up to 10 s, then SIGKILL; only the process named in our own pid file
  local f=$1 pid st
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  say "stopping $(basename "$f" .pid) (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || break
    [ "$st" = Z ] && break
    sleep 0.1
  done
  if alive "$f"; then say "pid $pid still there, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$f"
}

cancel_jobs() {  # jobs' processes would outlive slurmd otherwise
  alive "$STATE/slurmctld.pid" || return 0
  local ids
  ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || return 0
  [ -n "${ids// }" ] || return 0
  say "cancelling jobs: $ids"
  scancel $ids 2>/dev/null || true
  for _ in $(seq 100); do
    [ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
    sleep 0.1
  done
}

stop_daemons() {  # slurmd before slurmctld (slurmd can hang in shutdown without its controller)
  local f
  for f in "$STATE"/slurmd.*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  stop_pidfile "$STATE/slurmctld.pid"
}

cmd=${1:-start}
case $cmd in
  stop)
    cancel_jobs; stop_daemons
    stop_pidfile "$STATE/munged.pid"  # only if this script started it
    exit 0 ;;
  status)
    for f in "$STATE"/*.pid; do
      [ -e "$f" ] || continue
      if alive "$f"; then echo "$(basename "$f" .pid): up (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): down"; fi
    done
    sinfo 2>&1 || true
    exit 0 ;;
  start) ;;
  *) die "unknown command '$cmd': use start, stop or status" ;;
esac

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and runs the Slurm daemons): run it with sudo"
t0=$(date +%s)

# ------------------------------------------------------------------ packages (Debian 12: Slurm 22.05)
missing=""
for p in slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || die "apt-get not found: install$missing yourself (Debian/Ubuntu packages)"
  say "apt-get install$missing"
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
mkdir -p "$STATE/ctld" "$LOGS"
for i in $(seq 1 "$SLURM_NODES"); do mkdir -p "$STATE/spool/$NODE_PREFIX$i"; done

# ------------------------------------------------------------------ node names -> 127.0.0.1
names=$(for i in $(seq 1 "$SLURM_NODES"); do printf '%s ' "$NODE_PREFIX$i"; done)
line="127.0.0.1 ${names% } $HOSTS_TAG"
if ! grep -qxF "$line" /etc/hosts; then
  # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file
  grep -vF "$HOSTS_TAG" /etc/hosts > "$STATE/hosts.new" || true
  echo "$line" >> "$STATE/hosts.new"
  cat "$STATE/hosts.new" > /etc/hosts
  rm -f "$STATE/hosts.new"
fi

# ------------------------------------------------------------------ munge (authentication between the daemons)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$STATE/munged.pid"
fi

# ------------------------------------------------------------------ slurm.conf
new_conf=$(mktemp)
cat > "$new_conf" <<EOF
# Written by torchx-diloco scripts/slurm-cluster.sh: a single-host test cluster.
ClusterName=torchx-diloco
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# backfill is what starts heterogeneous jobs: every second instead of every 30 s
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# nodes advertise more CPUs/memory than this host has
SlurmdParameters=config_overrides
ReturnToService=2
# without accounting, finished jobs stay queryable (squeue/scontrol, so torchx status/log) this long
MinJobAge=3600
KillWait=5
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
for i in $(seq 1 "$SLURM_NODES"); do
  echo "NodeName=$NODE_PREFIX$i NodeHostname=$NODE_PREFIX$i NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$SLURM_NODE_CPUS Sockets=1 CoresPerSocket=$SLURM_NODE_CPUS ThreadsPerCore=1 RealMemory=$SLURM_NODE_MEM State=UNKNOWN" >> "$new_conf"
done
echo "PartitionName=debug Nodes=$NODE_PREFIX[1-$SLURM_NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$new_conf"
if ! cmp -s "$new_conf" "$CONF"; then
  [ -e "$CONF" ] && ! grep -q "^# Written by torchx-diloco" "$CONF" \
    && die "$CONF exists and was not written by this script: move it away first"
  say "writing $CONF"
  cancel_jobs
  stop_daemons  # restart everything on a new configuration
  install -D -m 0644 "$new_conf" "$CONF"
fi
rm -f "$new_conf"

# ------------------------------------------------------------------ daemons
started=0
if ! alive "$STATE/slurmctld.pid"; then
  started=1
  say "starting slurmctld"
  /usr/sbin/slurmctld -i  # daemonizes; -i: start even if the saved state is unreadable
fi
for i in $(seq 1 "$SLURM_NODES"); do
  n=$NODE_PREFIX$i
  if ! alive "$STATE/slurmd.$n.pid"; then
    started=1
    say "starting slurmd $n"
    unshare --uts sh -c "hostname $n && exec /usr/sbin/slurmd -N $n"  # daemonizes
  fi
done

# ------------------------------------------------------------------ wait until every node takes jobs
ready=0
for k in $(seq 300); do
  up=$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l || true)
  if [ "${up:-0}" -ge "$SLURM_NODES" ]; then ready=1; break; fi
  if [ $((k % 25)) = 0 ]; then  # a node left DOWN/DRAINED by an earlier run (e.g. a killed slurmd) comes back
    down=$(sinfo -h -N -t down,drain -o %N 2>/dev/null | sort -u | paste -sd, || true)
    [ -z "$down" ] || scontrol update NodeName="$down" State=RESUME 2>/dev/null || true
  fi
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  sinfo -N -l >&2 || true
  die "nodes not idle after 60 s: see $LOGS/slurmctld.log and $LOGS/slurmd.*.log"
fi
# the saved state may say idle before a restarted slurmd registered: a step on every node proves it
if [ "$started" = 1 ]; then
  timeout 60 srun -N "$SLURM_NODES" -t 1 true || die "a test step on all nodes failed: see $LOGS/slurmd.*.log"
fi
sinfo
say "cluster ready in $(( $(date +%s) - t0 ))s (state and logs: $SLURM_DIR)"
