#!/usr/bin/env bash
# Installs what vit-accel needs on a fresh Debian/Ubuntu machine (Python 3.11):
#   - the embedded default dataset (Debian's dataset-fashion-mnist, ~30 MB)
#   - a virtual environment .venv with requirements.txt (and requirements-test.txt with --test)
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

REQS=requirements.txt
[ "${1:-}" = "--test" ] && REQS=requirements-test.txt
PYTHON="${PYTHON:-python3}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing dataset-fashion-mnist (the embedded default data)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# Only hit the package index when the requirements changed since the last install.
STAMP=".venv/.installed-$(cat requirements.txt "$REQS" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing $REQS into .venv"
  .venv/bin/python -m pip install -q -r "$REQS"
  touch "$STAMP"
fi
echo "setup: ready (.venv/bin/python)"
