#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment from requirements.txt and puts it first
# on PATH. Sourced by the README's two commands:  source launch/env.sh
# VENV (default .venv) and PYTHON (default python3, 3.11) can be overridden.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
wanted=$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)
# Reinstall only when requirements.txt changed since the last successful install.
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]]; then
  echo "Installing requirements.txt into $VENV (first run: a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  echo "$wanted" > "$VENV/.requirements.sha256"
fi
export PATH="$VENV/bin:$PATH"
