#!/usr/bin/env bash
# Starts fleetlog on this machine: installs and starts the local stack (Postgres, nats-server,
# Mosquitto), builds fleetlog, applies the migrations, creates a first admin user (printing its
# credentials), then runs every role with `fleetlog up` until Ctrl-C.
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo_root"

ensure_build_tools
"$stack" start
# shellcheck disable=SC1091
source "$stack_dir/env"

say "building fleetlog (release)"
cargo build --release --locked --bin fleetlog
fleetlog=$repo_root/target/release/fleetlog

"$fleetlog" migrate

tenant=${FLEETLOG_ADMIN_TENANT:-default}
username=${FLEETLOG_ADMIN_USERNAME:-admin}
password=$("$stack" secret admin-password)
if output=$(printf '%s\n' "$password" | "$fleetlog" user create --tenant "$tenant" \
        --username "$username" --role admin --password-stdin 2>&1); then
    say "$output"
elif ! grep -q 'already taken' <<<"$output"; then
    fail "$output"
fi

cat >&2 <<MSG

  fleetlog is starting.
    API        http://${FLEETLOG_HTTP_ADDR:-127.0.0.1:8080}   (health: /health, readiness: /ready)
    admin      tenant '$tenant', username '$username', password '$password'
               (kept in $stack_dir/secrets/admin-password)
    stack      $stack_dir/env has the connection settings; stop it with deploy/local/stack.sh stop

MSG
exec "$fleetlog" up
