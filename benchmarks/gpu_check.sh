#!/usr/bin/env bash
# One GPU lease's checks, in order of value, each under its own time limit so that a hang in one
# still leaves the others' output (every log goes to $OUT, default ./gpu_out):
#   1. the test suite with CUDA visible: the CLI tests run with --device auto, so every command
#      (train, resume, sample, eval, distill, ema, export, serve) runs on the GPU; failures and
#      their tracebacks in failures.log as they happen;
#   2. the quick start's own command on the GPU (wall time, its grid and its eval line), the
#      best 20-core-minute unconditional recipe (configs/mnist_cosine_8k.yaml) timed the same way,
#      and the quick start's training under torch.compile (the small UNet is launch-bound);
#   3. benchmarks/throughput.py: ours beside diffusers, fp32 and bf16, plus MFU on CUDA, then the
#      CIFAR-10 bf16 rows again with ours under torch.compile (CUDA graphs for sampling).
#
#   bash benchmarks/gpu_check.sh              # after pip install -e ".[dev]" on a CUDA machine
#   DEVICE=cpu SKIP_SUITE=1 QUICK_ARGS="--train.steps 20" bash benchmarks/gpu_check.sh  # dry run
# The first lease (docs/performance.md, "Measured on one H200") ran out in the third step: the
# defaults below give the suite more room; set the *_LIMIT variables to fit the time lent.
set -uo pipefail
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -rf /tmp/gpu_quick /tmp/gpu_8k /tmp/gpu_quick_compiled  # the runs below start fresh
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date -u +%T))"; }
# timed LIMIT LOG CMD...: run CMD under timeout (SIGTERM, which training answers at the next step
# boundary, then SIGKILL 10 s later: a compile does not stop for it), progress bars' \r turned
# into lines, the whole output in $OUT/LOG and its tail here, then the wall time. At most 8 files
# come back from a lease: this script writes 8.
timed() {
    local limit=$1 log=$2 start=$EPOCHREALTIME
    shift 2
    timeout -k 10 "$limit" "$@" 2>&1 | tr '\r' '\n' > "$OUT/$log"
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
    # test_docs.py builds the site with mkdocs, which GPU images seldom carry. Each failure goes
    # to failures.log with its traceback as it happens (tests/conftest.py), so a suite stopped by
    # the limit still names them; on an H200 lease the whole suite took over 200 s on 12 workers.
    rm -f "$OUT/failures.log"
    PIXELDIFFUSION_FAILURE_LOG="$OUT/failures.log" TAIL=60 timed "${SUITE_LIMIT:-300}" \
        pytest.log python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        -n "${PYTEST_WORKERS:-16}" --ignore tests/test_docs.py -rfE
    grep "^=== " "$OUT/failures.log" 2>/dev/null
fi

step "quick start: pixeldiffusion train -c configs/digits.yaml on $DEVICE"
timed "${QUICK_LIMIT:-150}" quickstart.log pixeldiffusion train -c configs/digits.yaml \
    -e /tmp/gpu_quick --device "$DEVICE" ${QUICK_ARGS:-}
cp /tmp/gpu_quick/samples/final.png "$OUT/quickstart_final.png"

step "8,400-step unconditional recipe: configs/mnist_cosine_8k.yaml on $DEVICE"
timed "${RECIPE_LIMIT:-150}" recipe8k.log pixeldiffusion train -c configs/mnist_cosine_8k.yaml \
    -e /tmp/gpu_8k --device "$DEVICE" ${RECIPE_ARGS:-}

step "the quick start's training compiled (--train.compile true), 600 steps on $DEVICE"
timed "${COMPILED_LIMIT:-150}" quickstart_compiled.log pixeldiffusion train -c configs/digits.yaml \
    -e /tmp/gpu_quick_compiled --device "$DEVICE" --train.compile true --train.steps 600 \
    --train.eval_samples 0 ${QUICK_ARGS:-}

step "throughput, ours beside diffusers"
TAIL=30 timed "${THROUGHPUT_LIMIT:-150}" throughput.log python3 benchmarks/throughput.py \
    --device "$DEVICE" ${THROUGHPUT_ARGS:-}

step "throughput, CIFAR-10 bf16 with ours compiled"
TAIL=12 timed "${COMPILE_LIMIT:-150}" throughput_compile.log python3 benchmarks/throughput.py \
    --device "$DEVICE" --compile --configs cifar10 --precisions bf16 --mfu-batches 256 \
    ${THROUGHPUT_ARGS:-}
step done
