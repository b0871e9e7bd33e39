#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on localhost for tests (as root, no systemd).
#   scripts/slurm-test-cluster.sh install   Debian packages (slurmctld slurmd munge slurmdbd mariadb)
#   scripts/slurm-test-cluster.sh up        start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   scripts/slurm-test-cluster.sh down      stop what `up` started (pid files), cancel its jobs
# State lives in $SLURM_TEST_DIR (default /tmp/atelier-slurm). Accounting (slurmdbd) is
# there because submitit polls sacct: without it a killed job leaves a sweep waiting.
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/atelier-slurm}
DB_PORT=${SLURM_TEST_DB_PORT:-33061}
CPUS=${SLURM_TEST_CPUS:-8}   # advertised (config_overrides): lets sweeps run in parallel on 2 cores

log() { echo "slurm-test-cluster: $*"; }

wait_for() {  # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "timed out waiting for $what"; tail -n 20 "$DIR"/log/* 2>/dev/null || true; exit 1; }
    sleep 0.5
  done
}

install() {
  local missing=0
  for cmd in slurmctld slurmd sinfo munged slurmdbd mariadbd; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 1 ] || { log "packages already installed"; return 0; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
}

write_configs() {
  mkdir -p "$DIR"/{etc,log,run,spool/ctld,spool/d,mysql,mysql-run}
  cat >"$DIR/etc/slurm.conf" <<CONF
ClusterName=atelier
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=30
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  # Fake GPUs for scheduling: slurm wants device files, /dev/null links do.
  ln -sf /dev/null "$DIR/run/gpu0"; ln -sf /dev/null "$DIR/run/gpu1"
  cat >"$DIR/etc/gres.conf" <<CONF
NodeName=localhost Name=gpu File=$DIR/run/gpu0
NodeName=localhost Name=gpu File=$DIR/run/gpu1
CONF
  cat >"$DIR/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
CONF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
    log "munged already running: using it, and leaving it running at 'down'"
    return 0
  fi
  runuser -u munge -- /usr/sbin/munged 2>>"$DIR/log/munged.log" || true
  wait_for 20 munged munge -n
  # munged (user munge) cannot write a pid file into our root-owned run dir: record it here,
  # so that 'down' stops the munged this script started.
  pgrep -n -u munge -x munged >"$DIR/run/munged.pid"
}

start_mariadb() {
  chown -R mysql:mysql "$DIR/mysql" "$DIR/mysql-run"
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=normal >/dev/null
  fi
  mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysql-run/mysqld.sock" \
    --pid-file="$DIR/mysql-run/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --skip-name-resolve --log-error="$DIR/log/mariadb.log" </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
  wait_for 60 mariadb mariadb-admin --socket="$DIR/mysql-run/mysqld.sock" ping
}

up() {
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already up: export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  write_configs
  start_munge
  start_mariadb
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd bash -c "ss -ltn | grep -q ':6819 '"
  slurmctld -f "$SLURM_CONF"
  wait_for 60 slurmctld scontrol ping
  slurmd -f "$SLURM_CONF"
  wait_for 60 "the node" bash -c "sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'"
  log "up: export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid <pid file>: stop a daemon we started
  local file=$1
  [ -f "$file" ] || return 0
  local pid; pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  export SLURM_CONF="$DIR/etc/slurm.conf"
  # slurmstepd outlives slurmd: cancel jobs first.
  scancel --full --quiet -u root 2>/dev/null || true
  sleep 1
  for daemon in slurmd slurmctld slurmdbd; do stop_pid "$DIR/run/$daemon.pid"; done
  stop_pid "$DIR/mysql-run/mariadbd.pid"
  stop_pid "$DIR/run/munged.pid"
  log "down"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  *) echo "usage: $0 install|up|down" >&2; exit 2 ;;
esac
