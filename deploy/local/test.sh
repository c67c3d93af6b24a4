#!/usr/bin/env bash
# Runs fleetlog's whole test suite on this machine: installs what is missing, starts the local
# stack (Postgres, nats-server, Mosquitto), checks formatting and lints, and runs every test,
# the integration tests against the real servers included. Stops the stack again if it started it.
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo_root"

ensure_build_tools

# cargo-deny, pinned, built from the registry the first time (a few minutes).
ensure_cargo_deny() {
    if ! cargo deny --version 2>/dev/null | grep -q '^cargo-deny 0\.20\.'; then
        say "installing cargo-deny"
        cargo install cargo-deny --version 0.20.2 --locked --quiet
    fi
}
# promtool, Prometheus's linter, checks every role's /metrics in the tests. It is taken from the
# distribution's prometheus package, unpacked under .fleetlog/tools rather than installed, so
# no Prometheus server gets set up (or started) on this machine.
ensure_promtool() {
    local tools=$repo_root/.fleetlog/tools
    if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$tools/usr/bin/promtool" ]; then
        say "unpacking promtool from the distribution's prometheus package into .fleetlog/tools"
        local scratch
        scratch=$(mktemp -d)
        chmod 755 "$scratch"
        if ! (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1); then
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1) \
                || fail "cannot download the prometheus package (for promtool)"
        fi
        mkdir -p "$tools"
        dpkg-deb -x "$scratch"/prometheus_*.deb "$tools"
        rm -rf "$scratch"
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        export PATH=$tools/usr/bin:$PATH
    fi
}
ensure_promtool

# kubernetes-validate (from PyPI, pinned) checks the manifests of deploy/k8s against the
# Kubernetes schemas it carries, offline, in a virtual environment under .fleetlog/tools.
ensure_kubernetes_validate() {
    local venv=$repo_root/.fleetlog/tools/venv
    if ! command -v kubernetes-validate >/dev/null 2>&1 && [ ! -x "$venv/bin/kubernetes-validate" ]; then
        say "installing kubernetes-validate into .fleetlog/tools/venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0
    fi
    if ! command -v kubernetes-validate >/dev/null 2>&1; then
        export PATH=$venv/bin:$PATH
    fi
}
ensure_kubernetes_validate

# A one-off build (CI) gains nothing from incremental compilation but gigabytes of cache.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

started_stack=0
if ! "$stack" status | grep -q '^postgres *running'; then
    started_stack=1
fi
stop_stack() {
    if [ "$started_stack" -eq 1 ]; then
        "$stack" stop || true
    fi
}
trap stop_stack EXIT
"$stack" start
# shellcheck disable=SC1091
source "$stack_dir/env"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo deny: licenses and bans"
# Advisories need the RustSec database from the network; see deny.toml.
ensure_cargo_deny
cargo deny --log-level error check licenses bans
say "cargo test"
test_log=$(mktemp)
cargo test --workspace --locked 2>&1 | tee "$test_log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$test_log"
rm -f "$test_log"
