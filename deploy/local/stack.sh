#!/usr/bin/env bash
# The local fleetlog stack: Postgres, nats-server (JetStream) and Mosquitto from the
# distribution's packages, each on its own local port with its data under one project-local
# directory. No container engine needed.
#
#   deploy/local/stack.sh start    install what is missing, start what is not running
#   deploy/local/stack.sh stop     stop all three
#   deploy/local/stack.sh status   say what runs
#   deploy/local/stack.sh env      print the FLEETLOG_* variables that point at the stack
#   deploy/local/stack.sh secret N print secret N, generating it on first use
#   deploy/local/stack.sh restart S  restart one server S (postgres, nats or mosquitto); for
#                                    postgres `crash` instead stops it as a power cut would
#                                    (immediate shutdown, recovery from the WAL at start)
#   deploy/local/stack.sh pid S      print the process id of server S
#
# Works as a normal user (sudo for apt) and as root (Postgres then runs as the `postgres` user,
# since it refuses to run as root).
#
# Settings (environment):
#   FLEETLOG_STACK_DIR   where data, logs and generated secrets go  (default: <repo>/.fleetlog/stack)
#   FLEETLOG_PG_PORT     Postgres port                               (default: 55432)
#   FLEETLOG_NATS_PORT   NATS client port                            (default: 54222)
#   FLEETLOG_MQTT_PORT   MQTT port                                   (default: 51883)
#   FLEETLOG_MQTTS_PORT  MQTT over TLS port                          (default: 58883)
#
# Nothing listens beyond 127.0.0.1, and nothing is anonymous: NATS has a user per role with
# only its rights (deploy/nats/accounts.conf); Mosquitto runs the
# dynamic-security plugin with no anonymous access (the broker sync, `fleetlog broker-sync` or
# `fleetlog up`, creates the ingest and dispatch accounts and every device's), and a TLS
# listener with a certificate from a CA generated for this stack. Every password and key is
# generated on first use and kept under secrets/; `env` prints them.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack_dir=${FLEETLOG_STACK_DIR:-$repo_root/.fleetlog/stack}
pg_port=${FLEETLOG_PG_PORT:-55432}
nats_port=${FLEETLOG_NATS_PORT:-54222}
mqtt_port=${FLEETLOG_MQTT_PORT:-51883}
mqtts_port=${FLEETLOG_MQTTS_PORT:-58883}

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

as_root() {
    if is_root; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run '$*' (no sudo found)"
    fi
}

# ---------------------------------------------------------------------------------------------
# Packages

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found: install $* with your package manager, then run this again"
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        apt_updated=1
    fi
    log "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

pg_bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && printf '%s' "$dir"
}

ensure_packages() {
    local missing=()
    pg_bin_dir >/dev/null || missing+=(postgresql postgresql-client)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    # mosquitto_ctrl and the dynamic-security plugin come with Debian's mosquitto package.
    command -v mosquitto_ctrl >/dev/null 2>&1 || missing+=(mosquitto)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then
        # shellcheck disable=SC2046
        apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
    fi
}

# ---------------------------------------------------------------------------------------------
# Helpers

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
    local port=$1 name=$2 log_file=$3
    for _ in $(seq 1 100); do
        port_open "$port" && return 0
        sleep 0.1
    done
    [ -f "$log_file" ] && tail -n 20 "$log_file" >&2
    die "$name did not open port $port (log: $log_file)"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# A secret generated once and kept in the stack directory.
