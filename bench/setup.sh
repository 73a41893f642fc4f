# Shared set-up of the side-by-side benchmarks (sourced by pgbench.sh and
# cpu.sh): a throwaway primary + two streaming replicas with signalbox in
# front (`signalbox demo`, release build, rw-split policy), PgBouncer in
# transaction and in session mode, and Pgpool-II with read load balancing,
# all on the same cluster. Sets P, R1, R2, the ports below, WORK, SB_PID;
# everything is stopped and removed on exit.
#
# Needs: pgbench, psql, pgbouncer, pgpool (Debian: postgresql-contrib,
# pgbouncer, pgpool2). Runs the servers as the `postgres` user when root.
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
SB_PORT=${SB_PORT:-16432}
ADMIN_PORT=$((SB_PORT + 1))
PGB_TX_PORT=$((SB_PORT + 2))
PGB_SESSION_PORT=$((SB_PORT + 3))
PGPOOL_PORT=$((SB_PORT + 4))
SB_WORKERS=${SB_WORKERS:-}   # signalbox worker threads (default: half the cores)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in pgbench psql pgbouncer pgpool; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postgresql-contrib pgbouncer pgpool2)" >&2; exit 1; }
done
cargo build -q --release -p signalbox

WORK=$(mktemp -d /tmp/signalbox-bench-XXXX)
chmod 777 "$WORK"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PIDS=()
cleanup() {
  # SIGINT lets signalbox demo remove its cluster; the poolers (started via
  # runuser) are found by their config path under $WORK.
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  [ -f "$WORK/pgpool.pid" ] && kill -TERM "$(tr -d '\0' <"$WORK/pgpool.pid")" 2>/dev/null || true
  pkill -TERM -f "$WORK" 2>/dev/null || true
  sleep 2
  pkill -KILL -f "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. Cluster + signalbox (release) via `signalbox demo`.
./target/release/signalbox demo --port "$SB_PORT" --admin-port "$ADMIN_PORT" ${SB_WORKERS:+--workers "$SB_WORKERS"} >"$WORK/demo.log" 2>&1 &
PIDS+=($!)
SB_PID=$!
for _ in $(seq 1 180); do grep -q "Ctrl-C" "$WORK/demo.log" && break; sleep 1; done
grep -q "Ctrl-C" "$WORK/demo.log" || { cat "$WORK/demo.log"; exit 1; }
nodes=$(grep "nodes:" "$WORK/demo.log")
P=$(sed -E 's/.*primary=([0-9]+).*/\1/' <<<"$nodes")
R1=$(sed -E 's/.*replica-1=([0-9]+).*/\1/' <<<"$nodes")
R2=$(sed -E 's/.*replica-2=([0-9]+).*/\1/' <<<"$nodes")
echo "primary=$P replica-1=$R1 replica-2=$R2"

pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$P" -U postgres postgres >/dev/null 2>&1
lsn=$(psql -XAtq -h 127.0.0.1 -p "$P" -U postgres -c "SELECT pg_current_wal_lsn()")
for r in $R1 $R2; do
  for _ in $(seq 1 300); do
    [ "$(psql -XAtq -h 127.0.0.1 -p "$r" -U postgres -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && break
    sleep 0.2
  done
done

# 2. PgBouncer: transaction pooling to the primary (it does not split reads);
# a second instance in session mode for -M prepared, which PgBouncer 1.18
# cannot serve in transaction mode.
echo '"postgres" ""' >"$WORK/userlist.txt"
for mode in transaction session; do
  port=$PGB_TX_PORT; [ "$mode" = session ] && port=$PGB_SESSION_PORT
  cat >"$WORK/pgbouncer-$mode.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$P dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $WORK
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = $mode
default_pool_size = 20
max_client_conn = 6000
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer-$mode.log
pidfile = $WORK/pgbouncer-$mode.pid
EOF
  # Its own descriptor limit: the 5,000-idle-client run needs one per client.
  as_pg sh -c "ulimit -n 16384 && exec pgbouncer '$WORK/pgbouncer-$mode.ini'" >/dev/null 2>&1 &
  PIDS+=($!)
done

# 3. Pgpool-II: streaming-replication mode with read load balancing over the
# replicas (primary weight 0, like signalbox's rw-split).
cat >"$WORK/pgpool.conf" <<EOF
backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = $PGPOOL_PORT
unix_socket_directories = '$WORK'
pcp_listen_addresses = ''
pcp_socket_dir = '$WORK'
backend_hostname0 = '127.0.0.1'
backend_port0 = $P
backend_weight0 = 0
backend_flag0 = 'ALWAYS_PRIMARY'
backend_hostname1 = '127.0.0.1'
backend_port1 = $R1
backend_weight1 = 1
backend_hostname2 = '127.0.0.1'
backend_port2 = $R2
backend_weight2 = 1
num_init_children = 32
max_pool = 4
load_balance_mode = on
sr_check_period = 0
health_check_period = 0
enable_pool_hba = off
failover_on_backend_error = off
logdir = '$WORK'
pid_file_name = '$WORK/pgpool.pid'
EOF
: >"$WORK/pcp.conf"
as_pg pgpool -n -f "$WORK/pgpool.conf" -F "$WORK/pcp.conf" >"$WORK/pgpool.log" 2>&1 &
PIDS+=($!)

wait_port() {
  for _ in $(seq 1 100); do
    psql -XAtq -h 127.0.0.1 -p "$1" -U postgres -c 'SELECT 1' postgres >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "nothing answers on port $1" >&2; return 1
}
for port in "$SB_PORT" "$PGB_TX_PORT" "$PGB_SESSION_PORT" "$PGPOOL_PORT"; do wait_port "$port"; done

