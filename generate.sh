#!/usr/bin/env bash
# Answer the config's test files:  bash generate.sh [CONFIG] [OUTPUT] [more generate.py flags...]
# Defaults as the original: configs/LYNX.yaml -> ./result_0.jsonl, seed 42, CUDA when available.
set -euo pipefail
cd "$(dirname "$0")"
config=${1:-./configs/LYNX.yaml}
output=${2:-./result_0.jsonl}
python3 generate.py --config "$config" --output_path "$output" --seed 42 "${@:3}"
