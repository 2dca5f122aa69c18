#!/usr/bin/env bash
# Install bagel-serve with its test extra into .venv and run the test suite on the CPU.
# torch is pinned to the CPU build here only to keep the test install small; the package itself
# accepts any torch >= 2.5 (CUDA builds included).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure for us, not a pass.
exit $rc
