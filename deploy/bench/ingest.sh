#!/usr/bin/env bash
# Benchmark: fleetlog's capacity for MQTT telemetry on this machine, beside its baselines.
#
# Starts the local stack (its Postgres), a nats-server and a Mosquitto of its own, a scratch
# database and `fleetlog up` (every role in one process), then runs `fleetlog-bench ingest`,
# which measures, in one run:
#   - the raw Mosquitto QoS 1 publish->subscribe rate, and a raw multi-row Postgres INSERT;
#   - a minimal durable bridge: MQTT QoS 1 in, one multi-row INSERT of event rows per batch
#     into a table shaped as `events`, ack after commit: the ceiling of this design;
#   - fleetlog end to end (MQTT QoS 1 publish -> event committed -> devices read model),
#     stepping the offered rate up until the p99 publish-to-projection latency passes 500 ms:
#     the capacity is the highest rate held; then the latency at half of it; per process
#     (fleetlog, mosquitto, nats, postgres) CPU microseconds per message and peak memory;
#   - `fleetlog replay --all` beside a COPY scan of the same events;
#   - `GET /api/v1/devices/{id}` beside a plain SQL read of the row over a pool as large;
#   - memory with 10,000 devices connected.
# It prints a table and writes the report as JSON (default .fleetlog/stack/capacity.json).
#
#   deploy/bench/ingest.sh
#   START_RATE=4000 STEP=1000 SECONDS_PER_PHASE=10 DEVICES=1000 deploy/bench/ingest.sh
#
# Settings (environment): START_RATE (6000), STEP (2000), MAX_RATE (30000),
# SECONDS_PER_PHASE (15), DEVICES (1000), CONNECTED_DEVICES (10000; 0 skips it),
# RAW_MESSAGES (100000), CAPACITY_JSON, BENCH_NATS_PORT, BENCH_MQTT_PORT, BENCH_HTTP_PORT;
# PARTS (raw,bridge,capacity,replay,reads,memory: the parts to measure, to re-measure one
# figure after a change); KEEP_DATABASE=1 keeps the last run's database (and its events, for
# a replay measured again) instead of starting from an empty one.
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
# Below the range of ports the kernel hands outgoing connections (32768 and up): the memory
# part alone opens 10,000, and one of them holding a server's port would stop the server (or
# the fault matrix's, run next) from listening.
nats_port=${BENCH_NATS_PORT:-24322}
mqtt_port=${BENCH_MQTT_PORT:-21983}
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
set_tcp_nodelay true
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

seconds=${SECONDS_PER_PHASE:-15}
devices=${DEVICES:-1000}
http_port=${BENCH_HTTP_PORT:-18080}
database=fleetlog_bench_ingest
admin_url=$FLEETLOG_TEST_DATABASE_URL
bench_url=${admin_url%/*}/$database

say "building (release)"
(cd "$repo_root" && cargo build --release --quiet -p fleetlog -p fleetlog-bench)
fleetlog=$repo_root/target/release/fleetlog
bench=$repo_root/target/release/fleetlog-bench

if [ -n "${KEEP_DATABASE:-}" ] && psql -X -qtA "$admin_url" \
    -c "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
    say "re-using the database $database (KEEP_DATABASE)"
else
    psql -X -q "$admin_url" -c "DROP DATABASE IF EXISTS $database" -c "CREATE DATABASE $database"
fi
FLEETLOG_DATABASE_URL=$bench_url "$fleetlog" migrate >/dev/null

log_file=$stack_dir/logs/bench-ingest.log
say "starting fleetlog up (log: $log_file)"
# The scratch broker has no dynamic-security plugin: no broker sync (and no passwords) there.
env -u FLEETLOG_BROKER_SYNC_MQTT_PASSWORD -u FLEETLOG_INGEST_MQTT_PASSWORD \
    -u FLEETLOG_DISPATCH_MQTT_PASSWORD \
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

printf '%s\n' "bench-viewer-password" | FLEETLOG_DATABASE_URL=$bench_url "$fleetlog" user create \
    --tenant bench --username viewer --role viewer --password-stdin >/dev/null \
    || [ -n "${KEEP_DATABASE:-}" ] # a kept database has its viewer already
mkdir -p "$stack_dir"
FLEETLOG_DATABASE_URL=$bench_url \
FLEETLOG_NATS_URL=nats://127.0.0.1:$nats_port \
FLEETLOG_MQTT_URL=mqtt://127.0.0.1:$mqtt_port \
    "$bench" ingest \
    --mqtt-port "$mqtt_port" --devices "$devices" --seconds "$seconds" \
    --start-rate "${START_RATE:-6000}" --step "${STEP:-2000}" --max-rate "${MAX_RATE:-30000}" \
    --raw-messages "${RAW_MESSAGES:-100000}" --connected-devices "${CONNECTED_DEVICES:-10000}" \
    --watch "fleetlog=$platform" --watch "mosquitto=$mosquitto_pid" --watch "nats=$nats_pid" \
    --watch "postgres+=$("$stack" pid postgres)" \
    --fleetlog "$fleetlog" --api-url "http://127.0.0.1:$http_port" \
    --api-login "viewer:bench-viewer-password" --api-pool "${FLEETLOG_DATABASE_MAX_CONNECTIONS:-20}" \
    ${PARTS:+--parts "$PARTS"} \
    --json "${CAPACITY_JSON:-$stack_dir/capacity.json}"
