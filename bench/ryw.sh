#!/usr/bin/env bash
# What read-your-writes costs a write transaction: pgbench tpcb-like (every
# transaction writes) side by side in one run, rounds interleaved, directly to
# the primary and through two signalbox instances over the same cluster —
# one with read-your-writes off, one with `scopes = ["session", "user"]`
# (one extra round trip per committed write transaction to read the
# primary's WAL position). Prints TPS and mean latency per round and the
# ratios of the medians.
#
#   bench/ryw.sh                       # ROUNDS=3 DURATION=10 CLIENTS=8
set -euo pipefail
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
BASE=${BASE_PORT:-16532}

cd "$(dirname "$0")/.."
for tool in pgbench psql; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install postgresql-contrib)" >&2; exit 1; }
done
cargo build -q --release -p signalbox

WORK=$(mktemp -d /tmp/signalbox-ryw-XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  sleep 2
  rm -rf "$WORK"
}
trap cleanup EXIT

# The cluster (and a signalbox we do not measure) from `signalbox demo`.
./target/release/signalbox demo --port "$BASE" --admin-port $((BASE + 1)) >"$WORK/demo.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 180); do grep -q "Ctrl-C" "$WORK/demo.log" && break; sleep 1; done
grep -q "Ctrl-C" "$WORK/demo.log" || { cat "$WORK/demo.log"; exit 1; }
nodes=$(grep "nodes:" "$WORK/demo.log")
P=$(sed -E 's/.*primary=([0-9]+).*/\1/' <<<"$nodes")
R1=$(sed -E 's/.*replica-1=([0-9]+).*/\1/' <<<"$nodes")
R2=$(sed -E 's/.*replica-2=([0-9]+).*/\1/' <<<"$nodes")
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$P" -U postgres postgres >/dev/null 2>&1

config() { # config PORT EXTRA
  cat <<EOF
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$(($1 + 1))"
$2
[[nodes]]
name = "primary"
url = "postgres://postgres@127.0.0.1:$P/postgres"
role = "primary"
[[nodes]]
name = "replica-1"
url = "postgres://postgres@127.0.0.1:$R1/postgres"
role = "replica"
[[nodes]]
name = "replica-2"
url = "postgres://postgres@127.0.0.1:$R2/postgres"
role = "replica"
EOF
}
OFF=$((BASE + 2)); ON=$((BASE + 4))
config "$OFF" "" >"$WORK/off.toml"
config "$ON" $'[read_your_writes]\nscopes = ["session", "user"]' >"$WORK/on.toml"
for v in off on; do
  ./target/release/signalbox serve --config "$WORK/$v.toml" >"$WORK/$v.log" 2>&1 &
  PIDS+=($!)
done
for port in "$OFF" "$ON"; do
  for _ in $(seq 1 100); do
    psql -XAtq -h 127.0.0.1 -p "$port" -U postgres -c 'SELECT 1' postgres >/dev/null 2>&1 && break
    sleep 0.2
  done
done

run() { # run LABEL PORT
  local out tps lat
  out=$(pgbench -n -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1)
  tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out")
  lat=$(sed -nE 's/^latency average = ([0-9.]+) ms/\1/p' <<<"$out")
  echo "$1 ${tps:-0} ${lat:-0}" >>"$WORK/results"
  printf '  %-26s %10s tps %8s ms\n' "$1" "${tps:-FAILED}" "${lat:-?}"
}
echo "pgbench tpcb-like, scale $SCALE, -c $CLIENTS -j $JOBS, ${DURATION}s x $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  run direct "$P"
  run signalbox-ryw-off "$OFF"
  run signalbox-ryw-on "$ON"
done
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
col() { awk -v l="$1" -v c="$2" '$1 == l {print $c}' "$WORK/results" | median; }
off_tps=$(col signalbox-ryw-off 2); on_tps=$(col signalbox-ryw-on 2); d_tps=$(col direct 2)
off_lat=$(col signalbox-ryw-off 3); on_lat=$(col signalbox-ryw-on 3)
echo
echo "medians: direct $d_tps tps; ryw off $off_tps tps ($off_lat ms); ryw on $on_tps tps ($on_lat ms)"
awk -v a="$on_tps" -v b="$off_tps" -v la="$on_lat" -v lb="$off_lat" \
  'BEGIN {printf "read-your-writes on / off: %.3f x TPS, %+.3f ms per transaction\n", a / b, la - lb}'
