#!/usr/bin/env bash
# One benchmark sitting on this machine: the 3-member etcd peer (../shared/peers/etcd.sh,
# 1 KiB values, 32 and 256 clients), then a fresh 3-process Peregrine cluster (release build,
# 4096 partition groups per node at RF 3): replicated updates at 32 and 256 clients, an insert
# of the key space, linearizable (SESSION) reads at 64 clients, idle CPU and RSS per node once
# the groups sleep, and kill -9 of a node under 32 clients (per-second errors show the gap).
# Run from the workspace root after `cargo build --release -p peregrine-server -p peregrine-bench`
# and with target/pyvenv (see .ci/run). Takes about 6 minutes. Ports 31000-31022.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source ../shared/peers/common.sh
DIR=${DIR:-/var/tmp/peregrine-sitting}
quiet_check before
echo "=== etcd"
CLIENT_LEVELS="32 256" VAL=1024 SECS=10 READ_CLIENTS=64 CHECK_PERF=0 bash ../shared/peers/etcd.sh 2>&1 | tail -12
quiet_check between
echo "=== peregrine"
source bench/sitting/nodes.sh
write_configs "$DIR"
H=127.0.0.1:31000,127.0.0.1:31010,127.0.0.1:31020
B="./target/release/peregrine-bench --hosts $H --keys 100000 --object-size 1024 --quiet"
start_nodes "$DIR"
trap 'for p in "${P[@]}"; do kill "$p" 2>/dev/null; done' EXIT
target/pyvenv/bin/python bench/sitting/wait_ready.py "$T0" 31000,31010,31020
for c in 32 256; do
  echo "--- replicated updates (1 KiB), $c clients, 10 s"
  $B --workload RU,0 --concurrency "$c" --duration 10 | grep -v "^{"
done
echo "--- insert the 100000 keys"
$B --workload I --concurrency 256 | grep -v "^{"
echo "--- linearizable (SESSION) reads, 64 clients, 10 s"
$B --workload RU,100 --concurrency 64 --duration 10 | grep -v "^{"
echo "--- idle: 40 s for the groups to sleep, then CPU over 20 s"
sleep 40
declare -A A
for i in 1 2 3; do A[$i]=$(awk '{print $14+$15}' "/proc/${P[$((i - 1))]}/stat"); done
sleep 20
hz=$(getconf CLK_TCK)
for i in 1 2 3; do
  b=$(awk '{print $14+$15}' "/proc/${P[$((i - 1))]}/stat")
  echo "node $i: idle CPU $(echo "scale=1; ($b - ${A[$i]}) * 100 / $hz / 20" | bc)% of a core, $(grep VmRSS "/proc/${P[$((i - 1))]}/status")"
done
echo "--- kill -9 of node 3 at 10 s, 32 clients RU,50, 30 s"
./target/release/peregrine-bench --hosts $H --keys 100000 --object-size 1024 --duration 30 --concurrency 32 --workload RU,50 &
bp=$!
sleep 10
kill -9 "${P[2]}"
echo "killed node 3"
wait "$bp"
