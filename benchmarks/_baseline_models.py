"""The models of ``benchmarks/baselines.py``: one architecture, written in each framework.

* ``mlp``: 784-256-256-10 with ReLU, batch 128;
* ``cnn``: three 3x3 convolutions (16, 32, 64 channels, ReLU, 2x2 max pooling after the first two),
  a global average and a dense layer, on 32x32x3 images (NHWC), batch 64;
* ``transformer``: one pre-norm block of width 128 (``LayerNorm``, 4-head attention, ``LayerNorm``,
  a 256-wide GELU feed-forward, residuals), mean over the sequence and a dense layer; sequence 64,
  batch 16;
* ``lstm``, ``gru`` (Keras only): a 64-unit recurrent layer over 32 steps of 16 features, then a
  dense layer; batch 64.

Every model ends in 10 logits and the mean softmax cross-entropy against integer labels. ``quick``
shrinks each one to a few thousand parameters. Each function returns ``{name: (model, loss, batch)}``
in the framework's own terms (JAX: ``((apply_fn, params), loss_fn, (x, y))``).
"""

from __future__ import annotations

import numpy as np

SHARED = ("mlp", "cnn", "transformer")  # in every framework
RECURRENT = ("lstm", "gru")  # Keras only


def sizes(quick: bool) -> dict[str, dict]:
    if quick:
        return {"mlp": dict(widths=(32, 16, 16, 10), batch=8), "cnn": dict(image=8, channels=(4, 4, 8), batch=4),
                "transformer": dict(width=16, heads=2, seq=8, batch=2, hidden=32),
                "rnn": dict(units=8, steps=6, features=4, batch=4)}
    return {"mlp": dict(widths=(784, 256, 256, 10), batch=128), "cnn": dict(image=32, channels=(16, 32, 64), batch=64),
            "transformer": dict(width=128, heads=4, seq=64, batch=16, hidden=256),
            "rnn": dict(units=64, steps=32, features=16, batch=64)}


