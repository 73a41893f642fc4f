#!/usr/bin/env bash
# Heap allocations signalbox makes per transaction, counted with uprobes
# (`perf probe`, needs root) on the allocator's entry points, under
# `pgbench -S` in each protocol mode. A build with jemalloc (the default)
# is probed in the binary itself (malloc, calloc, realloc and jemalloc's
# mallocx/rallocx, which Rust uses for over-aligned memory); a build with the
# system allocator (`--no-default-features`) in glibc. With SITES=1 it also
# prints where they are made (call stacks of one short run, grouped by the
# innermost signalbox frame and the allocation size).
#
#   bench/allocs.sh                            # this tree's release build
#   BASELINE=/path/to/older/signalbox bench/allocs.sh   # and that binary
#   MODES="prepared" SITES=1 bench/allocs.sh
#
# Each binary runs `signalbox demo` (primary + two replicas, rw-split) on
# its own; the health checks' allocations run beside the count and are
# included (a few per second against thousands of transactions).
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-simple extended prepared}
CLIENTS=${CLIENTS:-4}
TRANSACTIONS=${TRANSACTIONS:-5000}   # per client
PORT=${PORT:-17532}
LIBC=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64/ {print $NF; exit}')
[ "$(id -u)" = 0 ] || { echo "bench/allocs.sh needs root (perf probe)" >&2; exit 1; }
command -v perf >/dev/null || { echo "missing perf (apt-get install linux-perf)" >&2; exit 1; }
cargo build -q --release -p signalbox

place() { # place PREFIX FILE FUNCTION...: a uprobe on each, named allocs:PREFIX_FUNCTION
  local prefix=$1 file=$2 fn arg
  shift 2
  for fn in "$@"; do
    # Stale ones go first: they name offsets in a file that may have been rebuilt.
    perf probe -q -d "allocs:${prefix}_$fn" >/dev/null 2>&1 || true
    case $fn in malloc | mallocx) arg="size=%di:u64" ;; *) arg="size=%si:u64" ;; esac
    perf probe -q -x "$file" -a "allocs:${prefix}_$fn=$fn $arg" 2>/dev/null ||
      perf probe -q -x "$file" -a "allocs:${prefix}_$fn=$fn" ||
      { echo "cannot place a uprobe on $fn in $file" >&2; exit 1; }
  done
}
probes_for() { # probes_for PREFIX BINARY: place the probes, print the event list
  local prefix=$1 bin=$2 fns
  # (awk reads to the end: `grep -q` would stop nm with SIGPIPE under pipefail)
  if nm -g --defined-only "$bin" 2>/dev/null | awk '$3 == "mallocx" { f = 1 } END { exit !f }'; then
    fns="malloc calloc realloc mallocx rallocx"
    place "$prefix" "$bin" $fns >&2
  else
    fns="malloc calloc realloc"
    place "$prefix" "$LIBC" $fns >&2
  fi
  local events="" fn
  for fn in $fns; do events="$events${events:+,}allocs:${prefix}_$fn"; done
  echo "$events"
}
RUNNING=()
stop() { # the demo (SIGINT: it removes its cluster) and its directory
  [ ${#RUNNING[@]} -eq 2 ] || return 0
  kill -INT "${RUNNING[0]}" 2>/dev/null || true
  sleep 3
  rm -rf "${RUNNING[1]}"
  RUNNING=()
}
unplace() {
  stop
  perf probe -q -d 'allocs:*' >/dev/null 2>&1 || true  # they name offsets of files that may change
}
trap unplace EXIT

measure() { # measure LABEL BINARY
  local label=$1 bin=$2 work sb p total events
  events=$(probes_for "${label//-/_}" "$bin")
  work=$(mktemp -d /tmp/signalbox-allocs-XXXX)
  chmod 777 "$work"
  "$bin" demo --port "$PORT" --admin-port $((PORT + 1)) >"$work/demo.log" 2>&1 &
  sb=$!
  RUNNING=("$sb" "$work")
  for _ in $(seq 1 180); do grep -q "Ctrl-C" "$work/demo.log" && break; sleep 1; done
  grep -q "Ctrl-C" "$work/demo.log" || { cat "$work/demo.log"; return 1; }
  p=$(sed -nE 's/.*primary=([0-9]+).*/\1/p' "$work/demo.log" | head -n1)
  pgbench -q -i -s 1 -h 127.0.0.1 -p "$p" -U postgres postgres >/dev/null 2>&1
  sleep 2
  for mode in $MODES; do
    # Warm: sessions, pools and the classifier's cache.
    pgbench -n -S -M "$mode" -c "$CLIENTS" -t 200 -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>&1
    perf stat -x, -e "$events" -p "$sb" -o "$work/stat" &
    local st=$!
    sleep 0.5
    pgbench -n -S -M "$mode" -c "$CLIENTS" -t "$TRANSACTIONS" -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>&1
    kill -INT "$st"
    wait "$st" 2>/dev/null || true
    total=$((CLIENTS * TRANSACTIONS))
    awk -F, -v t="$total" -v l="$label" -v m="$mode" '
      $3 ~ /^allocs:/ { fn = $3; sub(/.*_/, "", fn); n[fn] += $1; sum += $1 }
      END { printf "%-16s %-9s %8.2f  (malloc %.2f, calloc %.2f, realloc %.2f", l, m, sum / t,
            n["malloc"] / t, n["calloc"] / t, n["realloc"] / t
            if ("mallocx" in n) printf ", mallocx %.2f, rallocx %.2f", n["mallocx"] / t, n["rallocx"] / t
            printf ")\n" }' "$work/stat"
  done
  if [ -n "${SITES:-}" ]; then
    local mode=${MODES%% *}
    pgbench -n -S -M "$mode" -c "$CLIENTS" -T 6 -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>&1 &
    local pg=$!
    sleep 1
    timeout -s INT 2 perf record -q -e "$events" --call-graph dwarf,8192 -p "$sb" -o "$work/perf.data" >/dev/null 2>&1 || true
    wait "$pg" || true
    perf script -i "$work/perf.data" -F event,trace,ip,sym 2>/dev/null | python3 -c '
import collections, re, sys
sites = collections.Counter()
for block in sys.stdin.read().split("\n\n"):
    lines = [l.strip() for l in block.strip().splitlines() if l.strip()]
    if not lines:
        continue
    stack = " ".join(lines[1:])
    if "spawn_health" in stack or "sqlx" in stack:
        continue  # the health checks, not the data path
    size = re.search(r"size=(\d+)", lines[0])
    frames = [l.split(" ", 1)[-1] for l in lines[1:]]
    site = next((f for f in frames if "signalbox::" in f and "raw_vec" not in f), "(no signalbox frame)")
    sites[(lines[0].split(":")[1].split()[0], size.group(1) if size else "?", re.sub(r"\+0x[0-9a-f]+$", "", site)[:140])] += 1
total = sum(sites.values())
print(f"  where ({sys.argv[1]} mode, share of {total} sampled allocations):")
for (fn, size, site), n in sites.most_common(25):
    print(f"  {100 * n / total:5.1f}%  {fn:<8} {size:>6} B  {site}")
' "$mode"
  fi
  stop
}

echo "heap allocations per transaction (pgbench -S, $CLIENTS clients x $TRANSACTIONS)"
printf '%-16s %-9s %8s\n' build mode allocs
measure signalbox ./target/release/signalbox
if [ -n "${BASELINE:-}" ]; then
  measure signalbox-base "$BASELINE"
fi
