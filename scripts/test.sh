#!/usr/bin/env bash
# Install socks6fast with its test extras into .venv (building the Cython
# extensions), then run the whole test suite and the lint/type gates.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q '.[test]'
.venv/bin/ruff check socks6fast tests benchmarks fuzz
.venv/bin/ruff format --check socks6fast tests benchmarks fuzz
.venv/bin/mypy
# pytest is run as a script (not `python -m pytest`) so that the installed
# package, with its compiled modules, is imported rather than the source tree.
.venv/bin/pytest -q -p no:cacheprovider
