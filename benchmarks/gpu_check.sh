#!/usr/bin/env bash
# One command that turns BENCHMARKS.md's "not measured yet" into numbers on a GPU machine: at most 8 minutes on one
# H100 / H200, from a fresh checkout with requirements.txt installed; run from anywhere.
#
#   bash benchmarks/gpu_check.sh                      # GPU: results in benchmarks/results/<card>-<date>.json
#   bash benchmarks/gpu_check.sh --work "$OUT"        # also keep the logs and a copy of the results in $OUT
#   bash benchmarks/gpu_check.sh --tiny               # CPU dry run of every stage with the tiny model (tests)
#
# Stages, each with a time budget (seconds; BUDGET_<stage>=N overrides one, e.g. BUDGET_benchmark=300), in order of
# value; a stage that fails or runs out of time is recorded and the next one runs:
#   env            card, driver, torch                                                    20
#   release-files  full-size random release files in a temp folder (18 GB), in the background from the start  240
#   pytest-gpu     python -m pytest -m gpu (graphs replayed, bf16 + compile + sampling, shapes past the
#                  recompile limit, failed captures, MediaAhead, a second GPU if there is one)      120
#   benchmark      baseline (first 16 records per set), fast path (every set and mode), int8, int4 (images:
#                  paper and greedy), greedy agreement float32 / bfloat16 and bfloat16 / int8, int4;
#                  writes its JSON after each configuration                               what is left - 100
#   load           the release files loaded to the GPU, warm page cache (load s, peak host RSS, GPU)     80
#   load-int8      the same with quantize: int8, when time is left                                      60
#   report         benchmarks/results/<card>-<date>.json, BENCHMARKS.md's rows, the targets met or missed  20
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
TINY=0
WORK=""
RESULTS="$ROOT/benchmarks/results"
TOTAL=480
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1 ;;
        --work) WORK="$2"; shift ;;
        --results) RESULTS="$2"; shift ;;
        --total) TOTAL="$2"; shift ;;
        *) echo "usage: $0 [--tiny] [--work DIR] [--results DIR] [--total SECONDS]" >&2; exit 64 ;;
    esac
    shift
done
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/lynx-gpu-check.XXXXXX")}"
mkdir -p "$WORK" "$RESULTS"
RELEASE="$(mktemp -d "${TMPDIR:-/tmp}/lynx-release.XXXXXX")"  # 18 GB: never under --work (it may be copied back)
trap 'rm -rf "$RELEASE"' EXIT
STAGES="$WORK/stages.jsonl"
: >"$STAGES"
START=$(date +%s)
DEADLINE=$((START + TOTAL))

budget() {  # budget NAME DEFAULT: BUDGET_<name> (dashes as underscores) or the default
    local var="BUDGET_${1//-/_}"
    echo "${!var:-$2}"
}

record() {  # record NAME STATUS RC SECONDS BUDGET NOTE
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "budget": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" >>"$STAGES"
    printf '%-14s %-8s %6ss of %ss %s\n' "$1" "$2" "$4" "$5" "$6"
}

run_stage() {  # run_stage NAME BUDGET RESERVE CMD...: at most BUDGET s, leaving RESERVE s for the stages after
    local name="$1" limit="$2" reserve="$3"
    shift 3
    local left=$((DEADLINE - $(date +%s) - reserve))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$name" skipped null 0 "$limit" "no time left"
        return
    fi
    local t0=$(date +%s) rc status note=""
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="stopped after ${limit} s" ;;
        *) status=failed; note="$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | tr -cd '[:print:]' | tr -d '"\\' | cut -c1-160)" ;;
    esac
    record "$name" "$status" "$rc" $(($(date +%s) - t0)) "$limit" "$note"
}

if [ "$TINY" = 1 ]; then
    DEVICE=cpu
    RELEASE_ARGS=(--layers 2 --vit-depth 2 --scale 16 --max-shard-gb 0.012)
    PYTEST=("$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider)  # collects: no GPU to run them on
    BENCH=(--tiny --device cpu --limit 4 --batch-size 2 --max-new-tokens 4)
else
    DEVICE=cuda
    RELEASE_ARGS=()
    PYTEST=("$PYTHON" -m pytest -m gpu -n 0 -v -p no:cacheprovider -rfEs --junitxml="$WORK/pytest.xml")  # -n 0: one
    # process for the one card; -v: each result in the log as it comes, should the stage run out of time before
    # pytest writes its XML
    BENCH=(--device cuda)
fi

echo "Lynx GPU check: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), logs in $WORK, at most $TOTAL s"
run_stage env "$(budget env 20)" 0 "$PYTHON" -c 'import shutil, subprocess, torch
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if shutil.which("nvidia-smi") else "no nvidia-smi")
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "(no CUDA device)")'

release_budget=$(budget release-files 240)
release_t0=$(date +%s)
(
    nice timeout --kill-after=10 "$release_budget" "$PYTHON" benchmarks/write_release_files.py --out "$RELEASE" \
        "${RELEASE_ARGS[@]}" >"$WORK/release-files.log" 2>&1
    echo "$? $(date +%s)" >"$WORK/release-files.done"
) &
release_pid=$!

run_stage pytest-gpu "$(budget pytest-gpu 120)" 200 "${PYTEST[@]}"
run_stage benchmark "$(budget benchmark 100000)" "$(budget benchmark-reserve 100)" "$PYTHON" benchmarks/benchmark.py \
    "${BENCH[@]}" --baseline-limit 16 --fidelity-limit 32 --split-limit 32 --quantize int8 int4 \
    --quantized-sets images --quantized-modes paper greedy --out "$WORK/benchmark.json"

wait "$release_pid"
read -r rc release_end <"$WORK/release-files.done"
case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
record release-files "$status" "$rc" $((release_end - release_t0)) "$release_budget" "in the background"
if [ "$status" = ok ]; then
    run_stage load "$(budget load 80)" 20 "$PYTHON" benchmarks/load_benchmark.py --config "$RELEASE/lynx.yaml" \
        --device "$DEVICE" --dtype bfloat16 --quantize none --cache warm --out "$WORK/load.json"
    if [ $((DEADLINE - $(date +%s) - 20)) -ge "$(budget load-int8 60)" ]; then
        run_stage load-int8 "$(budget load-int8 60)" 20 "$PYTHON" benchmarks/load_benchmark.py \
            --config "$RELEASE/lynx.yaml" --device "$DEVICE" --dtype bfloat16 --quantize int8 --cache warm \
            --out "$WORK/load-int8.json"
    else
        record load-int8 skipped null 0 "$(budget load-int8 60)" "no time left"
    fi
else
    record load skipped null 0 "$(budget load 80)" "no release files"
fi

run_stage report "$(budget report 20)" -30 "$PYTHON" benchmarks/gpu_report.py --work "$WORK" --results "$RESULTS" \
    --elapsed $(($(date +%s) - START))
cat "$WORK/report.log"
exit 0
