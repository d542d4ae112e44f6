#!/usr/bin/env bash
# Installs what the project needs on a Debian machine, and nothing twice.
#   1. system packages (swtpm, tpm2-tools, Mosquitto, Chromium, ...) when missing;
#   2. .venv with the project and its dev tools, from requirements/dev.lock (hashes required).
# A second run with nothing changed only checks and returns in a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev mosquitto mosquitto-clients postgresql
                 pkg-config gcc python3-venv python3-dev chromium)
LOCK=requirements/dev.lock
VENV=.venv
STAMP=$VENV/.setup-stamp

if [ ! -f /etc/debian_version ] || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "This is not a Debian system; 'make setup' installs system packages only on Debian." >&2
    echo "Install these packages (Debian names) with your package manager, then run 'make setup' again:" >&2
    echo "  ${SYSTEM_PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python 3.11 or newer.
PY=""
for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY=$(command -v "$cand"); break
    fi
done
if [ -z "$PY" ]; then
    echo "setup: Python 3.11 or newer is required (Debian: apt-get install python3)" >&2; exit 1
fi

want=$(cat "$LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

echo "setup: creating $VENV from $LOCK"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --require-hashes -r "$LOCK"
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "$want" > "$STAMP"
echo "setup: done"
