"""One pass per block (issue 26 section 3): ``H @ V`` over a loader, one pass against one per column.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/block_passes.py [--rounds 5] [--k 8] [--batches 8]

Each model's data (256 samples) is a loader of ``--batches`` batches; ``H`` is built with
``batched=False`` (the CPU default of torch) and ``cache=False`` (what a loader gets by default).
Two contenders on the same operator, alternated within each round: "per column", ``k`` products
``H @ V[:, j]`` stacked (what ``H @ V`` did before: one pass over the data per column), and
"block", ``H @ V`` (one pass, every column computed on each batch). Prints the median seconds of
each and their ratio, and checks that both give the same numbers bit for bit. Models: the 55k
tanh MLP and the 28k CNN without BatchNorm of ``_torch_models`` (torch reverse and forward mode),
and a float64 tanh MLP on JAX and TensorFlow (each in their default mode). Speed only: no timed
assertion goes in the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _loader(x, y, batches):
    m = len(x) // batches
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(batches)]


def torch_cases(batches: int):
    import torch

    import _torch_models as M
    import curvop

    torch.set_num_threads(1)
    for name, (model, loss, _) in (("mlp 55k", M.mlp_problem()), ("cnn 28k", M.cnn_problem(16, batchnorm=False))):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, *( (784,) if name.startswith("mlp") else (3, 32, 32)), generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
        for mode in ("reverse", "forward"):
            H = curvop.hessian(model, loss, _loader(x, y, batches), hvp=mode, cache=False, batched=False)
            yield f"torch {name} {mode}", H


def jax_cases(batches: int):
    import jax
    import jax.numpy as jnp

    import curvop

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((64, 64)) / 8), "w2": jnp.asarray(rng.standard_normal((64, 10)) / 8)}
    x, y = rng.standard_normal((256, 64)), rng.standard_normal((256, 10))
    H = curvop.hessian((lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"], params), lambda o, t: jnp.mean((o - t) ** 2),
                       _loader(x, y, batches), cache=False, batched=False)
    yield "jax mlp 4.7k", H


def tensorflow_cases(batches: int):
    import keras
    import curvop

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,), dtype="float64"), keras.layers.Dense(64, activation="tanh", dtype="float64"),
                              keras.layers.Dense(10, dtype="float64")])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 64)), rng.standard_normal((256, 10))
    H = curvop.hessian(model, keras.losses.MeanSquaredError(dtype="float64"), _loader(x, y, batches), cache=False,
                       batched=False)
    yield "tensorflow mlp 4.8k", H


def measure(H, V, rounds: int) -> tuple[float, float, bool]:
    from curvop.arrays import stack, to_numpy

    contenders = {"per column": lambda: stack([H @ V[:, j] for j in range(V.shape[1])], axis=1), "block": lambda: H @ V}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    out = {}
    for r in range(rounds):
        for name in (contenders if r % 2 == 0 else reversed(list(contenders))):
            t = time.perf_counter()
            out[name] = contenders[name]()
            times[name].append(time.perf_counter() - t)
    same = np.array_equal(to_numpy(out["per column"]), to_numpy(out["block"]))
    return statistics.median(times["per column"]), statistics.median(times["block"]), same


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--frameworks", nargs="+", default=["torch", "jax", "tensorflow"])
    a = ap.parse_args(argv)
    print(f"| operator ({a.batches} batches of {256 // a.batches}) | per column (s) | block (s) | ratio | bit-equal |")
    print("|---|---|---|---|---|")
    cases = {"torch": torch_cases, "jax": jax_cases, "tensorflow": tensorflow_cases}
    for fw in a.frameworks:
        for name, H in cases[fw](a.batches):
            V = H.backend.from_numpy(np.random.default_rng(0).standard_normal((H.shape[0], a.k)).astype(H.dtype))
            H @ V  # warm up (compilation, first-call costs)
            cols, block, same = measure(H, V, a.rounds)
            print(f"| {name} | {cols:.3f} | {block:.3f} | {cols / block:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    main()
