#!/usr/bin/env bash
# Answer the config's test files:  bash generate.sh [CONFIG] [OUTPUT] [more generate.py flags...]
# Defaults as the original: configs/LYNX.yaml -> ./result_0.jsonl, seed 42, CUDA when available.
# Run it from the project root: paths in the config and the jsonl files are relative to the working directory.
# The interpreter is $PYTHON, else the `python` on PATH (that of an activated environment).
set -euo pipefail
config=${1:-./configs/LYNX.yaml}
output=${2:-./result_0.jsonl}
"${PYTHON:-python}" "$(dirname "$0")/generate.py" --config "$config" --output_path "$output" --seed 42 "${@:3}"
