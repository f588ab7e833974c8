#!/usr/bin/env bash
# Serve Lynx on http://127.0.0.1:8000:  bash serve.sh [CONFIG] [more serve.py flags...]
# Default: configs/LYNX.yaml, CUDA when available. Run it from the project root (paths in the config are relative).
set -euo pipefail
config=${1:-./configs/LYNX.yaml}
python3 "$(dirname "$0")/serve.py" --config "$config" "${@:2}"
