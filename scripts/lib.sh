# Shared helpers for scripts/*. Source it; it does not run anything by itself.
# shellcheck shell=bash

# Absolute path of the repository root (the parent of scripts/).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

# Prints a step heading to stderr, so it stays out of anything a caller captures.
step() {
    printf '==> %s\n' "$*" >&2
}

# Prints a command, then runs it.
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, through sudo when it exists.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        run "$@"
    elif command -v sudo >/dev/null 2>&1; then
        run sudo "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

# Prints a free TCP port on 127.0.0.1. The port is released before it is used, so a caller
# binding it later may race another process; etcd then fails to start and says so in its log.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
        return
    fi
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 30000))
        if [[ -z "$(ss -Htan "sport = :$port")" ]]; then
            echo "$port"
            return
        fi
    done
    die "found no free TCP port on 127.0.0.1"
}
