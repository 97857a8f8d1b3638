#!/usr/bin/env bash
# ceph-mini.sh: a real single-node Ceph cluster (1 mon, 1 osd, no mgr, no
# systemd) with RBD images exported over NBD by qemu-nbd, for tests.
# The project's copy of the workplace's shared test helper of the same name
# (issue 15: Ceph RBD as the reference storage engine); the tests in
# test/blockdev/ceph-rbd.interop.test.ts and the fleet tests start it through
# test/blockdev/ceph.ts. scripts/install-deps.sh installs what it needs.
#
# Usage:
#   ceph-mini.sh up DIR                    -> line 1: NBD URI of DIR's 1 GiB image rbd/img
#                                             line 2: path of DIR/ceph.conf
#   ceph-mini.sh export DIR POOL/IMAGE SIZE -> creates pool/image if missing, exports it,
#                                             prints its NBD URI (SIZE as for rbd: 256M, 1G)
#   ceph-mini.sh stop DIR                  -> stops the daemons it started, keeps the data
#   ceph-mini.sh down DIR                  -> stops them and deletes what up made in DIR
#   ceph-mini.sh status DIR                -> one line per daemon: name pid alive|dead
# Only stdout carries the results; progress and errors go to stderr.
# `up` is idempotent: on a running cluster it only prints; after a crash
# (e.g. `kill -9 $(cat DIR/run/osd.0.pid)`) it restarts what is not running
# and re-exports every image listed in DIR/exports.
#
# Needs (Debian 12; 51 packages, 50 MB download, 200 MB on disk, ~70 s to install):
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-common qemu-block-extra
#   plus qemu-utils (qemu-nbd), libnbd-bin (nbdinfo, nbdcopy), iproute2 (ss),
#   util-linux (setsid, flock), python3 (/usr/bin/python3 + python3-rados, pulled in
#   by ceph-common). No kernel module (no rbd.ko, no nbd.ko), no ceph-mgr, no
#   systemd, nothing outside DIR. Debian 12's nbdkit 1.32 has no rbd plugin, so
#   qemu-nbd's rbd driver (block-rbd.so from qemu-block-extra) serves the image.
#
# Measured on the 2-vCPU/24 GiB dev machine, Ceph 16.2.15 / qemu 7.2, while
# another job kept the load average at 2.5-5 (numbers: lighter load .. heavier):
#   `up` from scratch, DIR on tmpfs (/dev/shm/...): 1.8-2.0 s .. 2.4-3.1 s, about
#   2.3 CPU-seconds in all; DIR on ext4 about 0.5 s more. `up` on a running cluster:
#   0.15-0.5 s. After kill -9 of the OSD, `up` restarts it and waits for its PGs:
#   0.7-0.9 s .. 1.6-2.0 s; the old qemu-nbd's next I/O then completes in ~0.25 s.
#   `down`: 0.6-1.2 s. `export` of a new image: 0.6-1.4 s.
#   nbdcopy of 256 MiB of random data into / out of an exported image:
#   DIR on tmpfs: write 206-240 .. 103-157 MiB/s, read 186-222 .. 110-138 MiB/s;
#   DIR on ext4: write 83-134 MiB/s, read 93-161 MiB/s.
#   CPU for that 256 MiB: ceph-osd ~1.0-1.4 s writing, ~0.6-1.0 s reading; qemu-nbd
#   ~0.55 s each way; ceph-mon ~0. RSS: ceph-mon ~30 MB, ceph-osd ~40 MB fresh /
#   ~65 MB idle / ~100 MB after I/O (osd memory target 1 GiB), qemu-nbd ~32 MB
#   (peak ~60-75 MB during nbdcopy). Idle CPU: ceph-osd 1-1.6 %, mon and qemu-nbd
#   0.1-0.2 %. The data lives in DIR: in RAM when DIR is on tmpfs (~300 MB of
#   /dev/shm after 256 MiB written, ~40 MB right after `up`).
#
# Limits / pitfalls found:
#   * Everything binds to 127.0.0.1 only (msgr v2 only; the mon on a free port in
#     40000-40999, the OSD on 6800-7300); NBD is a unix socket DIR/nbd/POOL.IMAGE.sock,
#     so DIR must be short (unix socket paths are limited to 107 bytes).
#   * bluestore opens its block file with O_DIRECT: DIR on tmpfs needs Linux >= 6.6.
#   * No mgr: `ceph -s` shows 0 pools/pgs and HEALTH_WARN "no active mgr"; I/O is fine.
#     Commands routed to the mgr (`ceph config show`, `ceph pg ...`, `ceph tell`,
#     `ceph osd pool autoscale-status`, `rbd perf`, `rbd task`) HANG without a mgr:
#     avoid them (or use the admin socket: ceph --admin-daemon DIR/run/osd.0.asok ...).
#   * auth is off (auth_*_required = none): fine on loopback for a test.
#   * The default bluestore on the sparse file DIR/osd.0/block (8 GiB) keeps the data
#     across kill -9 of the OSD (tested) and of the mon or qemu-nbd. CEPH_MINI_STORE=memstore keeps the objects in the
#     OSD's RAM (slower to write, ~400 MB RSS for 256 MiB): they survive a clean stop
#     (`stop`, saved into DIR/osd.0) but not kill -9 (the OSD would come back without
#     its PGs and all I/O would block forever, so `up` then refuses).
#   * Images get only the `layering` feature (no exclusive-lock/object-map), so several
#     clients (several qemu-nbd) can write one image at once; qemu-nbd runs with
#     --cache=none (no librbd cache, nothing lost if qemu-nbd is killed). With
#     exclusive-lock two writers still work but the lock ping-pongs (3x slower).
#   * qemu-nbd serves up to 8 NBD connections (--shared=8), keeps running after a
#     client disconnects (--persistent), passes TRIM to RBD (--discard=unmap).
#     While its OSD is down a qemu-nbd ignores SIGTERM; stop/down then SIGKILL it.
#   * Without tuning, `up` took 10 s: the mon batches map changes for 1 s
#     (paxos propose interval), bluestore's aio thread polls every 250 ms and every
#     close of the block file waits for it, and clients noticed a restarted OSD only
#     at their 5 s objecter tick. ceph.conf below sets all three lower.
#   * /usr/bin/python3 is used on purpose: a pyenv python3 first in PATH lacks rados.
#
# Typical test use:
#   { read -r URI; read -r CONF; } < <(ceph-mini.sh up /dev/shm/ceph-t)
#   nbdcopy data.bin "$URI"; kill -9 "$(cat /dev/shm/ceph-t/run/osd.0.pid)"
#   ceph-mini.sh up /dev/shm/ceph-t >/dev/null     # brings the OSD back
#   ceph-mini.sh down /dev/shm/ceph-t
#
# Environment knobs:
#   CEPH_MINI_STORE     bluestore (default) | memstore
#   CEPH_MINI_OSD_BYTES size of the OSD (sparse file / memstore cap), default 8 GiB
#   CEPH_MINI_FEATURES  rbd image features for new images, default "layering"
#   CEPH_MINI_CACHE     qemu-nbd --cache mode, default "none"
#   CEPH_MINI_TIMEOUT   seconds to wait for a step, default 60
set -euo pipefail