secret() {
    local file=$stack_dir/secrets/$1
    if [ ! -s "$file" ]; then
        mkdir -p "$stack_dir/secrets"
        chmod 700 "$stack_dir/secrets"
        (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file")
    fi
    cat "$file"
}

# ---------------------------------------------------------------------------------------------
# Postgres

# Postgres runs as the `postgres` user when we are root. That user must be able to reach its
# data directory; a checkout under a private home directory is not reachable, so the data then
# lives in a directory of its own under /var/tmp, named after the stack directory.
pg_data_dir() {
    if is_root && ! runuser -u postgres -- test -x "$stack_dir" 2>/dev/null; then
        printf '/var/tmp/fleetlog-%s/postgres' "$(printf '%s' "$stack_dir" | md5sum | cut -c1-12)"
    else
        printf '%s/postgres' "$stack_dir"
    fi
}

as_pg_user() {
    # From /, which the postgres user can always enter, unlike a private checkout.
    if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pg_admin_password() { secret postgres-admin-password; }
pg_app_password() { secret postgres-fleetlog-password; }

psql_admin() {
    PGPASSWORD=$(pg_admin_password) psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" \
        -U postgres -d postgres "$@"
}

start_postgres() {
    local bin data log_file
    bin=$(pg_bin_dir) || die "Postgres server binaries not found under /usr/lib/postgresql"
    data=$(pg_data_dir)
    # Beside the data directory, where the postgres user can write in either case.
    log_file=$(dirname "$data")/postgres.log
    if as_pg_user "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "postgres already running on port $pg_port"
        return
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        log "initialising postgres in $data"
        mkdir -p "$data"
        chmod 700 "$data"
        local pwfile
        pwfile=$(mktemp)
        pg_admin_password >"$pwfile"
        if is_root; then
            chown postgres:postgres "$data" "$pwfile"
            # The parent may be ours; Postgres only needs to reach and own the data directory.
            chmod 755 "$(dirname "$data")"
        fi
        as_pg_user "$bin/initdb" -D "$data" -U postgres --pwfile="$pwfile" \
            --auth-host=scram-sha-256 --auth-local=peer -E UTF8 --locale=C.UTF-8 >/dev/null \
            || { rm -f "$pwfile"; die "initdb failed"; }
        rm -f "$pwfile"
    fi
    if is_root; then touch "$log_file" && chown postgres "$log_file"; fi
    log "starting postgres on 127.0.0.1:$pg_port"
    as_pg_user "$bin/pg_ctl" -D "$data" -l "$log_file" -w -t 60 \
        -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 -c fsync=${FLEETLOG_PG_FSYNC:-on}" \
        start >/dev/null || { tail -n 20 "$log_file" >&2; die "postgres did not start"; }
    wait_for_port "$pg_port" postgres "$log_file"
    ensure_app_database
}

ensure_app_database() {
    local password
    password=$(pg_app_password)
    if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'fleetlog'")" ]; then
        psql_admin -c "CREATE ROLE fleetlog LOGIN PASSWORD '$password'"
    fi
    if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'fleetlog'")" ]; then
        psql_admin -c "CREATE DATABASE fleetlog OWNER fleetlog"
    fi
}

stop_postgres() {
    local bin data mode=${1:-fast}
    bin=$(pg_bin_dir) || return 0
    data=$(pg_data_dir)
    if as_pg_user "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "stopping postgres ($mode)"
        as_pg_user "$bin/pg_ctl" -D "$data" -m "$mode" -w stop >/dev/null
    fi
}

# ---------------------------------------------------------------------------------------------
# NATS

nats_bin() { command -v nats-server 2>/dev/null || printf /usr/sbin/nats-server; }

# The NATS users (deploy/nats/accounts.conf) and the variables their passwords are read from.
nats_users="RELAY PROJECT INGEST DISPATCH BROKER_SYNC API READER ADMIN"

# A NATS user's password. nats-server reads the variable as a configuration value, so it
# starts with a letter: a plain word, never a number.
nats_password() {
    local name
    name=$(printf '%s' "$1" | tr 'A-Z_' 'a-z-')
    printf 'pw%s' "$(secret "nats-$name-password")"
}

nats_environment() {
    local user
    for user in $nats_users; do
        printf 'FLEETLOG_%s_NATS_PASSWORD=%s\n' "$user" "$(nats_password "$user")"
    done
}

start_nats() {
    local pid_file=$stack_dir/nats/nats.pid log_file=$stack_dir/logs/nats.log
    if pid_alive "$pid_file"; then
        log "nats already running on port $nats_port"
        return
    fi
    mkdir -p "$stack_dir/nats/jetstream"
    # Includes are read relative to the including file: the users go beside it.
    cp "$repo_root/deploy/nats/accounts.conf" "$stack_dir/nats/accounts.conf"
    cat >"$stack_dir/nats/nats.conf" <<EOF
# Generated by deploy/local/stack.sh
listen: 127.0.0.1:$nats_port
jetstream { store_dir: "$stack_dir/nats/jetstream" }
include "accounts.conf"
EOF
    log "starting nats-server (JetStream, a user per role) on 127.0.0.1:$nats_port"
    # shellcheck disable=SC2046  # one NAME=value word per user
    setsid env $(nats_environment) "$(nats_bin)" -c "$stack_dir/nats/nats.conf" \
        -P "$pid_file" >>"$log_file" 2>&1 </dev/null &
    wait_for_port "$nats_port" nats-server "$log_file"
}

