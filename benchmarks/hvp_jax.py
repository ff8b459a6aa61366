"""Time JAX Hessian-vector products against one gradient: forward, reverse, linearized, vmapped.

    python benchmarks/hvp_jax.py [--quick]

Medians of interleaved repeats (every method once per round, so a slow moment hits all of them),
after a jit warm-up, with ``block_until_ready``. ``ratio_to_grad`` is ms per product divided by
ms per gradient of the same loss. ``run(quick)`` returns the rows for other scripts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _models(quick: bool):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 8)
    batch = 32 if quick else 128

    mlp = {
        "w1": jax.random.normal(ks[0], (64, 128)) / 8, "b1": jnp.zeros(128),
        "w2": jax.random.normal(ks[1], (128, 128)) / 11, "b2": jnp.zeros(128),
        "w3": jax.random.normal(ks[2], (128, 10)) / 11, "b3": jnp.zeros(10),
    }

    def mlp_apply(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    cnn = {
        "c1": jax.random.normal(ks[3], (16, 3, 3, 3)) / 5, "c2": jax.random.normal(ks[4], (32, 16, 3, 3)) / 12,
        "fc": jax.random.normal(ks[5], (32 * 8 * 8, 10)) / 45,
    }

    def pool(y):
        return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4

    def cnn_apply(p, x):
        y = pool(jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME")))
        y = pool(jax.nn.relu(jax.lax.conv_general_dilated(y, p["c2"], (1, 1), "SAME")))
        return y.reshape(y.shape[0], -1) @ p["fc"]

    def xent(logits, y):
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), axis=-1))

    xm = jax.random.normal(ks[6], (batch, 64))
    xc = jax.random.normal(ks[6], (batch, 3, 32, 32))
    y = jax.random.randint(ks[7], (batch,), 0, 10)
    return [("mlp", mlp_apply, mlp, (xm, y), xent), ("cnn", cnn_apply, cnn, (xc, y), xent)]


def run(quick: bool = False) -> list[dict]:
    import jax
    from jax.flatten_util import ravel_pytree

    import curvop

    repeats = 5 if quick else 9
    rows = []
    for name, apply_fn, params, batch, loss_fn in _models(quick):
        n = ravel_pytree(params)[0].shape[0]
        grad = jax.jit(jax.grad(lambda p, b: loss_fn(apply_fn(p, b[0]), b[1])))
        ops = {
            "forward": curvop.hessian((apply_fn, params), loss_fn, batch, hvp="forward", cache=False),
            "reverse": curvop.hessian((apply_fn, params), loss_fn, batch, hvp="reverse", cache=False),
            "linearized": curvop.hessian((apply_fn, params), loss_fn, batch, cache=True),
        }
        v = ops["forward"].random(n, "gaussian", seed=0)
        V = ops["forward"].random((n, 8), "gaussian", seed=1)
        fns = {"grad": lambda: grad(params, batch)}
        for mode, H in ops.items():
            fns[mode] = lambda H=H: H @ v
        for mode in ("forward", "linearized"):
            def batched(H=ops[mode]):
                H.backend.batched = True
                return H.matmat(V)

            def looped(H=ops[mode]):
                H.backend.batched = False
                return H.matmat(V)

            fns[f"{mode} vmap x8"] = batched
            fns[f"{mode} loop x8"] = looped
        for f in fns.values():  # warm-up: compile
            jax.block_until_ready(f())
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f())
                times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * float(np.median(t)) / (8 if "x8" in k else 1) for k, t in times.items()}
        for k, t in ms.items():
            if k == "grad":
                continue
            rows.append({"framework": "jax", "model": f"{name} (n={n})", "mode": k, "ms_per_hvp": round(t, 3),
                         "ratio_to_grad": round(t / ms["grad"], 2)})
        rows.append({"framework": "jax", "model": f"{name} (n={n})", "mode": "gradient", "ms_per_hvp": round(ms["grad"], 3),
                     "ratio_to_grad": 1.0})
    return rows


def main() -> None:
    import jax

    quick = "--quick" in sys.argv
    rows = run(quick)
    print(f"JAX {jax.__version__} on {jax.devices()[0]}, float32, {'quick' if quick else 'full'} run")
    print(f"{'model':<16} {'mode':<18} {'ms/product':>11} {'x gradient':>11}")
    for r in rows:
        print(f"{r['model']:<16} {r['mode']:<18} {r['ms_per_hvp']:>11.3f} {r['ratio_to_grad']:>11.2f}")


if __name__ == "__main__":
    main()
