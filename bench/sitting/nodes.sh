# Sourced by the sitting scripts: write_configs DIR [EXTRA_CLUSTER_LINE] writes the configs of 3
# nodes on loopback (client ports 31000, 31010, 31020; fabric +1; metrics +2; data under DIR);
# start_nodes DIR starts them, pids in P, and notes the start time in T0.
write_configs() {
  local dir=$1 extra=${2:-} i
  rm -rf "$dir"
  mkdir -p "$dir"
  for i in 1 2 3; do
    cat >"$dir/node-$i.toml" <<TOML
[server]
listen = "127.0.0.1:310$((i - 1))0"
data_dir = "$dir/node-$i"
metrics_listen = "127.0.0.1:310$((i - 1))2"
pin_io_threads = false

[cluster]
node_id = $i
fabric_listen = "127.0.0.1:310$((i - 1))1"
seeds = ["127.0.0.1:31001", "127.0.0.1:31011", "127.0.0.1:31021"]
$extra
TOML
  done
}

start_nodes() {
  local dir=$1 i
  T0=$(date +%s.%N)
  P=()
  for i in 1 2 3; do
    ./target/release/peregrine --config "$dir/node-$i.toml" 2>>"$dir/node-$i.log" &
    P+=($!)
  done
}
