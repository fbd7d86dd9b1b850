#!/bin/bash
# Throwaway single-node Ceph cluster (Debian 12 packages, ceph 16.2.x) for test suites.
#   ceph-test-cluster.sh up   [DIR]   -> prints "export CEPH_CONF=DIR/ceph.conf"
#   ceph-test-cluster.sh down [DIR]   -> stops the daemons by their pid files, removes DIR
# DIR defaults to /tmp/ceph-test/cluster. Everything (conf, keyrings, data, logs, sockets,
# pid files) lives under DIR; every daemon binds 127.0.0.1 only (msgr v2).
# Env: CEPH_OBJECTSTORE=memstore|bluestore (memstore: data in OSD RAM; bluestore: 4 GiB
#      sparse file DIR/osd.0/block)   CEPH_POOL=rbd   CEPH_UP_TIMEOUT=120 (s)
#      CEPH_WAIT_HEALTH_OK=1 (0: return as soon as the pool takes I/O)
#      CEPH_MGR_ALL_MODULES=0 (1: let the mgr load every module, +3 s, +140 MB)
#      CEPH_EXTRA_CONF='...' (lines appended to ceph.conf, i.e. to its last section, [osd])
#      KEEP=1 (down: keep DIR, e.g. for the logs)
# Needs: apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd ceph-common \
#        python3-rados python3-rbd ; runs as root (no systemd needed).
set -euo pipefail
cmd=${1:-}; D=$(realpath -m "${2:-/tmp/ceph-test/cluster}")
STORE=${CEPH_OBJECTSTORE:-memstore}
POOL=${CEPH_POOL:-rbd}
TIMEOUT=${CEPH_UP_TIMEOUT:-120}
t0=$EPOCHREALTIME
stamp() { awk -v a="$t0" -v b="$EPOCHREALTIME" -v m="$*" 'BEGIN{printf "[%6.2fs] %s\n", b-a, m}' >&2; }

# a live process that is not a zombie (the daemons are reparented to PID 1 once they fork)
alive() { [ -r "/proc/$1/stat" ] && ! awk '{exit ($3=="Z")?0:1}' "/proc/$1/stat"; }
stop() {   # stop NAME...: SIGTERM by pid file, wait up to 10 s, then SIGKILL
  local pids=() name f pid
  for name in "$@"; do
    f="$D/run/$name.pid"
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if alive "$pid" && grep -q '^ceph-' "/proc/$pid/comm" 2>/dev/null; then
      kill -TERM "$pid" && pids+=("$pid")
    fi
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}
down() {
  # OSD first, while the mon can still acknowledge its "going down" message
  # (otherwise it waits osd_mon_shutdown_timeout = 5 s)
  stop osd.0
  stop mgr.x mon.a
  # remove DIR only if it is one of ours (holds our ceph.conf)
  if [ "${KEEP:-0}" != 1 ] && [ -f "$D/ceph.conf" ]; then rm -rf "$D"; fi
}

