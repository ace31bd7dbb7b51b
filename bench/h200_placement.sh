#!/bin/bash
# Expert placement on the H200 host (issue 14, items 1-4 and 7): the GPU tests, then bench_hybrid against llama.cpp
# built with CUDA (experts on the CPU, and the VRAM curve), the streamed-prefill threshold, and the quality cost of
# expert deferral / selective experts. About 8 minutes with a warm pip cache; run from the repository root:
#
#   LCPP=/tmp/lcpp PEERS=../shared/peers bash bench/h200_placement.sh [tests] [bench] [fidelity]
#
# LCPP: the llama.cpp CUDA build (llama-bench and its libraries; ../shared/peers/README.md, build-peer-cuda.sh).
# PEERS: the folder holding run-peer.sh. Without LCPP/llama-bench the bench times ktcore and llama.cpp CPU only.
# THREADS (default 16), REPEATS (default 2), CURVE (MoE layers' experts on the GPU, default 0,13,26).
# Stages default to all three. Every figure is printed with its peer's, measured in the same run.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
THREADS=${THREADS:-16}
REPEATS=${REPEATS:-2}
CURVE=${CURVE:-0,13,26}
LCPP=${LCPP:-/tmp/lcpp}
PEERS=${PEERS:-../shared/peers}
STAGES=${*:-tests bench fidelity}
export KT_CPU_THREADS=$THREADS
status=0

stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

$PY -c "import ktcore, kt_cuda, kt_cpu_amx, gguf" 2>/dev/null || {
  echo "ktcore, kt-cuda, kt-cpu-amx and gguf must be importable (pip install the gguf wheel, then"
  echo "pip install --no-deps --no-build-isolation -e . -e plugins/kt_cuda -e plugins/kt_cpu_amx)"; exit 2; }

for s in $STAGES; do case $s in
tests)
  stage "GPU tests: split/streamed experts on every MoE family, side-stream copy, planner output for three budgets"
  $PY -m pytest -q -p no:cacheprovider tests/test_moe_placement.py tests/test_placement.py tests/test_moe_hybrid.py \
    || status=1 ;;
bench)
  stage "bench_hybrid: llama.cpp CUDA (-ot exps=CPU, and the VRAM curve $CURVE), llama.cpp CPU, ktcore shipped + planned"
  peer=()
  if [ -x "$LCPP/llama-bench" ]; then
    peer=(--llama-bench "$LCPP/llama-bench")
    [ -f "$PEERS/run-peer.sh" ] && peer+=(--peer-runner "$PEERS/run-peer.sh")
  else
    echo "no $LCPP/llama-bench: the llama.cpp CUDA rows are left out"
  fi
  $PY bench/bench_hybrid.py --threads "$THREADS" --repeats "$REPEATS" --prompt-tokens 512,2048 --gen-tokens 32 \
    --gpu-expert-layers "$CURVE" --find-threshold "${peer[@]}" || status=1 ;;
fidelity)
  stage "fidelity: expert deferral and selective experts against the full model (agreement, KL, decode speed)"
  $PY bench/fidelity.py --moe-options "defer=1;top_k=4" --threads "$THREADS" --tokens 256 --gen-tokens 16 \
    --repeats "$REPEATS" || status=1 ;;
*) echo "unknown stage $s (tests, bench, fidelity)"; status=2 ;;
esac; done
stage "done, status $status"
exit $status
