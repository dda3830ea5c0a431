#!/usr/bin/env bash
# Replicated 1 KiB updates against 3 fresh `peregrine` processes whose groups sleep after
# IDLE_MS without a command: start, wait for a leader of every partition, let the groups
# settle 25 s, then 20 s of `peregrine-bench` at CLIENTS, printing every 5th second, the
# summary and the nodes' CPU ticks during the run. Ports 31000-31022.
#   bench/sitting/idle-after.sh IDLE_MS CLIENTS   (from the workspace root, release build)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
IDLE_MS=$1 CLIENTS=$2
D=${DIR:-/var/tmp/peregrine-idle-after}
source bench/sitting/nodes.sh
write_configs "$D" "idle_after_ms = $IDLE_MS"
start_nodes "$D"
trap 'kill "${P[@]}" 2>/dev/null; wait' EXIT
target/pyvenv/bin/python bench/sitting/wait_ready.py "$T0" 31000,31010,31020
sleep 25
ticks() { local t=0 p; for p in "${P[@]}"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
a=$(ticks)
./target/release/peregrine-bench --hosts 127.0.0.1:31000,127.0.0.1:31010,127.0.0.1:31020 --keys 100000 \
  --object-size 1024 --duration 20 --concurrency "$CLIENTS" --workload RU,0 >"$D/bench.out" 2>&1
echo "idle_after_ms=$IDLE_MS clients=$CLIENTS: the nodes' CPU ticks during the run: $(($(ticks) - a))"
grep -E "^ +(1|5|10|15|20)\.0s|throughput|write latency|errors" "$D/bench.out"