up() {
if [ -e "$D/run/mon.a.pid" ]; then echo "a cluster is already in $D (run: $0 down $D)" >&2; exit 1; fi
# on any failure: stop whatever was started, keep DIR/log for the post-mortem
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "ceph up FAILED (rc=$rc); logs in $D/log" >&2; KEEP=1 down; fi' EXIT
# DIR must be new, empty, or a previous cluster's (never wipe an unrelated directory)
if [ -d "$D" ] && [ -n "$(ls -A "$D")" ] && [ ! -f "$D/ceph.conf" ]; then
  echo "$D exists and is not a ceph-test-cluster directory" >&2; trap - EXIT; exit 1; fi
rm -rf "$D"
mkdir -p "$D"/{run,log,crash,mon.a,mgr.x,osd.0,mgr-modules}
# The mgr imports every module found in its module path (~3 s of CPU, ~300 MB RSS):
# offer it only the always-on ones (+iostat, which the mon enables by default).
if [ "${CEPH_MGR_ALL_MODULES:-0}" = 1 ]; then mods=(/usr/share/ceph/mgr/*); else
  mods=(/usr/share/ceph/mgr/{mgr_module.py,mgr_util.py,balancer,crash,devicehealth,iostat,orchestrator,pg_autoscaler,progress,rbd_support,status,telemetry,volumes}); fi
ln -s "${mods[@]}" "$D/mgr-modules/"

# a free loopback port for the monitor
MON_PORT=${CEPH_MON_PORT:-$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}
FSID=$(python3 -c 'import uuid;print(uuid.uuid4())')
OSD_UUID=$(python3 -c 'import uuid;print(uuid.uuid4())')

cat > "$D/ceph.conf" <<EOF
[global]
fsid = $FSID
mon_host = v2:127.0.0.1:$MON_PORT
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
ms_bind_msgr1 = false
ms_bind_msgr2 = true
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = $D/run
crash_dir = $D/crash
pid_file = $D/run/\$name.pid
keyring = $D/ceph.client.admin.keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# faster state propagation, so that a fresh cluster reports active+clean quickly
mgr_stats_period = 1
mon_mgr_digest_period = 1
osd_mon_report_interval = 1
# the mon batches map changes for paxos_propose_interval (default 1 s); every
# osd-new/pool/application/snap step of the bootstrap waits for one such round
paxos_propose_interval = 0.1

[mon]
mon_data = $D/mon.\$id
keyring = $D/mon.\$id/keyring
log_file = $D/log/\$name.log
mon_cluster_log_file = $D/log/cluster.log
mgr_initial_modules = iostat

[mgr]
mgr_data = $D/mgr.\$id
mgr_module_path = $D/mgr-modules
keyring = $D/mgr.\$id/keyring
log_file = $D/log/\$name.log

[osd]
osd_data = $D/osd.\$id
keyring = $D/osd.\$id/keyring
log_file = $D/log/\$name.log
osd_objectstore = $STORE
memstore_device_bytes = 4G
bluestore_block_size = 4G
bluestore_block_create = true
bluestore_fsck_on_mkfs = false
osd_memory_target = 939524096
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2
# memstore/file-backed OSDs count as "hdd": no 5 s sleep between snapshot trims
osd_snap_trim_sleep = 0
EOF
# extra settings, verbatim (may contain [section] headers); default section: [osd]
if [ -n "${CEPH_EXTRA_CONF:-}" ]; then printf '%s\n' "$CEPH_EXTRA_CONF" >> "$D/ceph.conf"; fi

# Keys for mon., client.admin, mgr.x and osd.0, all imported into the mon at mkfs
# time, so no 'ceph auth add' round trips are needed later. (Generated before
# CEPH_CONF is exported: 'ceph-authtool -n mon.' would otherwise log to log/mon..log)
{
ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
ceph-authtool --create-keyring "$D/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
ceph-authtool --create-keyring "$D/mgr.x/keyring" --gen-key -n mgr.x \
  --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
ceph-authtool --create-keyring "$D/osd.0/keyring" --gen-key -n osd.0 \
  --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
for k in ceph.client.admin.keyring mgr.x/keyring osd.0/keyring; do
  ceph-authtool "$D/mon.keyring" --import-keyring "$D/$k"
done
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap"
} >/dev/null
export CEPH_CONF="$D/ceph.conf"

ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring"
ceph-mon -c "$D/ceph.conf" -i a   # forks; returns once initialised; pid in DIR/run/mon.a.pid
stamp "mon up on 127.0.0.1:$MON_PORT"
ceph-mgr -c "$D/ceph.conf" -i x   # pid in DIR/run/mgr.x.pid
stamp "mgr started"
ceph --connect-timeout 30 osd new "$OSD_UUID" 0 >/dev/null     # allocate osd.0
ceph-osd -i 0 --mkfs --osd-uuid "$OSD_UUID" 2>"$D/log/osd.0.mkfs.log"
ceph-osd -c "$D/ceph.conf" -i 0 2>>"$D/log/osd.0.stderr"  # returns after OSD init; pid in DIR/run/osd.0.pid
stamp "osd.0 started ($STORE)"

out=$(ceph --connect-timeout 30 osd pool create "$POOL" 8 8 2>&1) || { echo "$out" >&2; exit 1; }
timeout "$TIMEOUT" rbd pool init "$POOL"   # sets application 'rbd'; blocks until PGs take I/O
stamp "pool '$POOL' ready for I/O"

if [ "${CEPH_WAIT_HEALTH_OK:-1}" = 1 ]; then
# HEALTH_OK *and* an active mgr (the mon says HEALTH_OK before any mgr is up), the OSD
# up, and every PG active+clean (incl. the mgr's device_health_metrics pool)
/usr/bin/python3 - "$TIMEOUT" <<'PY'
import json, os, sys, time, rados
deadline = time.monotonic() + float(sys.argv[1])
c = rados.Rados(conffile=os.environ["CEPH_CONF"]); c.connect(timeout=10)
while True:
    rc, out, _ = c.mon_command(json.dumps({"prefix": "status", "format": "json"}), b"")
    st = json.loads(out) if rc == 0 else {}
    pg, osd = st.get("pgmap", {}), st.get("osdmap", {})
    clean = sum(s["count"] for s in pg.get("pgs_by_state", []) if s["state_name"] == "active+clean")
    if (st.get("health", {}).get("status") == "HEALTH_OK" and st.get("mgrmap", {}).get("available")
            and osd.get("num_up_osds") == osd.get("num_osds") == 1
            and pg.get("num_pgs", 0) > 0 and clean == pg["num_pgs"]):
        break
    if time.monotonic() > deadline:
        sys.exit("timeout waiting for HEALTH_OK/active+clean: %s" % json.dumps(st.get("health")))
    time.sleep(0.2)
c.shutdown()
PY
stamp "HEALTH_OK, mgr active, all PGs active+clean"
fi
echo "export CEPH_CONF=$D/ceph.conf"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac
