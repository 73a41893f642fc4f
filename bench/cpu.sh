#!/usr/bin/env bash
# CPU cost per transaction, side by side in one run, rounds interleaved:
# signalbox (rw-split over two replicas, each client session kept on one;
# `signalbox-rr`: the same with `spread = "statement"`, round-robin per
# statement; `signalbox-2w`: the default with two worker threads;
# `signalbox-builtin`: no policy, the built-in split, which spreads reads
# per statement like `signalbox-rr`;
# `signalbox-percore`: thread-per-core emulated by two one-worker
# processes), PgBouncer (transaction mode; session mode for -M prepared,
# which it cannot serve in transaction mode) and
# Pgpool-II (read load balancing), against the same cluster, plus a direct
# connection to the primary (`direct`) and, for the read-only modes, to a
# replica (`direct-replica`: what the servers signalbox sends reads to cost
# on their own). For each run it prints, per transaction:
#
#   proxy µs     the proxy's own CPU (utime + stime of its processes), and
#                of it the user time (the proxy's code, not the kernel's)
#   sysc         the proxy's system calls (perf stat raw_syscalls:sys_enter)
#   cs           the proxy's context switches (voluntary + involuntary)
#   path µs      whole-path CPU: proxy + every PostgreSQL process of the
#                cluster + pgbench itself
#   tps, ratio   throughput and its ratio to direct in the same round
#
# then single-client latency (-S, -c 1), idle CPU and RSS of signalbox
# and PgBouncer holding 0 / 1,000 / 5,000 idle clients, and RSS after each
# of CYCLES (5) rounds of 2,000 clients connecting and leaving.
#
#   bench/cpu.sh                      # ROUNDS=3 DURATION=10 CLIENTS=8
#   MODES="select-simple tpcb-simple" bench/cpu.sh
#   BASELINE=/path/to/older/signalbox bench/cpu.sh   # adds `signalbox-base`:
#                                     # that binary with the demo's config
#   BASELINE_POLICY=old.wasm bench/cpu.sh   # `signalbox-base` runs this policy
#                                     # (with BASELINE's binary, or this one)
#   TARGETS="direct signalbox signalbox-base pgbouncer" SKIP_IDLE=1 bench/cpu.sh
#   MODES= bench/cpu.sh               # idle and connect cycles only
set -euo pipefail
# A policy build to compare with the demo's: the baseline runs it.
BASELINE_POLICY=${BASELINE_POLICY:+$(realpath -e "$BASELINE_POLICY")}
source "$(dirname "$0")/setup.sh"
[ -n "${BASELINE_POLICY:-}" ] && BASELINE=${BASELINE:-./target/release/signalbox}
MODES=${MODES-select-simple select-extended select-prepared tpcb-simple}
IDLE_SECONDS=${IDLE_SECONDS:-10}
TCK=$(getconf CLK_TCK)

