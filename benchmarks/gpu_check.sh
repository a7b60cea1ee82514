#!/usr/bin/env bash
# One GPU lease's checks, in order of value, each under its own time limit so that a hang in one
# still leaves the others' output (every log goes to $OUT, default ./gpu_out):
#   1. the test suite with CUDA visible: the CLI tests run with --device auto, so every command
#      (train, resume, sample, eval, distill, ema, export, serve) runs on the GPU;
#   2. the quick start's own command on the GPU (wall time, its grid and its eval line), then the
#      best 20-core-minute unconditional recipe (configs/mnist_cosine_8k.yaml) timed the same way;
#   3. benchmarks/throughput.py: ours beside diffusers, fp32 and bf16, plus MFU on CUDA, then the
#      CIFAR-10 bf16 rows again with ours under torch.compile (CUDA graphs for sampling).
#
#   bash benchmarks/gpu_check.sh              # after pip install -e ".[dev]" on a CUDA machine
#   DEVICE=cpu SKIP_SUITE=1 QUICK_ARGS="--train.steps 20" bash benchmarks/gpu_check.sh  # dry run
# Expected failures with a GPU: the tests that ask for --device cuda and expect the CPU-only CI
# machine's refusal ("sees no CUDA GPU").
set -uo pipefail
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date -u +%T))"; }
# timed LIMIT LOG CMD...: run CMD under timeout, progress bars' \r turned into lines, the whole
# output in $OUT/LOG and its tail here, then the wall time.
timed() {
    local limit=$1 log=$2 start=$EPOCHREALTIME
    shift 2
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' > "$OUT/$log"
    echo "exit ${PIPESTATUS[0]}; wall $(awk "BEGIN {print $EPOCHREALTIME - $start}") s" \
        >> "$OUT/$log"
    grep -v "it/s\]$" "$OUT/$log" | tail -"${TAIL:-14}"
}

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "cores: $(nproc)"

if [ -z "${SKIP_SUITE:-}" ]; then
    step "test suite, CUDA visible"
    # test_docs.py builds the site with mkdocs, which GPU images seldom carry.
    TAIL=60 timed "${SUITE_LIMIT:-240}" pytest.log python3 -m pytest -q -p no:cacheprovider \
        -o addopts="" -n "${PYTEST_WORKERS:-8}" --ignore tests/test_docs.py -rfE
fi

step "quick start: pixeldiffusion train -c configs/digits.yaml on $DEVICE"
timed "${QUICK_LIMIT:-150}" quickstart.log pixeldiffusion train -c configs/digits.yaml \
    -e /tmp/gpu_quick --device "$DEVICE" ${QUICK_ARGS:-}
cp /tmp/gpu_quick/samples/final.png "$OUT/quickstart_final.png"

step "8,400-step unconditional recipe: configs/mnist_cosine_8k.yaml on $DEVICE"
timed "${RECIPE_LIMIT:-150}" recipe8k.log pixeldiffusion train -c configs/mnist_cosine_8k.yaml \
    -e /tmp/gpu_8k --device "$DEVICE" ${RECIPE_ARGS:-}
cp /tmp/gpu_8k/samples/final.png "$OUT/recipe8k_final.png"

step "throughput, ours beside diffusers"
TAIL=30 timed "${THROUGHPUT_LIMIT:-150}" throughput.log python3 benchmarks/throughput.py \
    --device "$DEVICE" ${THROUGHPUT_ARGS:-}

step "throughput, CIFAR-10 bf16 with ours compiled"
TAIL=12 timed "${COMPILE_LIMIT:-150}" throughput_compile.log python3 benchmarks/throughput.py \
    --device "$DEVICE" --compile --configs cifar10 --precisions bf16 --mfu-batches 256 \
    ${THROUGHPUT_ARGS:-}
step done