stop_pid_file() {
    local name=$1 pid_file=$2
    if pid_alive "$pid_file"; then
        log "stopping $name"
        local pid
        pid=$(cat "$pid_file")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

# ---------------------------------------------------------------------------------------------
# Mosquitto

mosquitto_bin() { command -v mosquitto 2>/dev/null || printf /usr/sbin/mosquitto; }

dynsec_plugin() {
    local plugin
    plugin=$(ls /usr/lib/mosquitto_dynamic_security.so /usr/lib/*/mosquitto_dynamic_security.so \
        /usr/local/lib/mosquitto_dynamic_security.so 2>/dev/null | head -n 1)
    [ -n "$plugin" ] || die "mosquitto_dynamic_security.so not found: Mosquitto 2 with the dynamic-security plugin is needed"
    printf '%s' "$plugin"
}

# A CA for this stack and a server certificate it signs, for 127.0.0.1 and localhost.
ensure_tls() {
    local dir=$stack_dir/tls
    [ -s "$dir/server.pem" ] && return
    mkdir -p "$dir"
    chmod 700 "$dir"
    log "generating a CA and a server certificate for the MQTT TLS listener"
    (
        umask 077
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=fleetlog local stack CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
            >"$dir/server.ext"
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -CAcreateserial -days 825 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
    ) || die "could not generate the TLS certificates"
    rm -f "$dir/server.csr" "$dir/server.ext"
    chmod 644 "$dir/ca.pem"
}

# The plugin's state: created once with its admin, the broker sync's account.
ensure_dynsec() {
    local file=$1
    [ -s "$file" ] && return
    log "initialising the broker's dynamic-security state (admin: fleetlog.sync)"
    mosquitto_ctrl dynsec init "$file" fleetlog.sync "$(secret mqtt-sync-password)" >/dev/null \
        || die "mosquitto_ctrl dynsec init failed"
    chmod 600 "$file"
}

start_mosquitto() {
    local dir=$stack_dir/mosquitto log_file=$stack_dir/logs/mosquitto.log
    local pid_file=$dir/mosquitto.pid
    if pid_alive "$pid_file"; then
        log "mosquitto already running on port $mqtt_port"
        return
    fi
    mkdir -p "$dir/data"
    ensure_tls
    ensure_dynsec "$dir/dynamic-security.json"
    # `user` keeps mosquitto from switching to its own system user when started as root,
    # which could neither write to this directory nor save the plugin's state in it.
    cat >"$dir/mosquitto.conf" <<EOF
# Generated by deploy/local/stack.sh
user $(id -un)
per_listener_settings false
allow_anonymous false
plugin $(dynsec_plugin)
plugin_opt_config_file $dir/dynamic-security.json
listener $mqtt_port 127.0.0.1
listener $mqtts_port 127.0.0.1
cafile $stack_dir/tls/ca.pem
certfile $stack_dir/tls/server.pem
keyfile $stack_dir/tls/server.key
persistence true
persistence_location $dir/data/
pid_file $pid_file
log_dest file $log_file
# The ingest bridge acks after committing: let enough QoS 1 messages be in flight to it, and
# queue plenty for it while it restarts.
max_inflight_messages 1000
max_queued_messages 1000000
# Deliveries leave at once, not behind Nagle's wait for the previous segment's ACK.
set_tcp_nodelay true
# Payloads up to 256 KiB: what ingest reads without dropping its connection
# (fleetlog_ingest::broker::BROKER_MESSAGE_LIMIT). Larger ones are refused by the broker.
message_size_limit 262144
EOF
    log "starting mosquitto on 127.0.0.1:$mqtt_port (TLS: $mqtts_port)"
    "$(mosquitto_bin)" -c "$dir/mosquitto.conf" -d 2>>"$log_file"
    wait_for_port "$mqtt_port" mosquitto "$log_file"
}

# ---------------------------------------------------------------------------------------------

print_env() {
    cat <<EOF
export FLEETLOG_DATABASE_URL='postgres://fleetlog:$(pg_app_password)@127.0.0.1:$pg_port/fleetlog'
export FLEETLOG_TEST_DATABASE_URL='postgres://postgres:$(pg_admin_password)@127.0.0.1:$pg_port/postgres'
export FLEETLOG_NATS_URL='nats://127.0.0.1:$nats_port'
$(nats_environment | sed "s/^\(.*\)=\(.*\)$/export \1='\2'/")
export FLEETLOG_MQTT_URL='mqtt://127.0.0.1:$mqtt_port'
export FLEETLOG_MQTT_CA_FILE='$stack_dir/tls/ca.pem'
export FLEETLOG_INGEST_MQTT_PASSWORD='$(secret mqtt-ingest-password)'
export FLEETLOG_DISPATCH_MQTT_PASSWORD='$(secret mqtt-dispatch-password)'
export FLEETLOG_BROKER_SYNC_MQTT_PASSWORD='$(secret mqtt-sync-password)'
export FLEETLOG_DEVICE_CREDENTIAL_KEY='$(secret device-credential-key)'
export FLEETLOG_JWT_SECRET='$(secret jwt-secret)'
# Devices over TLS: mqtts://127.0.0.1:$mqtts_port, trusting the CA in FLEETLOG_MQTT_CA_FILE.
export FLEETLOG_DATA_DIR='$(dirname "$stack_dir")/data'
EOF
}

status() {
    local bin
    bin=$(pg_bin_dir || true)
    if [ -n "$bin" ] && as_pg_user "$bin/pg_ctl" -D "$(pg_data_dir)" status >/dev/null 2>&1; then
        echo "postgres   running  127.0.0.1:$pg_port"
    else
        echo "postgres   stopped"
    fi
    if pid_alive "$stack_dir/nats/nats.pid"; then
        echo "nats       running  127.0.0.1:$nats_port"
    else
        echo "nats       stopped"
    fi
    if pid_alive "$stack_dir/mosquitto/mosquitto.pid"; then
        echo "mosquitto  running  127.0.0.1:$mqtt_port, TLS 127.0.0.1:$mqtts_port"
    else
        echo "mosquitto  stopped"
    fi
}

main() {
    case "${1:-}" in
        start)
            ensure_packages
            mkdir -p "$stack_dir/logs"
            start_postgres
            start_nats
            start_mosquitto
            # Every secret is in it: never readable by others, not even for a moment.
            (umask 077; print_env >"$stack_dir/env")
            chmod 600 "$stack_dir/env"
            log "stack is up; variables in $stack_dir/env"
            ;;
        stop)
            stop_mosquitto_and_nats
            stop_postgres
            ;;
        status) status ;;
        env) print_env ;;
        secret)
            [ -n "${2:-}" ] || die "usage: $0 secret NAME"
            secret "$2"
            ;;
        restart)
            case "${2:-}" in
                postgres) stop_postgres fast; start_postgres ;;
                crash) stop_postgres immediate; start_postgres ;;
                nats) stop_pid_file nats-server "$stack_dir/nats/nats.pid"; start_nats ;;
                mosquitto) stop_pid_file mosquitto "$stack_dir/mosquitto/mosquitto.pid"; start_mosquitto ;;
                *) die "usage: $0 restart postgres|crash|nats|mosquitto" ;;
            esac
            ;;
        pid)
            case "${2:-}" in
                postgres) as_pg_user head -n 1 "$(pg_data_dir)/postmaster.pid" ;;
                nats) cat "$stack_dir/nats/nats.pid" ;;
                mosquitto) cat "$stack_dir/mosquitto/mosquitto.pid" ;;
                *) die "usage: $0 pid postgres|nats|mosquitto" ;;
            esac
            ;;
        *)
            echo "usage: $0 start|stop|status|env|secret NAME|restart SERVER|pid SERVER" >&2
            exit 2
            ;;
    esac
}

stop_mosquitto_and_nats() {
    stop_pid_file mosquitto "$stack_dir/mosquitto/mosquitto.pid"
    stop_pid_file nats-server "$stack_dir/nats/nats.pid"
}

main "$@"
