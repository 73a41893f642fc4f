#!/usr/bin/env bash
# pgbench side by side, in one run, rounds interleaved: directly to the
# primary, through signalbox (rw-split policy), PgBouncer and Pgpool-II, all
# against the same throwaway primary + two streaming replicas.
#
#   bench/pgbench.sh                 # defaults below; prints a table
#   ROUNDS=5 DURATION=20 bench/pgbench.sh
#
set -euo pipefail
source "$(dirname "$0")/setup.sh"

run() { # run LABEL PORT MODE
  local tps
  tps=$(pgbench -n -S -M "$3" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1 |
    sed -nE 's/^tps = ([0-9.]+).*/\1/p')
  echo "$1 $3 ${tps:-0}" >>"$WORK/results"
  printf '  %-22s %-9s %10s tps\n' "$1" "$3" "${tps:-FAILED}"
}

echo "pgbench -S, $CLIENTS clients, $JOBS threads, ${DURATION}s per run, $ROUNDS rounds, scale $SCALE"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  for mode in simple prepared; do
    run direct-primary "$P" "$mode"
    run signalbox "$SB_PORT" "$mode"
    if [ "$mode" = simple ]; then run pgbouncer-transaction "$PGB_TX_PORT" "$mode"; fi
    run pgbouncer-session "$PGB_SESSION_PORT" "$mode"
    run pgpool-II "$PGPOOL_PORT" "$mode"
  done
done

echo
echo "| target | mode | median tps | vs direct |"
echo "|---|---|---:|---:|"
for mode in simple prepared; do
  direct=$(awk -v m="$mode" '$1=="direct-primary" && $2==m {print $3}' "$WORK/results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  for target in direct-primary signalbox pgbouncer-transaction pgbouncer-session pgpool-II; do
    med=$(awk -v t="$target" -v m="$mode" '$1==t && $2==m {print $3}' "$WORK/results" | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]}')
    [ -n "$med" ] || continue
    printf '| %s | %s | %.0f | %.2fx |\n' "$target" "$mode" "$med" "$(echo "$med / $direct" | bc -l)"
  done
done