def _data(name: str, s: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "mlp":
        shape = (s["batch"], s["widths"][0])
    elif name == "cnn":
        shape = (s["batch"], s["image"], s["image"], 3)
    elif name == "transformer":
        shape = (s["batch"], s["seq"], s["width"])
    else:
        shape = (s["batch"], s["steps"], s["features"])
    return rng.standard_normal(shape).astype("float32"), rng.integers(0, 10, s["batch"]).astype("int32")


# --- JAX (plain functions of a parameter dict) ---------------------------------------------------
def jax_problems(quick: bool, names=SHARED) -> dict:
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))

    def dense(i, o):
        return {"w": jax.random.normal(next(keys), (i, o)) / np.sqrt(i), "b": jnp.zeros(o)}

    def xent(logits, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def layer_norm(p, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-3) * p["g"] + p["b"]

    s = sizes(quick)
    out = {}
    if "mlp" in names:
        w = s["mlp"]["widths"]
        params = [dense(a, b) for a, b in zip(w[:-1], w[1:])]

        def mlp(p, x):
            for layer in p[:-1]:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
            return x @ p[-1]["w"] + p[-1]["b"]

        out["mlp"] = ((mlp, params), xent, _data("mlp", s["mlp"]))
    if "cnn" in names:
        ch = (3,) + s["cnn"]["channels"]
        params = {"convs": [{"w": jax.random.normal(next(keys), (3, 3, a, b)) / np.sqrt(9 * a), "b": jnp.zeros(b)}
                            for a, b in zip(ch[:-1], ch[1:])], "head": dense(ch[-1], 10)}

        def cnn(p, x):
            for i, c in enumerate(p["convs"]):
                x = jax.lax.conv_general_dilated(x, c["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = jax.nn.relu(x + c["b"])
                if i < 2:
                    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            return x.mean((1, 2)) @ p["head"]["w"] + p["head"]["b"]

        out["cnn"] = ((cnn, params), xent, _data("cnn", s["cnn"]))
    if "transformer" in names:
        t = s["transformer"]
        d, h = t["width"], t["heads"]
        norm = lambda: {"g": jnp.ones(d), "b": jnp.zeros(d)}  # noqa: E731
        params = {"ln1": norm(), "q": dense(d, d), "k": dense(d, d), "v": dense(d, d), "o": dense(d, d),
                  "ln2": norm(), "ff1": dense(d, t["hidden"]), "ff2": dense(t["hidden"], d), "head": dense(d, 10)}

        def block(p, x):
            b, n = x.shape[:2]
            z = layer_norm(p["ln1"], x)
            q, k, v = ((z @ p[c]["w"] + p[c]["b"]).reshape(b, n, h, d // h) for c in "qkv")
            a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h), axis=-1)
            x = x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, d) @ p["o"]["w"] + p["o"]["b"]
            z = jax.nn.gelu(layer_norm(p["ln2"], x) @ p["ff1"]["w"] + p["ff1"]["b"], approximate=False)
            x = x + z @ p["ff2"]["w"] + p["ff2"]["b"]
            return x.mean(1) @ p["head"]["w"] + p["head"]["b"]

        out["transformer"] = ((block, params), xent, _data("transformer", t))
    return {k: (m, lf, (jnp.asarray(x), jnp.asarray(y))) for k, (m, lf, (x, y)) in out.items()}


# --- Keras 3 on TensorFlow -------------------------------------------------------------------------
def keras_problems(quick: bool, names=SHARED + RECURRENT) -> dict:
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    s = sizes(quick)
    out = {}
    for name in names:
        if name == "mlp":
            w = s["mlp"]["widths"]
            model = keras.Sequential([keras.Input((w[0],))] + [layers.Dense(u, activation="relu") for u in w[1:-1]]
                                     + [layers.Dense(w[-1])])
            data = _data("mlp", s["mlp"])
        elif name == "cnn":
            c, ch = s["cnn"], s["cnn"]["channels"]
            model = keras.Sequential([
                keras.Input((c["image"], c["image"], 3)),
                layers.Conv2D(ch[0], 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(ch[1], 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(ch[2], 3, padding="same", activation="relu"), layers.GlobalAveragePooling2D(),
                layers.Dense(10)])
            data = _data("cnn", c)
        elif name == "transformer":
            t = s["transformer"]
            x = inp = keras.Input((t["seq"], t["width"]))
            z = layers.LayerNormalization(epsilon=1e-3)(x)
            x = x + layers.MultiHeadAttention(t["heads"], t["width"] // t["heads"])(z, z)
            z = layers.LayerNormalization(epsilon=1e-3)(x)
            x = x + layers.Dense(t["width"])(layers.Dense(t["hidden"], activation="gelu")(z))
            model = keras.Model(inp, layers.Dense(10)(layers.GlobalAveragePooling1D()(x)))
            data = _data("transformer", t)
        else:
            r = s["rnn"]
            cell = {"lstm": layers.LSTM, "gru": layers.GRU}[name]
            model = keras.Sequential([keras.Input((r["steps"], r["features"])), cell(r["units"]), layers.Dense(10)])
            data = _data(name, r)
        out[name] = (model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), data)
    return out


# --- torch -----------------------------------------------------------------------------------------
def torch_problems(quick: bool, names=SHARED) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    s = sizes(quick)

    class Block(nn.Module):
        def __init__(self, d, heads, hidden):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-3), nn.LayerNorm(d, eps=1e-3)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.ff = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            z = self.ln1(x)
            x = x + self.attn(z, z, z, need_weights=False)[0]
            x = x + self.ff(self.ln2(x))
            return self.head(x.mean(1))

    out = {}
    for name in names:
        if name == "mlp":
            w = s["mlp"]["widths"]
            mods: list = []
            for a, b in zip(w[:-1], w[1:]):
                mods += [nn.Linear(a, b), nn.ReLU()]
            model = nn.Sequential(*mods[:-1])
            x, y = _data("mlp", s["mlp"])
        elif name == "cnn":
            c, ch = s["cnn"], s["cnn"]["channels"]
            model = nn.Sequential(
                nn.Conv2d(3, ch[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(ch[0], ch[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(ch[1], ch[2], 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(ch[2], 10))
            x, y = _data("cnn", c)
            x = x.transpose(0, 3, 1, 2).copy()  # NCHW
        else:
            t = s["transformer"]
            model = Block(t["width"], t["heads"], t["hidden"])
            x, y = _data("transformer", t)
        out[name] = (model.eval(), nn.CrossEntropyLoss(), (torch.from_numpy(x), torch.from_numpy(y).long()))
    return out
