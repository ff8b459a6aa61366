"""Data-parallel JAX products on 2 host devices (run by tests/backends/torch/test_torch_distributed.py in a subprocess,
because XLA_FLAGS=--xla_force_host_platform_device_count=2 must be set before jax is imported)."""

import json
import os
import sys

assert "device_count=2" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.jax import jax_data_parallel  # noqa: E402

assert len(jax.devices()) == 2, jax.devices()
rng = np.random.default_rng(0)
params = {"w1": jnp.asarray(rng.standard_normal((4, 6)) * 0.5), "b1": jnp.zeros(6),
          "w2": jnp.asarray(rng.standard_normal((6, 3)) * 0.5)}
batches = [(jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.integers(0, 3, 8))) for _ in range(3)]


def loss(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


single = curvop.hessian_of(loss, params, batches, backend="jax")
sp, sd = jax_data_parallel(params, batches)
assert len(sd[0][0].sharding.device_set) == 2
res = {"diffs": {}}
n = single.shape[0]
v, V = rng.standard_normal(n), rng.standard_normal((n, 3))
for name, kw in {"uncached": {}, "cached": {"cache": True}, "reverse": {"hvp": "reverse"},
                 "batched": {"batched": True}}.items():
    H = curvop.hessian_of(loss, sp, sd, backend="jax", **kw)
    res["diffs"][name] = max(float(np.abs(H @ v - single @ v).max()), float(np.abs(H @ V - single @ V).max()))
    y = H @ H.from_numpy(v)  # native in, native out, on both devices
    res["native_devices"] = len(y.devices())
H = curvop.hessian_of(loss, sp, sd, backend="jax")
for tag, op in (("sharded", H), ("single", single)):
    e = curvop.eigenvalues(op, 3, seed=0)
    t = curvop.trace(op, method="hutch++", num_matvecs=24, seed=0)
    d = curvop.spectral_density(op, num_steps=12, num_probes=2, seed=0)
    res[tag] = {"eig": e.eigenvalues.tolist(), "trace": t.estimate, "nodes": np.concatenate(d.nodes).tolist()}
json.dump(res, open(sys.argv[1], "w"))
