#!/usr/bin/env bash
# Install bagel-serve with its test extra into .venv and run the test suite on the CPU.
# torch is pinned to the CPU build here only to keep the test install small; the package itself
# accepts any torch >= 2.5 (CUDA builds included).
set -euo pipefail
cd "$(dirname "$0")/.."

# The playground's browser test (tests/test_playground.py) drives the system's Chromium and its driver
# (Debian's chromium and chromium-driver): install them when they are missing, as root or with sudo.
chromium="${BAGEL_CHROMIUM:-/usr/bin/chromium}"
chromedriver="${BAGEL_CHROMEDRIVER:-/usr/bin/chromedriver}"
if [ ! -x "$chromium" ] || [ ! -x "$chromedriver" ]; then
    need="scripts/test.sh: the browser test needs $chromium and $chromedriver"
    if [ "$(id -u)" = 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "$need: run as root, or with password-less sudo, or install them first (apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null; then
        echo "$need: there is no apt-get here; install Chromium and its driver and set BAGEL_CHROMIUM / BAGEL_CHROMEDRIVER" >&2
        exit 1
    fi
    echo "scripts/test.sh: installing chromium and chromium-driver (apt-get)" >&2
    ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
        || { echo "$need: apt-get install chromium chromium-driver failed" >&2; exit 1; }
    if [ ! -x "$chromium" ] || [ ! -x "$chromedriver" ]; then
        echo "$need: they are still missing after apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure for us, not a pass.
exit $rc
