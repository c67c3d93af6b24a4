#!/usr/bin/env bash
# Benchmark: the event log's reads at scale, as fleetlog lays out `events` and partitioned by
# month, side by side (`fleetlog-bench partitions`).
#
# Each layout gets a scratch database with fleetlog's schema and EVENTS synthetic device events
# (DEVICES devices, each with events in every one of MONTHS months), then the relay's page at
# the tail, a replay's pages from the start, device histories, small appends and letting the
# oldest month go are timed through fleetlog's own reads. Prints a table; writes JSON to
# PARTITIONS_JSON (default .fleetlog/stack/partitions.json). The scratch databases are dropped.
#
#   deploy/bench/partitions.sh                          # 20 million events, 12 months
#   EVENTS=2000000 MONTHS=3 deploy/bench/partitions.sh  # a quick look
#
# Needs the local stack (deploy/local/stack.sh start); about 12 GB of disk per 20 million
# events while it runs.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack_dir=${FLEETLOG_STACK_DIR:-$repo_root/.fleetlog/stack}
# shellcheck disable=SC1091
source "$stack_dir/env"
cargo build --release --quiet -p fleetlog-bench --manifest-path "$repo_root/Cargo.toml"
exec "$repo_root/target/release/fleetlog-bench" partitions \
    --events "${EVENTS:-20000000}" \
    --devices "${DEVICES:-50000}" \
    --months "${MONTHS:-12}" \
    --json "${PARTITIONS_JSON:-$stack_dir/partitions.json}"