STORE=${CEPH_MINI_STORE:-bluestore}
OSD_BYTES=${CEPH_MINI_OSD_BYTES:-8589934592}
FEATURES=${CEPH_MINI_FEATURES:-layering}
CACHE=${CEPH_MINI_CACHE:-none}
TMO=${CEPH_MINI_TIMEOUT:-60}

die() { echo "ceph-mini: $*" >&2; exit 1; }

need() {
  local c missing=()
  for c in ceph-mon ceph-osd monmaptool rbd qemu-nbd setsid flock ss timeout; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  /usr/bin/python3 -c 'import rados' 2>/dev/null || missing+=("python3-rados")
  compgen -G '/usr/lib/*/qemu/block-rbd.so' >/dev/null || missing+=("qemu block-rbd.so")
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]}; install with: apt-get install -y" \
    "--no-install-recommends ceph-mon ceph-osd ceph-common qemu-block-extra qemu-utils iproute2"
}
log() { echo "ceph-mini: $*" >&2; }

usage() {
  sed -n '/^# Usage:/,/^# Only stdout/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# alive PIDFILE: true when the pid in PIDFILE runs and its command line names
# this cluster's DIR (so a recycled pid is never taken for ours).
alive() {
  local f=$1 pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  local cmdline
  cmdline=$({ tr '\0' ' ' </proc/"$pid"/cmdline; } 2>/dev/null) || return 1
  [[ $cmdline == *"$D/"* ]] || return 1
  # a zombie is not alive
  [[ $({ awk '{print $3}' </proc/"$pid"/stat; } 2>/dev/null) != Z ]]
}

# stop_pid PIDFILE [GRACE]: SIGTERM, wait up to GRACE seconds (default 10),
# then SIGKILL (and set KILLED=1); only our own pids.
KILLED=0
GRACE=
stop_pid() {
  local f=$1 g=${GRACE:-${2:-10}} pid i
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(<"$f")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < g * 10; i++)); do
    alive "$f" || break
    sleep 0.1
  done
  if alive "$f"; then
    log "pid $pid ($f) still there ${g}s after SIGTERM, sending SIGKILL"
    KILLED=1
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$f" || break; sleep 0.1; done
  fi
  rm -f "$f"
}

