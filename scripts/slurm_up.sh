#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for tests/e2e/test_slurm_real.py (Debian/Ubuntu, root, no systemd needed):
# munged, slurmctld and slurmd from the distribution's slurm-wlm, one partition `debug` over all cores and 2/3 of
# the memory; with ACCOUNTING=1 also MariaDB + slurmdbd, so sacct answers (ACCOUNTING=0, the default here: squeue
# only, as on a cluster without accounting; membench needs neither).
#   sudo bash scripts/slurm_up.sh      # ~2 s once the packages are there (apt-get installs them, ~20-60 s)
#   sudo bash scripts/slurm_down.sh    # stops exactly what this started (pids in $PIDFILE)
# Exit codes the tests read as "skip": 3 not root, 4 no packages and no apt-get to install them.
set -euo pipefail
ACCOUNTING=${ACCOUNTING:-0}
PIDFILE=${PIDFILE:-/run/membench-slurm.pids}
start=$SECONDS
log() { echo "[slurm_up +$((SECONDS - start))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm_up: needs root (it starts slurmctld and slurmd)" >&2; exit 3; }
need=(slurm-wlm munge)
[ "$ACCOUNTING" = 1 ] && need+=(slurmdbd mariadb-server)
if ! dpkg -s "${need[@]}" >/dev/null 2>&1; then
  command -v apt-get >/dev/null || { echo "slurm_up: ${need[*]} missing and no apt-get" >&2; exit 4; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { echo "slurm_up: apt-get could not install ${need[*]}" >&2; exit 4; }
fi
log "packages: ${need[*]}"
: > "$PIDFILE"

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry every 0.1 s, fail with a line naming WHAT and its log
  local n=$(($1 * 10)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    n=$((n - 1)); [ $n -gt 0 ] || { echo "slurm_up: $what did not come up (see /var/log/slurm/)" >&2; exit 5; }
    sleep 0.1
  done
}

# munge: the key and the daemon, run as the munge user
[ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key 2>/dev/null \
  || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
su -s /bin/sh munge -c /usr/sbin/munged
wait_for 5 munged test -s /run/munge/munged.pid
cat /run/munge/munged.pid >> "$PIDFILE"
log "munged"

node=$(hostname)
install -d -o slurm -g slurm /var/spool/membench-slurmctld /var/log/slurm /run/slurm
install -d /var/spool/slurmd
rm -f /run/slurm/slurmctld.pid /run/slurm/slurmd.pid /run/slurm/slurmdbd.pid  # a previous run's: waits read them
accounting="AccountingStorageType=accounting_storage/none"
[ "$ACCOUNTING" = 1 ] && accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=membench
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
$accounting
ReturnToService=2
MinJobAge=300
KillWait=10
InactiveLimit=0
MaxArraySize=1001
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/membench-slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc --all) RealMemory=$(( $(free -m | awk '/^Mem:/{print $2}') * 2 / 3 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  /usr/sbin/mariadbd --user=mysql --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
    --bind-address=127.0.0.1 >/var/log/slurm/mariadb.log 2>&1 &
  echo $! >> "$PIDFILE"
  wait_for 20 mariadb mysqladmin ping
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost'; ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'membench';
            CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  umask 077
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageUser=slurm
StoragePass=membench
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
CONF
  umask 022
  chown slurm:slurm /etc/slurm/slurmdbd.conf
  /usr/sbin/slurmdbd
  wait_for 5 slurmdbd test -s /run/slurm/slurmdbd.pid
  cat /run/slurm/slurmdbd.pid >> "$PIDFILE"
  wait_for 20 'slurmdbd (port 6819)' bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
  sacctmgr -i add cluster membench >/dev/null 2>&1 || true  # already there on a second start
  log "mariadb + slurmdbd"
fi

/usr/sbin/slurmctld -i
/usr/sbin/slurmd
wait_for 10 'slurmctld/slurmd' test -s /run/slurm/slurmctld.pid -a -s /run/slurm/slurmd.pid
cat /run/slurm/slurmctld.pid /run/slurm/slurmd.pid >> "$PIDFILE"
wait_for 20 'an idle node' bash -c 'sinfo -h -o %T | grep -qx idle'
srun -n1 true
log "slurm up: $(sinfo -h -o '%P %D %c %T')"
