"""Resident memory over 2,000 consecutive Hessian-vector products, per backend.

    PYTHONPATH=. python benchmarks/memory.py [--products 2000]

For torch, TensorFlow and JAX: build an operator on a small MLP over 4 batches (uncached) and on
one batch (cached), run 50 warm-up products, record the RSS (psutil), run the products, record it
again. Growth under 5 % after warm-up means nothing accumulates between products (no autograd
graph, tape or jit cache grows). A backend that is not installed prints "not available".
"""

from __future__ import annotations

import argparse
import gc
import os

import numpy as np
import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import curvop  # noqa: E402

RNG = np.random.default_rng(0)
X = [RNG.standard_normal((32, 16)) for _ in range(4)]
Y = [RNG.integers(0, 4, 32) for _ in range(4)]
W = [RNG.standard_normal((16, 32)) * 0.3, np.zeros(32), RNG.standard_normal((32, 4)) * 0.3]


def torch_ops():
    import torch

    def f(p, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(torch.tanh(x @ p[0] + p[1]) @ p[2], y)

    params = [torch.tensor(w) for w in W]
    data = [(torch.tensor(x), torch.tensor(y)) for x, y in zip(X, Y)]
    return {"uncached, 4 batches": curvop.hessian_of(f, params, data, cache=False),
            "cached, 1 batch": curvop.hessian_of(f, params, data[0], cache=True)}


def jax_ops():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def f(p, batch):
        x, y = batch
        logits = jnp.tanh(x @ p[0] + p[1]) @ p[2]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

    params = [jnp.asarray(w) for w in W]
    data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(X, Y)]
    return {"uncached, 4 batches": curvop.hessian_of(f, params, data, backend="jax", cache=False),
            "cached, 1 batch": curvop.hessian_of(f, params, data[0], backend="jax", cache=True)}


def tf_ops():
    import tensorflow as tf

    def f(p, batch):
        x, y = batch
        logits = tf.tanh(x @ p[0] + p[1]) @ p[2]
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

    params = [tf.Variable(w) for w in W]
    data = [(tf.constant(x), tf.constant(y)) for x, y in zip(X, Y)]
    return {"4 batches": curvop.hessian_of(f, params, data, backend="tensorflow"),
            "1 batch": curvop.hessian_of(f, params, data[0], backend="tensorflow")}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def run(H, products: int) -> tuple[float, float]:
    v = H.from_numpy(RNG.standard_normal(H.shape[0]))
    for _ in range(50):
        y = H @ v
    start = rss_mb()
    for _ in range(products):
        y = H @ v  # noqa: F841
    return start, rss_mb()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'backend':<11} {'operator':<20} {'products':>8} {'RSS start MB':>13} {'RSS end MB':>11} {'growth':>8}")
    worst = 0.0
    for name, make in (("torch", torch_ops), ("tensorflow", tf_ops), ("jax", jax_ops)):
        try:
            ops = make()
        except (ImportError, ValueError) as err:  # framework or backend missing
            print(f"{name:<11} not available ({type(err).__name__}: {err})")
            continue
        for label, H in ops.items():
            a, b = run(H, args.products)
            worst = max(worst, (b - a) / a)
            print(f"{name:<11} {label:<20} {args.products:>8} {a:>13.1f} {b:>11.1f} {100 * (b - a) / a:>7.2f}%")
    print(f"largest growth after warm-up: {100 * worst:.2f}% ({'OK' if worst < 0.05 else 'ABOVE 5%'})")


if __name__ == "__main__":
    main()
