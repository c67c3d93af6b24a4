#!/usr/bin/env bash
# The fault matrix: fleetlog deployed as production would run it, each role in its own process
# (two ingest, two project, two api, two relay of which one is
# active, one dispatch, one broker sync), on a stack of its own (Postgres, nats-server and
# Mosquitto with their users and accounts, on other ports, in a scratch directory). Under
# steady load it injects one fault after another: kill -9 of each role's instance, restart
# of nats-server and of Mosquitto, a crash-restart of Postgres, and a stall of the broker
# (SIGSTOP, then SIGCONT) longer than every keep-alive. It prints a table and writes it as
# JSON, and exits non-zero if anything was lost or duplicated, or the replay differs.
#
#   deploy/bench/faults.sh
#   FAULTS_SECONDS=25 deploy/bench/faults.sh      # a quick run, about ten minutes
#
# Settings (environment):
#   FAULTS_SECONDS  seconds per phase (default 40; one fault per phase, 11 phases)
#   FAULTS_DEVICES  simulated devices, each its own MQTT connection (default 50)
#   FAULTS_RATE     telemetry messages per second over all devices (default 200)
#   FAULTS_WRITES   REST writes per second (default 6)
#   FAULTS_INGEST   how the two ingest instances subscribe: shared (a shared subscription,
#                   both serving) or turns (one plain subscription on one session they take
#                   turns on). Default: shared on Mosquitto 2.0.19 or later, turns on older
#                   ones, which forget shared subscriptions when they restart (see README)
#   FAULTS_JSON     where the report goes (default .fleetlog/stack/faults.json)
#   FAULTS_LOG      the roles' log filter (default info); their logs and the servers' are
#                   kept under .fleetlog/stack/logs/faults/
#   FAULTS_PG_PORT, FAULTS_NATS_PORT, FAULTS_MQTT_PORT, FAULTS_MQTTS_PORT, FAULTS_HTTP_PORT
#                   the scratch stack's ports (25442, 24232, 21893, 28893; APIs on 18180-18181):
#                   below the kernel's range of ports for outgoing connections (32768 and up),
#                   so that none of the thousands of client connections a run (or the
#                   benchmark before it) opens holds one when a server starts or restarts
#                   and must listen on it again
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck disable=SC1091
source "$repo_root/deploy/local/common.sh"
ensure_build_tools

export FLEETLOG_PG_PORT=${FAULTS_PG_PORT:-25442}
export FLEETLOG_NATS_PORT=${FAULTS_NATS_PORT:-24232}
export FLEETLOG_MQTT_PORT=${FAULTS_MQTT_PORT:-21893}
export FLEETLOG_MQTTS_PORT=${FAULTS_MQTTS_PORT:-28893}
http_port=${FAULTS_HTTP_PORT:-18180}
for port in "$FLEETLOG_PG_PORT" "$FLEETLOG_NATS_PORT" "$FLEETLOG_MQTT_PORT" \
    "$FLEETLOG_MQTTS_PORT" "$http_port" "$((http_port + 1))"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is in use (a run left over?); stop it or choose other FAULTS_*_PORT"
    fi
done

results_dir=$repo_root/.fleetlog/stack
mkdir -p "$results_dir/logs"
json=${FAULTS_JSON:-$results_dir/faults.json}

say "building (release)"
(cd "$repo_root" && cargo build --release --quiet -p fleetlog -p fleetlog-bench)
fleetlog=$repo_root/target/release/fleetlog
bench=$repo_root/target/release/fleetlog-bench

# A stack of its own: restarting its servers disturbs nothing else, and it starts empty.
scratch=$(mktemp -d /tmp/fleetlog-faults.XXXXXX)
# Postgres runs as the postgres user when we are root: it must reach the directory.
chmod 755 "$scratch"
export FLEETLOG_STACK_DIR=$scratch/stack
cleanup() {
    # The roles, should the run have been killed before it stopped them.
    if [ -f "$scratch/run/pids" ]; then
        xargs -r kill -9 <"$scratch/run/pids" 2>/dev/null || true
    fi
    "$stack" stop >/dev/null 2>&1 || true
    rm -rf "$results_dir/logs/faults"
    if [ -d "$scratch/run/logs" ]; then
        cp -r "$scratch/run/logs" "$results_dir/logs/faults"
        cp "$FLEETLOG_STACK_DIR"/logs/*.log "$results_dir/logs/faults/" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT
"$stack" start
# shellcheck disable=SC1091
source "$FLEETLOG_STACK_DIR/env"
"$fleetlog" migrate >/dev/null

if [ -z "${FAULTS_INGEST:-}" ]; then
    mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    broker_version=$("$mosquitto_bin" -h 2>/dev/null | sed -n 's/^mosquitto version \([0-9.]*\).*/\1/p' | head -n 1 || true)
    # sort -V puts the older version first: 2.0.19 first means this one is at least as new.
    if [ -n "$broker_version" ] &&
        [ "$(printf '%s\n' 2.0.19 "$broker_version" | sort -V | head -n 1)" = 2.0.19 ]; then
        export FAULTS_INGEST=shared
    else
        export FAULTS_INGEST=turns
        say "Mosquitto ${broker_version:-of unknown version} forgets shared subscriptions when it restarts: the two ingest instances take turns on one session (FAULTS_INGEST=shared measures the other way)"
    fi
fi

"$bench" faults \
    --fleetlog "$fleetlog" \
    --stack "$stack" \
    --work-dir "$scratch/run" \
    --json "$json" \
    --http-port "$http_port"
