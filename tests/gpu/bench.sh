#!/usr/bin/env bash
# The whole device check in one call: the GPU tests, then the GPU benchmarks, results in $OUT.
#   OUT=/tmp/gpu bash tests/gpu/bench.sh            # on a CUDA machine
#   OUT=/tmp/gpu bash tests/gpu/bench.sh --rehearse # here: the same steps on the CPU, tiny sizes
# Wheels the GPU image lacks (array-api-compat, curvlinops and its dependencies) are installed from
# .gpu/wheels when that folder exists (`pip download --no-deps -d .gpu/wheels ...`).
# Each step has its own time limit, so one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false TF_FORCE_GPU_ALLOW_GROWTH=true
rehearse=0; [ "${1:-}" = "--rehearse" ] && rehearse=1
if [ -d .gpu/wheels ] && [ $rehearse = 0 ]; then
    python -m pip install -q --no-deps --no-index .gpu/wheels/*.whl 2>&1 | tail -2
fi
step() {  # step NAME SECONDS command...: output to $OUT/NAME.txt, a one-line verdict here
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 4 "$OUT/$name.txt"
}
if [ $rehearse = 1 ]; then
    step models 300 python benchmarks/models.py --models gpt2 --dtypes float32 --batches 4 --repeats 2 \
        --out "$OUT/models.json"
    step family 300 python benchmarks/gpu_family.py --device cpu --quick --out "$OUT/family.json"
    step baselines 300 python benchmarks/baselines.py --frameworks jax --quick --out "$OUT/baselines.json"
    exit 0
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; timeout 150 bash tests/gpu/run.sh; } >"$OUT/tests.txt" 2>&1
echo "== tests: rc=$?"; tail -n 15 "$OUT/tests.txt"
step models 150 python benchmarks/models.py --device cuda --models resnet18 tiny_vit gpt2 \
    --dtypes float32 --batches 32 --repeats 9 --out "$OUT/models.json"
step family 100 python benchmarks/gpu_family.py --out "$OUT/family.json"
# JAX on the GPU against its hand-written products (the image has no TensorFlow; torch runs on the CPU there)
step baselines 120 python benchmarks/baselines.py --frameworks jax --rounds 9 --out "$OUT/baselines.json"
