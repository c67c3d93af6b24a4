#!/usr/bin/env bash
# Prints fresh secrets for the compose stack, one NAME=value a line, for deploy/.env:
#   deploy/compose-secrets.sh > deploy/.env && chmod 600 deploy/.env
# Compose reads deploy/.env beside compose.yaml and refuses to start while one is missing.
# Keep the file: the database, the broker's state and every device's token depend on it.
set -euo pipefail
# Letters and digits starting with a letter: nats-server reads its variables as configuration
# values, where a leading digit would make a number.
fresh() { printf 'k%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"; }
for name in POSTGRES_PASSWORD FLEETLOG_JWT_SECRET FLEETLOG_DEVICE_CREDENTIAL_KEY \
    FLEETLOG_INGEST_MQTT_PASSWORD FLEETLOG_DISPATCH_MQTT_PASSWORD FLEETLOG_BROKER_SYNC_MQTT_PASSWORD \
    FLEETLOG_RELAY_NATS_PASSWORD FLEETLOG_PROJECT_NATS_PASSWORD FLEETLOG_INGEST_NATS_PASSWORD \
    FLEETLOG_DISPATCH_NATS_PASSWORD FLEETLOG_BROKER_SYNC_NATS_PASSWORD FLEETLOG_API_NATS_PASSWORD \
    FLEETLOG_READER_NATS_PASSWORD FLEETLOG_ADMIN_NATS_PASSWORD; do
    printf '%s=%s\n' "$name" "$(fresh)"
done