rbd_() { timeout "$TMO" rbd -c "$CONF" "$@"; }

# mon_py OP...: mon commands in one python process (the ceph CLI costs ~0.4 s
# a call). OPs: osd-new=UUID (prints the new id), pool=NAME (create + enable
# rbd on it; both idempotent).
mon_py() {
  timeout "$TMO" /usr/bin/python3 - "$CONF" "$TMO" "$@" <<'PY'
import json, sys
import rados
conf, tmo, ops = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
c = rados.Rados(conffile=conf)
c.connect(timeout=tmo)
def mon(**cmd):
    r, out, err = c.mon_command(json.dumps(cmd), b"", timeout=tmo)
    if r != 0:
        sys.exit("ceph-mini: mon command %r failed: %d %s" % (cmd, r, err))
    return out.decode()
for op in ops:
    kind, _, arg = op.partition("=")
    if kind == "osd-new":
        print(mon(prefix="osd new", uuid=arg).strip())
    elif kind == "pool":
        mon(prefix="osd pool create", pool=arg, pg_num=8, pgp_num=8,
            pool_type="replicated", autoscale_mode="off")
        mon(prefix="osd pool application enable", pool=arg, app="rbd")
    else:
        sys.exit("ceph-mini: bad op " + op)
c.shutdown()
PY
}

free_port() {
  local p start
  start=$((40000 + $(printf '%s' "$D" | cksum | cut -d' ' -f1) % 1000))
  for ((p = start; p < 41000; p++)); do
    [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]] && { echo "$p"; return; }
  done
  for ((p = 40000; p < start; p++)); do
    [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]] && { echo "$p"; return; }
  done
  die "no free port in 40000-40999"
}

write_conf() {
  local fsid=$1 port=$2 osdconf
  if [[ $STORE == memstore ]]; then
    osdconf="osd objectstore = memstore
memstore device bytes = $OSD_BYTES
osd fast shutdown = false"
  else
    osdconf="osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mkfs = false
# no RocksDB column-family sharding: ~0.5 s less for mkfs + mount
bluestore rocksdb cfs = \"\"
debug rocksdb = 1/5
debug bluefs = 1/5
debug bdev = 1/5
debug bluestore = 1/5
osd memory target = 1073741824"
  fi
  cat >"$CONF.tmp" <<EOF
# generated by ceph-mini.sh; store = $STORE
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind msgr1 = false
ms bind msgr2 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = $D/run
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd failsafe full ratio = .99
mon osd full ratio = .99
mon osd nearfull ratio = .98
mon osd backfillfull ratio = .985
# speed: the mon batches map changes for 1 s by default; bdev aio threads poll
# every 250 ms, and every close of the block device waits for one poll.
paxos propose interval = 0.02
paxos min wait = 0.01
bdev aio poll ms = 10
[mon]
mon data = $D/mon.\$id
log file = $D/log/\$name.log
mon cluster log file = $D/log/cluster.log
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
[osd]
osd data = $D/osd.\$id
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
osd crush update on start = true
osd op num shards = 2
osd op num threads per shard = 1
$osdconf
[client]
# a client whose OSD restarted asks for the new map at its next tick (default 5 s)
objecter tick interval = 0.5
admin socket =
log file =
EOF
  mv "$CONF.tmp" "$CONF"
}

STARTED=0
start_mon() {
  alive "$D/run/mon.a.pid" && return 0
  STARTED=1
  rm -f "$D/run/mon.a.pid" "$D/run/mon.a.asok"
  ceph-mon -c "$CONF" -i a </dev/null >>"$D/log/start.log" 2>&1 9>&- || die "ceph-mon failed to start, see $D/log"
}

start_osd() {
  alive "$D/run/osd.0.pid" && return 0
  STARTED=1
  if [[ $STORE == memstore && -e $D/osd.0/.was-running ]]; then
    die "the memstore OSD died without a clean stop: its data is gone; run: $0 down $D && $0 up $D"
  fi
  rm -f "$D/run/osd.0.pid" "$D/run/osd.0.asok"
  ceph-osd -c "$CONF" -i 0 </dev/null >>"$D/log/start.log" 2>&1 9>&- || die "ceph-osd failed to start, see $D/log"
  [[ $STORE == memstore ]] && : >"$D/osd.0/.was-running"
  return 0
}

