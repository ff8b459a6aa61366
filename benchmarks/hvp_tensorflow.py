"""Time one Hessian-vector product with the TensorFlow backend, per mode, as a multiple of a gradient.

    python benchmarks/hvp_tensorflow.py [--quick]

``run(quick)`` returns rows ``{"framework", "model", "mode", "ms_per_hvp", "ratio_to_grad"}``
(``benchmarks/hvp.py`` prints them with the other frameworks). Timings are medians over repeats
that interleave the modes, so drift of the machine hits every mode alike. Batched modes report the
time per column of an ``(n, 8)`` block.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

K = 8  # columns of a block for the batched modes


def _models(quick: bool):
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    mlp = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                            keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)], name="mlp")
    size = 16 if quick else 32
    cnn = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10),
    ], name="cnn")
    nb_mlp, nb_cnn = (256, 32) if quick else (256, 128)
    return [
        (f"keras MLP 64-128-128-10, batch {nb_mlp}", mlp,
         (rng.standard_normal((nb_mlp, 64)).astype("float32"), rng.integers(0, 10, nb_mlp))),
        (f"keras CNN 2 conv, {size}x{size}x3, batch {nb_cnn}", cnn,
         (rng.standard_normal((nb_cnn, size, size, 3)).astype("float32"), rng.integers(0, 10, nb_cnn))),
    ]


def _grad_fn(model, loss, batch):
    import tensorflow as tf

    x, y = tf.constant(batch[0]), tf.constant(batch[1])

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=False))
        return tape.gradient(value, model.trainable_weights)

    return grad


def run(quick: bool = False) -> list[dict]:
    import keras
    import tensorflow as tf

    import curvop

    repeats, number = (3, 5) if quick else (7, 10)
    rows = []
    for label, model, batch in _models(quick):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        grad = _grad_fn(model, loss, batch)
        data = (tf.constant(batch[0]), tf.constant(batch[1]))
        fns = {"gradient": (grad, 1)}
        for mode in ("forward", "reverse"):
            for batched in (False, True):
                H = curvop.hessian(model, loss, data, hvp=mode, batched=batched)
                n = H.shape[0]
                if batched:
                    V = H.from_numpy(np.random.default_rng(1).standard_normal((n, K)))
                    fns[f"{mode} batched (per column of {K})"] = (lambda H=H, V=V: H.matmat(V), K)
                else:
                    v = H.from_numpy(np.random.default_rng(1).standard_normal(n))
                    fns[f"{mode}"] = (lambda H=H, v=v: H.matvec(v), 1)
        for fn, _ in fns.values():  # warm up (tracing)
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for name, (fn, per) in fns.items():
                t0 = time.perf_counter()
                for _ in range(number):
                    out = fn()
                _ = out[0].numpy() if isinstance(out, list) else out.numpy()  # synchronise
                times[name].append((time.perf_counter() - t0) / number / per * 1e3)
        g = statistics.median(times["gradient"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"framework": "tensorflow", "model": f"{label}, n={n}", "mode": name,
                         "ms_per_hvp": round(ms, 3), "ratio_to_grad": round(ms / g, 2)})
    return rows


def _table(rows: list[dict]) -> str:
    out = ["| model | mode | ms per product | x gradient |", "| --- | --- | --- | --- |"]
    out += [f"| {r['model']} | {r['mode']} | {r['ms_per_hvp']:.3f} | {r['ratio_to_grad']:.2f} |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    print(_table(run(quick="--quick" in sys.argv)))
