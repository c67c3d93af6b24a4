#!/usr/bin/env bash
# Benchmark: range queries on the telemetry read model at scale.
#
# Fills a scratch database (fleetlog's schema, via `fleetlog migrate`) with DEVICES devices x
# SENSORS sensors x READINGS readings, one per minute, inserted in time order as live ingest
# would, then times the API's typical query: one device's sensor over one day, for QUERIES
# random devices. Prints table and index sizes and the latency distribution.
#
#   deploy/bench/telemetry_range.sh                      # 10,000 x 2 x 1,000 = 20 million rows
#   DEVICES=50000 READINGS=1000 deploy/bench/telemetry_range.sh
#
# Needs the local stack (deploy/local/stack.sh start) and a built fleetlog (cargo build --release).
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack_dir=${FLEETLOG_STACK_DIR:-$repo_root/.fleetlog/stack}
# shellcheck disable=SC1091
source "$stack_dir/env"
devices=${DEVICES:-10000}
sensors=${SENSORS:-2}
readings=${READINGS:-1000}
queries=${QUERIES:-200}
fleetlog=${FLEETLOG_BIN:-$repo_root/target/release/fleetlog}
database=fleetlog_bench_telemetry
admin_url=$FLEETLOG_TEST_DATABASE_URL
bench_url=${admin_url%/*}/$database

psql -X -q "$admin_url" -c "DROP DATABASE IF EXISTS $database" -c "CREATE DATABASE $database"
FLEETLOG_DATABASE_URL=$bench_url "$fleetlog" migrate >/dev/null

rows=$((devices * sensors * readings))
echo "loading $rows rows ($devices devices x $sensors sensors x $readings readings)"
start=$(date +%s)
psql -X -q "$bench_url" <<SQL
SET synchronous_commit = off;
INSERT INTO telemetry (device_id, sensor, time, value, unit, sequence)
SELECT 'dev-' || d, 's' || s, timestamptz '2026-01-01' + i * interval '1 minute',
       random() * 100, 'celsius', i + 1
  FROM generate_series(1, $readings) AS i,
       generate_series(1, $devices) AS d,
       generate_series(1, $sensors) AS s
 ORDER BY i;
VACUUM ANALYZE telemetry;
SQL
echo "loaded in $(( $(date +%s) - start ))s"
psql -X -q "$bench_url" -c "
SELECT relname AS relation, pg_size_pretty(pg_relation_size(oid)) AS size
  FROM pg_class WHERE relname LIKE 'telemetry%' ORDER BY relname"

# One device's sensor over one day (1,440 readings at one per minute, fewer if the series is
# shorter), random devices, each query timed inside Postgres.
psql -X -q -t -A "$bench_url" <<SQL > /tmp/fleetlog-bench-latencies.txt
DO \$\$
DECLARE
  started timestamptz;
  device text;
  rows_read bigint;
BEGIN
  CREATE TEMP TABLE latencies (ms double precision, rows bigint);
  FOR q IN 1..$queries LOOP
    device := 'dev-' || (1 + floor(random() * $devices))::int;
    started := clock_timestamp();
    SELECT count(*) INTO rows_read FROM (
      SELECT time, value FROM telemetry
       WHERE device_id = device AND sensor = 's1'
         AND time >= timestamptz '2026-01-01' AND time < timestamptz '2026-01-02'
       ORDER BY time) r;
    INSERT INTO latencies VALUES (extract(epoch FROM clock_timestamp() - started) * 1000, rows_read);
  END LOOP;
  RAISE NOTICE 'queries % rows/query % p50 % ms p95 % ms p99 % ms max % ms',
    (SELECT count(*) FROM latencies),
    (SELECT round(avg(rows)) FROM latencies),
    (SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM latencies),
    (SELECT round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM latencies),
    (SELECT round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM latencies),
    (SELECT round(max(ms)::numeric, 3) FROM latencies);
END
\$\$;
SQL
psql -X -q "$bench_url" -c "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
SELECT time, value FROM telemetry
 WHERE device_id = 'dev-42' AND sensor = 's1'
   AND time >= '2026-01-01' AND time < '2026-01-02' ORDER BY time"
if [ "${KEEP:-0}" != 1 ]; then
    psql -X -q "$admin_url" -c "DROP DATABASE $database"
fi
