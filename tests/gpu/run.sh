#!/usr/bin/env bash
# Run every GPU-marked test (torch on CUDA, TensorFlow and JAX on GPU where installed, CuPy) in one go.
#   bash tests/gpu/run.sh [extra pytest args]
#   CURVOP_GPU_BENCH=1 bash tests/gpu/run.sh   # then the curvature-family benchmark rows on CUDA too
# Needs a CUDA machine; tests whose framework is missing or sees no GPU are skipped with a reason (-rs).
# The family's GPU tests (GGN, Fisher, Jacobian, solve: issue 22) are among the GPU-marked ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX: do not grab 75% of GPU memory up front (torch and CuPy share the card in this process).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# TensorFlow: allocate GPU memory on demand for the same reason.
export TF_FORCE_GPU_ALLOW_GROWTH=true
python - <<'PY' || true
import importlib.util
for m in ("torch", "tensorflow", "jax", "cupy"):
    if importlib.util.find_spec(m) is None:
        print(f"{m:<10} not installed"); continue
    try:
        if m == "torch":
            import torch; print(f"torch      {torch.__version__}, cuda available: {torch.cuda.is_available()}")
        elif m == "tensorflow":
            import tensorflow as tf; print(f"tensorflow {tf.__version__}, GPUs: {tf.config.list_physical_devices('GPU')}")
        elif m == "jax":
            import jax; print(f"jax        {jax.__version__}, devices: {jax.devices()}")
        else:
            import cupy; print(f"cupy       {cupy.__version__}, devices: {cupy.cuda.runtime.getDeviceCount()}")
    except Exception as err:  # report, let pytest decide
        print(f"{m:<10} import/device query failed: {err}")
PY
python -m pytest -m gpu tests -q -rs "$@"
if [ "${CURVOP_GPU_BENCH:-0}" = "1" ]; then
    # GGN / Fisher / solve against curvlinops on CUDA; prints the table for docs/performance.md
    python benchmarks/gpu_family.py --out "${CURVOP_GPU_BENCH_OUT:-benchmarks/results/gpu_family.json}"
fi