# export_image POOL IMAGE: start qemu-nbd for POOL/IMAGE unless running; print URI.
# qemu-nbd runs in the background in its own session (not --fork: a --fork'ed
# qemu-nbd that hangs opening the image cannot be found again); it writes
# its own pid file only once the image is open, which is the readiness signal.
export_image() {
  local pool=$1 img=$2 sock pidf ready pid i
  sock="$D/nbd/$pool.$img.sock"
  pidf="$D/run/nbd.$pool.$img.pid"
  ready="$D/run/nbd.$pool.$img.ready"
  ((${#sock} < 108)) || die "socket path too long (${#sock} bytes): $sock; use a shorter DIR"
  if ! alive "$pidf"; then
    rm -f "$sock" "$pidf" "$ready"
    setsid qemu-nbd --persistent --shared=8 -f raw --cache="$CACHE" --discard=unmap \
      --pid-file="$ready" --socket="$sock" "rbd:$pool/$img:conf=$CONF" \
      </dev/null >>"$D/log/qemu-nbd.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$pidf"
    for ((i = 0; i < TMO * 50; i++)); do
      [[ -s $ready && -S $sock ]] && break
      # (not `alive`: until setsid has exec'd qemu-nbd, $pid's command line is ours)
      if ! kill -0 "$pid" 2>/dev/null ||
        [[ $({ awk '{print $3}' </proc/"$pid"/stat; } 2>/dev/null) == Z ]]; then
        rm -f "$pidf"
        die "qemu-nbd for $pool/$img exited, see $D/log/qemu-nbd.log"
      fi
      sleep 0.02
    done
    if ! [[ -s $ready && -S $sock ]]; then
      stop_pid "$pidf"
      die "qemu-nbd for $pool/$img not ready after ${TMO}s (cluster unhealthy?), see $D/log"
    fi
    grep -qxF "$pool/$img" "$D/exports" 2>/dev/null || echo "$pool/$img" >>"$D/exports"
  fi
  echo "nbd+unix:///?socket=$sock"
}

ensure_pool() {
  mon_py "pool=$1" >/dev/null || die "cannot create pool $1"
}

ensure_image() {
  local pool=$1 img=$2 size=$3
  if ! rbd_ info "$pool/$img" >/dev/null 2>&1; then
    rbd_ create --size "$size" --image-feature "$FEATURES" "$pool/$img" ||
      die "cannot create image $pool/$img"
  fi
}

cmd_up() {
  mkdir -p "$D"
  cd "$D"
  if [[ ! -e $D/.ceph-mini ]]; then
    local fsid port uuid mkfs_pid osd_id
    # from scratch (what a failed `up` left is stopped and redone)
    cmd_stop
    rm -rf "$D/mon.a" "$D/osd.0" "$D/run" "$D/log" "$D/nbd" "$D/exports" "$D/monmap"
    mkdir -p run log nbd
    fsid=$(cat /proc/sys/kernel/random/uuid)
    uuid=$(cat /proc/sys/kernel/random/uuid)
    port=$(free_port)
    if [[ $STORE == bluestore ]] &&
      ! dd if=/dev/zero of="$D/.odirect" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
      rm -f "$D/.odirect"
      die "bluestore needs O_DIRECT, which $D's filesystem lacks (tmpfs before Linux 6.6?)"
    fi
    rm -f "$D/.odirect"
    write_conf "$fsid" "$port"
    mkdir -p "$D/mon.a" "$D/osd.0"
    # the OSD's mkfs (the slow part) runs while the mon is made and started,
    # registers osd.0 and makes pool rbd
    ceph-osd -c "$CONF" -i 0 --mkfs --no-mon-config --osd-uuid "$uuid" \
      </dev/null >>"$D/log/osd-mkfs.log" 2>&1 9>&- &
    mkfs_pid=$!
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$D/monmap" >/dev/null
    ceph-mon -c "$CONF" -i a --mkfs --monmap "$D/monmap" 2>>"$D/log/start.log" ||
      { wait "$mkfs_pid" || true; die "ceph-mon --mkfs failed, see $D/log/start.log"; }
    start_mon
    osd_id=$(mon_py "osd-new=$uuid" pool=rbd) || { wait "$mkfs_pid" || true; die "mon commands failed"; }
    wait "$mkfs_pid" || die "ceph-osd --mkfs failed, see $D/log/osd-mkfs.log"
    [[ $osd_id == 0 ]] || die "ceph osd new gave osd.$osd_id, not osd.0"
    start_osd
    rbd_ create --size 1G --image-feature "$FEATURES" rbd/img || die "rbd create rbd/img failed"
    echo "$STORE" >"$D/.ceph-mini"
  else
    STORE=$(<"$D/.ceph-mini")
    mkdir -p run log nbd
    start_mon
    start_osd
    if ((STARTED)); then
      # returns once the OSD is up and its PGs are active
      rbd_ info rbd/img >/dev/null || die "the restarted cluster does not serve rbd/img, see $D/log"
    fi
  fi
  local line uri=""
  # re-export every image that was exported before (after a crash or stop)
  touch "$D/exports"
  while read -r line; do
    [[ -n $line && $line != rbd/img ]] || continue
    export_image "${line%%/*}" "${line#*/}" >/dev/null
  done <"$D/exports"
  uri=$(export_image rbd img)
  echo "$uri"
  echo "$CONF"
}

cmd_export() {
  local spec=$1 size=$2 pool img
  [[ $spec == */* ]] || die "export: want POOL/IMAGE, got $spec"
  pool=${spec%%/*}
  img=${spec#*/}
  [[ $pool =~ ^[A-Za-z0-9_.-]+$ && $img =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad pool/image name: $spec"
  [[ -e $D/.ceph-mini ]] || die "no cluster in $D: run $0 up $D first"
  STORE=$(<"$D/.ceph-mini")
  if ! alive "$D/run/mon.a.pid" || ! alive "$D/run/osd.0.pid"; then
    die "cluster in $D is not running: run $0 up $D"
  fi
  if alive "$D/run/nbd.$pool.$img.pid"; then
    export_image "$pool" "$img" # already exported: only prints the URI
    return
  fi
  ensure_pool "$pool"
  ensure_image "$pool" "$img" "$size"
  export_image "$pool" "$img"
}

cmd_stop() {
  local f
  [[ -d $D/run ]] || return 0
  for f in "$D"/run/nbd.*.pid; do
    # with --cache=none qemu-nbd holds no unwritten data; it ignores SIGTERM
    # while a request waits on a dead OSD
    [[ -e $f ]] && stop_pid "$f" 3
  done
  # a memstore OSD saves its objects to DIR/osd.0 on a clean stop only (and
  # needs time for it); .was-running marks a memstore OSD that did not
  if alive "$D/run/osd.0.pid"; then
    KILLED=0
    stop_pid "$D/run/osd.0.pid" 60
    ((KILLED)) || rm -f "$D/osd.0/.was-running"
  fi
  rm -f "$D/run/osd.0.pid"
  stop_pid "$D/run/mon.a.pid"
  rm -f "$D"/nbd/*.sock "$D"/run/*.ready
}

cmd_down() {
  [[ -d $D ]] || return 0
  GRACE=2 cmd_stop
  # delete only what `up` made, then DIR itself if that leaves it empty
  rm -rf "$D/mon.a" "$D/osd.0" "$D/run" "$D/log" "$D/nbd" "$D/exports" "$D/monmap" \
    "$D/ceph.conf" "$D/ceph.conf.tmp" "$D/.odirect" "$D/.ceph-mini" "$D/.lock"
  rmdir "$D" 2>/dev/null || log "$D holds files ceph-mini.sh did not make; left in place"
}

cmd_status() {
  local f n
  for f in "$D"/run/mon.a.pid "$D"/run/osd.0.pid "$D"/run/nbd.*.pid; do
    [[ -e $f ]] || continue
    n=$(basename "$f" .pid)
    if alive "$f"; then echo "$n $(<"$f") alive"; else echo "$n $(<"$f") dead"; fi
  done
}

# lock DIR against a concurrent up/export/stop/down (fd 9; daemons get 9>&-)
lock() {
  mkdir -p "$D"
  exec 9>>"$D/.lock"
  flock -w "$TMO" 9 || die "$D is locked by another ceph-mini.sh"
}

[[ $# -ge 2 ]] || usage
CMD=$1
D=$(realpath -m -- "$2")
CONF=$D/ceph.conf
[[ $D != / ]] || die "DIR must not be /"
[[ $D =~ ^[A-Za-z0-9._/-]+$ ]] || die "DIR may hold only A-Z a-z 0-9 . _ / - (it goes into URIs and ceph.conf)"
case $CMD in
  up)
    [[ -e $D/.ceph-mini ]] || need
    lock
    ;;
  export)
    [[ -e $D/.ceph-mini ]] || die "no cluster in $D: run $0 up $D first"
    lock
    ;;
  stop | down) [[ -d $D ]] && lock ;;
esac
case $CMD in
  up) [[ $# -eq 2 ]] || usage; cmd_up ;;
  export) [[ $# -eq 4 ]] || usage; cmd_export "$3" "$4" ;;
  stop) cmd_stop ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) usage ;;
esac