tree() { # a pid and all its descendants
  local p
  for p in "$@"; do
    [ -d "/proc/$p" ] || continue
    echo "$p"
    tree $(pgrep -P "$p" || true)
  done
}
ticks() { # utime + stime of pids, in clock ticks (comm may hold spaces)
  local p t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
uticks() { # user time alone (utime + cutime): the proxy's own code, not the kernel's
  local p t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $14}')))
  done
  echo "$t"
}
reaped() { # CPU of children that exited and were waited for (cutime + cstime)
  local p t=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $14 + $15}')))
  done
  echo "$t"
}
switches() {
  local p t=0
  for p in "$@"; do
    t=$((t + $(cat /proc/"$p"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}')))
  done
  echo "$t"
}
pidfile() { tr -d '\0' <"$1" | head -n1; }

CLUSTER_DIR=$(sed -nE 's/.*config: (.*)\/signalbox\.toml.*/\1/p' "$WORK/demo.log")

# A second signalbox, the demo's configuration with round-robin reads.
STICKY_PORT=$((SB_PORT + 20))
sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$STICKY_PORT\"/" \
  -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$((STICKY_PORT + 1))\"/" \
  -e 's/^(path = .*)$/\1\n[policy.config]\nspread = "statement"/' \
  "$CLUSTER_DIR/signalbox.toml" >"$WORK/sticky.toml"
./target/release/signalbox serve --config "$WORK/sticky.toml" >"$WORK/sticky.log" 2>&1 &
STICKY_PID=$!
PIDS+=("$STICKY_PID")
wait_port "$STICKY_PORT"
# The demo's configuration with one worker thread (a template, never
# started itself: the emulated thread-per-core below starts from it), and
# with two (`signalbox-2w`; the default is half the cores).
grep -v '^workers = ' "$CLUSTER_DIR/signalbox.toml" |
  sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$SB_PORT\"\nworkers = 1/" >"$WORK/one.toml"
TWO_PORT=$((SB_PORT + 30))
sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$TWO_PORT\"/" -e 's/^workers = 1$/workers = 2/' \
  -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$((TWO_PORT + 1))\"/" "$WORK/one.toml" >"$WORK/two.toml"
./target/release/signalbox serve --config "$WORK/two.toml" >"$WORK/two.log" 2>&1 &
TWO_PID=$!
PIDS+=("$TWO_PID")
wait_port "$TWO_PORT"
# And without a policy (`signalbox-builtin`: the built-in read/write
# split, spreading reads per statement): against `signalbox-rr`, which
# spreads them the same way, what asking the policy costs per statement.
BUILTIN_PORT=$((SB_PORT + 70))
sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$BUILTIN_PORT\"/" \
  -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$((BUILTIN_PORT + 1))\"/" \
  -e '/^\[policy\]$/d' -e '/^path = /d' "$CLUSTER_DIR/signalbox.toml" >"$WORK/builtin.toml"
./target/release/signalbox serve --config "$WORK/builtin.toml" >"$WORK/builtin.log" 2>&1 &
BUILTIN_PID=$!
PIDS+=("$BUILTIN_PID")
wait_port "$BUILTIN_PORT"
# Thread-per-core, emulated (`signalbox-percore`): two processes with one
# worker each, each serving half the clients with pools and backend
# connections of its own: no session, socket or pool is shared between the
# threads, so no wake-up crosses them. What a thread-per-core runtime would
# cost at best, measured before building one.
PC_PORT=$((SB_PORT + 50))
PC_PIDS=()
for i in 0 1; do
  port=$((PC_PORT + 10 * i))
  sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" \
    -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$((port + 1))\"/" "$WORK/one.toml" >"$WORK/percore-$i.toml"
  ./target/release/signalbox serve --config "$WORK/percore-$i.toml" >"$WORK/percore-$i.log" 2>&1 &
  PC_PIDS+=($!)
  PIDS+=($!)
  wait_port "$port"
done
# An older build with the demo's configuration (`signalbox-base`), to
# compare two versions side by side in one run.
BASE_PORT=$((SB_PORT + 40))
if [ -n "${BASELINE:-}" ]; then
  sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$BASE_PORT\"/" \
    -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$((BASE_PORT + 1))\"/" \
    ${BASELINE_POLICY:+-e "/^\[policy\]$/,/^\[/s|^path = .*|path = \"$BASELINE_POLICY\"|"} \
    "$CLUSTER_DIR/signalbox.toml" >"$WORK/base.toml"
  "$BASELINE" serve --config "$WORK/base.toml" >"$WORK/base.log" 2>&1 &
  BASE_PID=$!
  PIDS+=("$BASE_PID")
  wait_port "$BASE_PORT"
fi
postmasters() {
  local f
  for f in "$CLUSTER_DIR"/*/postmaster.pid; do head -n1 "$f"; done
}
# Every PostgreSQL process of the cluster, live ones and those that exited
# (backends of a run end with it; their postmaster reaped them).
postgres_ticks() {
  local live
  mapfile -t live < <(tree $(postmasters))
  echo $(($(ticks "${live[@]}") + $(reaped $(postmasters))))
}
proxy_pids() { # proxy_pids TARGET
  case $1 in
    direct | direct-replica) ;;
    signalbox) echo "$SB_PID" ;;
    signalbox-rr) echo "$STICKY_PID" ;;
    signalbox-2w) echo "$TWO_PID" ;;
    signalbox-builtin) echo "$BUILTIN_PID" ;;
    signalbox-base) echo "$BASE_PID" ;;
    signalbox-percore) printf '%s\n' "${PC_PIDS[@]}" ;;
    pgbouncer-tx) pidfile "$WORK/pgbouncer-transaction.pid" ;;
    pgbouncer-session) pidfile "$WORK/pgbouncer-session.pid" ;;
    pgpool) tree "$(pidfile "$WORK/pgpool.pid")" ;;
  esac
}
port_of() {
  case $1 in
    direct) echo "$P" ;;
    direct-replica) echo "$R1" ;;
    signalbox) echo "$SB_PORT" ;;
    signalbox-rr) echo "$STICKY_PORT" ;;
    signalbox-2w) echo "$TWO_PORT" ;;
    signalbox-builtin) echo "$BUILTIN_PORT" ;;
    signalbox-base) echo "$BASE_PORT" ;;
    signalbox-percore) echo "$PC_PORT,$((PC_PORT + 10))" ;;
    pgbouncer-tx) echo "$PGB_TX_PORT" ;;
    pgbouncer-session) echo "$PGB_SESSION_PORT" ;;
    pgpool) echo "$PGPOOL_PORT" ;;
  esac
}
pgbench_args() { # pgbench_args MODE
  case $1 in
    select-simple) echo "-S -M simple" ;;
    select-extended) echo "-S -M extended" ;;
    select-prepared) echo "-S -M prepared" ;;
    tpcb-simple) echo "-M simple" ;;
  esac
}

# run TARGET MODE: one pgbench run with the accounting around it.
run() {
  local target=$1 mode=$2 port pids pg0 px0 pu0 cs0 out perf_pid=
  port=$(port_of "$target")
  mapfile -t pids < <(proxy_pids "$target")
  pg0=$(postgres_ticks); px0=$(($(ticks "${pids[@]}") + $(reaped "${pids[@]}")))
  pu0=$(uticks "${pids[@]}")
  cs0=$(switches "${pids[@]}")
  rm -f "$WORK/perf.out"
  if [ "${#pids[@]}" -gt 0 ]; then
    perf stat -x, -e raw_syscalls:sys_enter -o "$WORK/perf.out" \
      -p "$(IFS=,; echo "${pids[*]}")" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.2
  fi
  # pgbench's own CPU comes from getrusage of the children. Several ports
  # (signalbox-percore) split the clients between them, one pgbench each,
  # and add up what they did.
  out=$(python3 - "$port" $(pgbench_args "$mode") <<EOF
import re, resource, subprocess, sys
ports, args = sys.argv[1].split(","), sys.argv[2:]
n = len(ports)
runs = [subprocess.Popen(["pgbench", "-n", *args, "-c", str($CLIENTS // n), "-j", str(max(1, $JOBS // n)),
                          "-T", "$DURATION", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "postgres"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for port in ports]
outs = [p.communicate()[0] for p in runs]
r = resource.getrusage(resource.RUSAGE_CHILDREN)
if n == 1:
    print(outs[0])
else:
    def total(pattern):
        found = [re.search(pattern, o, re.M) for o in outs]
        return sum(float(m.group(1)) for m in found) if all(found) else 0
    print("number of transactions actually processed: %d" % total(r"^number of transactions actually processed: ([0-9]+)"))
    print("tps = %f" % total(r"^tps = ([0-9.]+)"))
print("pgbench_cpu_s", r.ru_utime + r.ru_stime)
EOF
)
  local pg1 px1 pu1 sc=0 cs1 xacts tps bench_s
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    sc=$(awk -F, '/raw_syscalls/ {print $1 + 0}' "$WORK/perf.out" 2>/dev/null || echo 0)
  fi
  pg1=$(postgres_ticks); px1=$(($(ticks "${pids[@]}") + $(reaped "${pids[@]}")))
  pu1=$(uticks "${pids[@]}")
  cs1=$(switches "${pids[@]}")
  xacts=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out")
  tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out")
  bench_s=$(sed -nE 's/^pgbench_cpu_s (.*)/\1/p' <<<"$out")
  if [ -z "$xacts" ] || [ "$xacts" = 0 ]; then
    printf '  %-18s %-16s FAILED\n' "$target" "$mode"; return
  fi
  awk -v t="$target" -v m="$mode" -v x="$xacts" -v tps="$tps" -v tck="$TCK" \
      -v px=$((px1 - px0)) -v pu=$((pu1 - pu0)) -v pg=$((pg1 - pg0)) -v sc="${sc:-0}" -v cs=$((cs1 - cs0)) -v b="$bench_s" \
      'BEGIN {
         proxy = px / tck * 1e6 / x; path = (px + pg) / tck * 1e6 / x + b * 1e6 / x
         user = pu / tck * 1e6 / x
         printf "%s %s %.0f %.2f %.2f %.2f %.2f %.2f\n", t, m, tps, proxy, sc / x, cs / x, path, user >> "'"$WORK"'/cpu"
         printf "  %-18s %-16s %8.0f tps  proxy %6.2f µs (user %5.2f)  sysc %5.2f  cs %5.2f  path %7.2f µs\n", t, m, tps, proxy, user, sc / x, cs / x, path
       }'
}

targets_for() { # the targets that can run MODE (TARGETS narrows them;
  # `pgbouncer` there means the instance that can serve MODE)
  local all
  case $1 in
    select-prepared) all="direct direct-replica signalbox signalbox-rr signalbox-2w signalbox-builtin signalbox-percore pgbouncer-session pgpool" ;;
    select-*) all="direct direct-replica signalbox signalbox-rr signalbox-2w signalbox-builtin signalbox-percore pgbouncer-tx pgpool" ;;
    *) all="direct signalbox signalbox-rr signalbox-2w signalbox-builtin signalbox-percore pgbouncer-tx pgpool" ;;
  esac
  [ -n "${BASELINE:-}" ] && all="$all signalbox-base"
  local t
  for t in $all; do
    if [ -z "${TARGETS:-}" ] || [[ " $TARGETS " == *" $t "* ]] ||
      { [[ $t == pgbouncer-* ]] && [[ " $TARGETS " == *" pgbouncer "* ]]; }; then
      echo "$t"
    fi
  done
}

echo "pgbench, $CLIENTS clients, $JOBS threads, ${DURATION}s per run, $ROUNDS rounds, scale $SCALE; per transaction:"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  for mode in $MODES; do
    for target in $(targets_for "$mode"); do run "$target" "$mode"; done
  done
done

median() { sort -n | awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
med() { awk -v t="$1" -v m="$2" -v c="$3" '$1 == t && $2 == m {print $c}' "$WORK/cpu" | median; }
echo
echo "Medians per transaction (ratio: TPS to direct in the same rounds)"
echo
echo "| mode | target | TPS | vs direct | proxy CPU µs | of which user µs | proxy syscalls | proxy ctx switches | whole-path CPU µs |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for mode in $MODES; do
  direct=$(med direct "$mode" 3)
  for target in $(targets_for "$mode"); do
    tps=$(med "$target" "$mode" 3)
    [ -n "$tps" ] || continue
    printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s |\n' "$mode" "$target" "$tps" \
      "$(awk -v a="$tps" -v b="${direct:-0}" 'BEGIN {if (b > 0) printf "%.2f×", a / b; else print "—"}')" \
      "$(med "$target" "$mode" 4)" "$(med "$target" "$mode" 8)" "$(med "$target" "$mode" 5)" "$(med "$target" "$mode" 6)" "$(med "$target" "$mode" 7)"
  done
done

# A build against the baseline, round by round: the two ran seconds apart,
# so their ratio is steadier on a shared machine than either median.
if [ -n "${BASELINE:-}" ]; then
  echo
  echo "signalbox ÷ signalbox-base, per round (proxy CPU, then TPS), and the median:"
  for mode in $MODES; do
    for col in 4 3; do
      ratios=$(awk -v m="$mode" -v c="$col" '$2 == m && $1 == "signalbox" {a[++i] = $c}
        $2 == m && $1 == "signalbox-base" {b[++j] = $c}
        END {for (k = 1; k <= i && k <= j; k++) if (b[k] > 0) printf "%.3f\n", a[k] / b[k]}' "$WORK/cpu")
      [ -n "$ratios" ] || continue
      printf '  %-16s %-9s %s median %s\n' "$mode" "$([ "$col" = 4 ] && echo CPU || echo TPS)" \
        "$(tr '\n' ' ' <<<"$ratios")" "$(median <<<"$ratios")"
    done
  done
fi

echo
# Single client: rounds interleaved like the runs above (one sequential
# run each differed by up to 20 % between identical configurations).
if [ -n "$MODES" ]; then
  echo "Single client (-S, -c 1, simple), mean latency per round, then the median:"
  for round in $(seq 1 "$ROUNDS"); do
    for target in $(targets_for select-simple); do
      lat=$(pgbench -n -S -c 1 -T "$DURATION" -h 127.0.0.1 -p "$(port_of "$target" | cut -d, -f1)" -U postgres postgres 2>&1 |
        sed -nE 's/^latency average = ([0-9.]+) ms/\1/p')
      echo "$target ${lat:-0}" >>"$WORK/latency"
    done
  done
  for target in $(targets_for select-simple); do
    printf '  %-18s %s  median %s ms\n' "$target" \
      "$(awk -v t="$target" '$1 == t {printf "%s ", $2}' "$WORK/latency")" \
      "$(awk -v t="$target" '$1 == t {print $2}' "$WORK/latency" | median)"
  done
fi

[ -n "${SKIP_IDLE:-}" ] && exit 0

# Idle: a signalbox of its own (the demo's caps clients at 1,000) and the
# transaction-mode PgBouncer, each holding N idle authenticated clients.
IDLE_PORT=$((SB_PORT + 10))
cat >"$WORK/idle.toml" <<EOF
listen = "127.0.0.1:$IDLE_PORT"
[clients]
max_connections = 6000
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
./target/release/signalbox serve --config "$WORK/idle.toml" >"$WORK/idle.log" 2>&1 &
IDLE_PID=$!
PIDS+=("$IDLE_PID")
wait_port "$IDLE_PORT"
IDLE_TARGETS="signalbox pgbouncer-tx"
if [ -n "${BASELINE:-}" ]; then
  IDLE_BASE_PORT=$((IDLE_PORT + 5))
  sed "s/^listen = .*/listen = \"127.0.0.1:$IDLE_BASE_PORT\"/" "$WORK/idle.toml" >"$WORK/idle-base.toml"
  "$BASELINE" serve --config "$WORK/idle-base.toml" >"$WORK/idle-base.log" 2>&1 &
  IDLE_BASE_PID=$!
  PIDS+=("$IDLE_BASE_PID")
  wait_port "$IDLE_BASE_PORT"
  IDLE_TARGETS="signalbox signalbox-base pgbouncer-tx"
fi
echo
echo "Idle (${IDLE_SECONDS}s each): CPU % of one core, context switches/s, RSS"
idle_measure() { # idle_measure LABEL PID
  local t0 t1 c0 c1 rss
  t0=$(ticks "$2"); c0=$(switches "$2")
  sleep "$IDLE_SECONDS"
  t1=$(ticks "$2"); c1=$(switches "$2")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$2/status")
  awk -v l="$1" -v t=$((t1 - t0)) -v c=$((c1 - c0)) -v s="$IDLE_SECONDS" -v tck="$TCK" -v r="$rss" \
    'BEGIN {printf "  %-30s %6.2f %%  %7.1f cs/s  %7.1f MiB\n", l, 100 * t / tck / s, c / s, r / 1024}'
}
for n in 0 1000 5000; do
  for target in $IDLE_TARGETS; do
    case $target in
      signalbox) port=$IDLE_PORT pid=$IDLE_PID ;;
      signalbox-base) port=$IDLE_BASE_PORT pid=$IDLE_BASE_PID ;;
      *) port=$PGB_TX_PORT pid=$(pidfile "$WORK/pgbouncer-transaction.pid") ;;
    esac
    if [ "$n" -gt 0 ]; then
      exec {hold}> >(python3 bench/idle_clients.py "$port" "$n" >"$WORK/hold.out" 2>&1)
      for _ in $(seq 1 600); do grep -q "ready\|Error" "$WORK/hold.out" 2>/dev/null && break; sleep 0.1; done
      grep -q ready "$WORK/hold.out" || { echo "  $target: could not open $n clients: $(tail -1 "$WORK/hold.out")"; exec {hold}>&-; continue; }
      sleep 2
    fi
    idle_measure "$target, $n idle clients" "$pid"
    if [ "$n" -gt 0 ]; then exec {hold}>&-; sleep 2; fi
  done
done

# Connect cycles: RSS after each round of 2,000 clients that log in and
# leave. Growth that levels off is the allocator keeping freed memory;
# growth that goes on is a leak.
echo
echo "RSS after each of ${CYCLES:=5} rounds of 2,000 clients connecting and leaving:"
for target in $IDLE_TARGETS; do
  case $target in
    signalbox) port=$IDLE_PORT pid=$IDLE_PID ;;
    signalbox-base) port=$IDLE_BASE_PORT pid=$IDLE_BASE_PID ;;
    *) port=$PGB_TX_PORT pid=$(pidfile "$WORK/pgbouncer-transaction.pid") ;;
  esac
  line=""
  for _ in $(seq 1 "$CYCLES"); do
    python3 bench/idle_clients.py "$port" 2000 </dev/null >"$WORK/hold.out" 2>&1 || true
    grep -q ready "$WORK/hold.out" || { line="$line failed: $(tail -1 "$WORK/hold.out")"; break; }
    sleep 2
    line="$line $(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")"
  done
  printf '  %-18s%s MiB\n' "$target" "$line"
done
