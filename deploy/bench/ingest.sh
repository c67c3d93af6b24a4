#!/usr/bin/env bash
# Benchmark: MQTT telemetry end to end on this machine.
#
# Starts the local stack, a scratch database and `fleetlog up` (every role in one process),
# then runs `fleetlog-bench ingest`, which prints, from one run:
#   - the raw Mosquitto QoS 1 publish->subscribe rate,
#   - a raw multi-row Postgres INSERT rate of telemetry-shaped rows,
#   - fleetlog end to end (MQTT QoS 1 publish -> event committed -> devices read model) at the
#     target rate (sustained throughput) and at half of it (latency p50/p95/p99).
#
#   deploy/bench/ingest.sh
#   RATE=5000 SECONDS_PER_PHASE=30 DEVICES=2000 deploy/bench/ingest.sh
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck disable=SC1091
source "$repo_root/deploy/local/common.sh"
ensure_build_tools
"$stack" start >&2
# shellcheck disable=SC1091
source "$stack_dir/env"

# A nats-server and a Mosquitto of its own on other ports, with throwaway stores: the event
# stream, its consumers and the broker's persistent sessions start empty, so runs do not
# feed on each other or on the development stack.
scratch=$(mktemp -d /tmp/fleetlog-bench.XXXXXX)
nats_port=${BENCH_NATS_PORT:-54322}
mqtt_port=${BENCH_MQTT_PORT:-51983}
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# A server left over on these ports (say, from an interrupted run) would be measured instead,
# with its old sessions and streams: refuse to start.
for port in "$nats_port" "$mqtt_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        rm -rf "$scratch"
        fail "port $port is in use (a server left from an earlier run?); stop it or set BENCH_NATS_PORT / BENCH_MQTT_PORT"
    fi
done
mkdir -p "$scratch/nats" "$scratch/mosquitto"
cat >"$scratch/mosquitto/mosquitto.conf" <<CONF
user $(id -un)
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $scratch/mosquitto/
max_inflight_messages 1000
max_queued_messages 1000000
message_size_limit 262144
CONF
"$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$scratch/nats" >"$scratch/nats.log" 2>&1 &
nats_pid=$!
"$mosquitto_bin" -c "$scratch/mosquitto/mosquitto.conf" >"$scratch/mosquitto.log" 2>&1 &
mosquitto_pid=$!
platform=
cleanup() {
    # `|| true` throughout: under `set -e` a failing step would end the clean-up early and
    # leave the servers running.
    if [ -n "$platform" ]; then
        kill "$platform" 2>/dev/null || true
        wait "$platform" 2>/dev/null || true
    fi
    kill "$nats_pid" "$mosquitto_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

rate=${RATE:-10000}
seconds=${SECONDS_PER_PHASE:-20}
devices=${DEVICES:-1000}
http_port=${BENCH_HTTP_PORT:-18080}
database=fleetlog_bench_ingest
admin_url=$FLEETLOG_TEST_DATABASE_URL
bench_url=${admin_url%/*}/$database

say "building (release)"
(cd "$repo_root" && cargo build --release --quiet -p fleetlog -p fleetlog-bench)
fleetlog=$repo_root/target/release/fleetlog
bench=$repo_root/target/release/fleetlog-bench

psql -X -q "$admin_url" -c "DROP DATABASE IF EXISTS $database" -c "CREATE DATABASE $database"
FLEETLOG_DATABASE_URL=$bench_url "$fleetlog" migrate >/dev/null

log_file=$stack_dir/logs/bench-ingest.log
say "starting fleetlog up (log: $log_file)"
FLEETLOG_DATABASE_URL=$bench_url \
FLEETLOG_HTTP_ADDR=127.0.0.1:$http_port \
FLEETLOG_NATS_URL=nats://127.0.0.1:$nats_port \
FLEETLOG_MQTT_URL=mqtt://127.0.0.1:$mqtt_port \
FLEETLOG_LOG=${FLEETLOG_LOG:-warn} \
    "$fleetlog" up >"$log_file" 2>&1 &
platform=$!
for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$http_port/ready" >/dev/null 2>&1; then break; fi
    kill -0 "$platform" 2>/dev/null || fail "fleetlog up stopped; see $log_file"
    sleep 0.5
done
curl -fsS "http://127.0.0.1:$http_port/ready" >/dev/null || fail "fleetlog up never became ready"

FLEETLOG_DATABASE_URL=$bench_url "$bench" ingest \
    --mqtt-port "$mqtt_port" --devices "$devices" --rate "$rate" --seconds "$seconds"
