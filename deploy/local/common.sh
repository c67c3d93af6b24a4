# Shared by the local scripts: paths, messages, and the checks for a Rust toolchain.
# shellcheck shell=bash

# shellcheck disable=SC2034  # used by the scripts that source this file
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stack=$repo_root/deploy/local/stack.sh
stack_dir=${FLEETLOG_STACK_DIR:-$repo_root/.fleetlog/stack}

say() { printf 'fleetlog: %s\n' "$*" >&2; }
fail() { printf 'fleetlog: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else fail "need root to run '$*' (no sudo found)"
    fi
}

# cargo and a C compiler (some dependencies compile C). Rust itself comes from rustup: the
# distribution's cargo is too old for this workspace.
ensure_build_tools() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null 2>&1 \
        || fail "cargo not found: install a Rust toolchain (1.89 or newer) with rustup, then run this again"
    if ! command -v cc >/dev/null 2>&1; then
        say "installing a C compiler"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev
    fi
}
