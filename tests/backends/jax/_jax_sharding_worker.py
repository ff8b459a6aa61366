"""Model-sharded and data-parallel JAX on N host devices (run by tests/backends/jax/test_jax_sharding.py
in a subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is
imported, and float64 is switched on here only, never in the test process).

    python tests/backends/jax/_jax_sharding_worker.py N out.json            # the checks, results as JSON
    python tests/backends/jax/_jax_sharding_worker.py N out.json measure    # timings and bytes per device
"""

import contextlib
import functools
import json
import os
import sys
import time
import warnings

N, OUT, MODE = int(sys.argv[1]), sys.argv[2], (sys.argv[3:] or ["check"])[0]
assert f"device_count={N}" in os.environ.get("XLA_FLAGS", ""), os.environ.get("XLA_FLAGS")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.jax import jax_data_parallel  # noqa: E402
from curvop.backends.jax import sharding as _jax_sharding  # noqa: E402

assert len(jax.devices()) == N, jax.devices()
DEV = jax.devices()
MESH = Mesh(np.array(DEV), ("model",))
ROWS, COLS, REP = (NamedSharding(MESH, s) for s in (P("model", None), P(None, "model"), P()))


def make(rng, width=12, classes=4, extra=0, d_in=8):
    """An MLP: w1 sharded on its rows, w2 on its columns, biases (and ``extra``) replicated."""
    p = {"w1": jax.device_put(rng.standard_normal((d_in, width)) * 0.4, ROWS),
         "b1": jax.device_put(rng.standard_normal(width) * 0.1, REP),
         "w2": jax.device_put(rng.standard_normal((width, classes)) * 0.4, COLS),
         "b2": jax.device_put(np.zeros(classes), REP)}
    if extra:
        p["t"] = jax.device_put(rng.standard_normal(extra) * 0.5, REP)
    return p


def loss(p, batch):
    x, y = batch
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    out = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])
    return out + (jnp.sum(jnp.cos(p["t"]) * jnp.sum(p["b1"] ** 2)) if "t" in p else 0.0)


def _guarded(product, *guards):
    """'ok' if ``product()`` runs with the given transfer guards set to disallow, else the error."""
    try:
        with contextlib.ExitStack() as stack:
            for g in guards:
                stack.enter_context(g("disallow"))
            product().block_until_ready()
        return "ok"
    except Exception as err:  # noqa: BLE001 - reported to the test
        return f"{type(err).__name__}: {err}"[:300]


def dense_hessian(p, batches):
    """The independent reference: jax.hessian of the mean loss over the (equal) batches as a function
    of the flat parameter vector, on one device."""
    flat0, unravel = ravel_pytree(one_device(p))
    return np.asarray(sum(jax.hessian(lambda f: loss(unravel(f), b))(flat0) for b in batches) / len(batches))


def one_device(p):
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), DEV[0]), p)


def spec(x):
    return list(x.sharding.spec) if hasattr(x.sharding, "spec") else type(x.sharding).__name__


def shards(x):
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def algorithms(op):
    e = curvop.eigenvalues(op, 3, seed=0)
    t = curvop.trace(op, method="hutch++", num_matvecs=24, seed=0)
    d = curvop.spectral_density(op, num_steps=12, num_probes=2, seed=0)
    g = curvop.diagonal(op, num_matvecs=20, seed=0)
    return {"eig": e.eigenvalues.tolist(), "trace": t.estimate, "nodes": np.concatenate(d.nodes).tolist(),
            "weights": np.concatenate(d.weights).tolist(), "diag": np.asarray(g.estimate).tolist()}


def _tick(what, t=[time.process_time()]):  # noqa: B006 - CPU seconds per section, to stderr
    now = time.process_time()
    print(f"{what}: {now - t[0]:.1f} s CPU", file=sys.stderr)
    t[0] = now


def ggn_check(params, batches, placed, V):
    """Issue 22: the GGN of the sharded model against a dense one-device ``Jᵀ (∂²L/∂f²) J``."""
    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def ce(f, y):
        return -jnp.mean(jax.nn.log_softmax(f)[jnp.arange(y.shape[0]), y])

    flat0, unravel = ravel_pytree(one_device(params))
    n, dense = flat0.shape[0], 0
    for x, y in batches:  # equal batches: their mean
        J = jax.jacrev(lambda f: apply(unravel(f), x))(flat0).reshape(-1, n)
        f = apply(unravel(flat0), x)
        dense = dense + J.T @ jax.hessian(lambda o: ce(o, y))(f).reshape(f.size, f.size) @ J / len(batches)
    G = curvop.ggn((apply, params), ce, placed)
    Y = G @ G.from_numpy(V)
    return {"diff": float(np.abs(np.asarray(Y) - np.asarray(dense) @ V).max()), "spec": spec(Y),
            "devices": len(Y.devices())}


class _Passes:
    """A re-iterable loader that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        yield from self.batches


def block_passes(params, placed, V):
    """Passes over the data of one block product ``H @ V`` of a sharded model, batched (vmap, the
    default) and column by column (``batched=False``: one pass per column on a sharded model)."""
    out = {}
    for name, kw in {"batched": {}, "loop": {"batched": False}}.items():
        loader = _Passes(placed)
        H = curvop.hessian_of(loss, params, loader, backend="jax", **kw)
        loader.passes = 0
        H @ V
        out[name] = loader.passes
    return out


def check():
    rng = np.random.default_rng(0)
    params = make(rng)
    batches = [(jnp.asarray(rng.standard_normal((8, 8))), jnp.asarray(rng.integers(0, 4, 8))) for _ in range(2)]
    placed = [jax.device_put(b, REP) for b in batches]  # the data on the mesh once (else copied per product)
    dense = dense_hessian(params, batches)
    n = dense.shape[0]
    res = {"n": n, "diffs": {}, "guard_all": {}}
    v, V = rng.standard_normal(n), rng.standard_normal((n, 3))
    with warnings.catch_warnings(record=True) as seen:  # n = 160 splits evenly: no ShardingWarning
        warnings.simplefilter("always")
        for name, kw in {"uncached": {}, "cached": {"cache": True}, "reverse": {"hvp": "reverse"},
                         "loop": {"batched": False}}.items():
            H = curvop.hessian_of(loss, params, placed, backend="jax", **kw)
            res["diffs"][name] = max(float(np.abs(H @ v - dense @ v).max()), float(np.abs(H @ V - dense @ V).max()))
            y, Y = H @ H.from_numpy(v), H @ H.from_numpy(V)
            res.setdefault("native", {})[name] = {"y_spec": spec(y), "y_devices": len(y.devices()),
                                                 "y_shards": shards(y), "Y_spec": spec(Y), "Y_shards": shards(Y),
                                                 "err": float(np.abs(np.asarray(y) - dense @ v).max())}
            # a native product moves nothing to the host nor between devices beyond what XLA does inside
            # the jitted product (the scalar batch weights of a multi-batch sum go host-to-device)
            res.setdefault("guard", {})[name] = _guarded(lambda: H @ y, jax.transfer_guard_device_to_host,
                                                         jax.transfer_guard_device_to_device)
        # one batch on the mesh: nothing at all crosses the host/device boundary outside the jitted product
        for name, kw in {"uncached": {}, "cached": {"cache": True}}.items():
            H1 = curvop.hessian_of(loss, params, placed[0], backend="jax", **kw)
            res["guard_all"][name] = _guarded(lambda: H1 @ y, jax.transfer_guard)
    res["even_warnings"] = [f"{w.category.__name__}: {w.message}" for w in seen]
    res["block_passes"] = block_passes(params, placed, V)
    _tick("products")
    res["ggn"] = ggn_check(params, batches, placed, V)
    res["dense_err"] = float(np.abs(H.to_dense() - dense).max())
    res["describe"] = repr(H)
    res["leaf_specs"] = {k: spec(x) for k, x in params.items()}
    single = curvop.hessian_of(loss, one_device(params), batches, backend="jax")
    res["sharded"], res["single"] = algorithms(H), algorithms(single)
    _tick("algorithms")
    res["exact_eig"] = np.sort(np.linalg.eigvalsh(dense))[::-1][:3].tolist()

    # n not divisible by the device count: extra leaves of 3 (gcd 1) and 2 (gcd 2) entries
    for extra in (3, 2):
        p = make(np.random.default_rng(1), extra=extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            H = curvop.hessian_of(loss, p, batches, backend="jax")
        ref = dense_hessian(p, batches)
        m = H.shape[0]
        u = np.random.default_rng(2).standard_normal((m, 2))
        y = H @ H.from_numpy(u)
        res[f"uneven{extra}"] = {
            "n": m, "groups": H.backend._layout.groups, "y_shards": shards(y), "y_spec": spec(y),
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
            "diff": float(np.abs(np.asarray(y) - ref @ u).max())}
        if extra == 2:  # gcd(n, 4) = 2: vectors split over 2 groups of 2 devices
            res["uneven2"]["eig"] = [curvop.eigenvalues(H, 3, seed=0).eigenvalues.tolist(),
                                     np.linalg.eigvalsh(ref)[::-1][:3].tolist()]

    if N >= 4:  # a 2-D mesh: the batch split over "data", the weights over "model"
        mesh2 = Mesh(np.array(DEV[:4]).reshape(2, 2), ("data", "model"))
        p2 = {k: jax.device_put(np.asarray(x), NamedSharding(mesh2, x.sharding.spec)) for k, x in params.items()}
        d2 = [jax.device_put(b, NamedSharding(mesh2, P("data"))) for b in batches]
        H2 = curvop.hessian_of(loss, p2, d2, backend="jax")
        y2 = H2 @ H2.from_numpy(V)
        res["mesh2d"] = {"diff": float(np.abs(np.asarray(y2) - dense @ V).max()), "y_shards": shards(y2),
                         "eig": curvop.eigenvalues(H2, 3, seed=0).eigenvalues.tolist()}
    _tick("uneven")
    # data parallel (jax_data_parallel): parameters replicated, every batch split over all devices
    sp, sd = jax_data_parallel(one_device(params), batches)
    dp = {"diffs": {}, "batch_devices": len(sd[0][0].sharding.device_set)}
    for name, kw in {"cached": {"cache": True}, "reverse": {"hvp": "reverse"}, "uncached": {}}.items():
        Hd = curvop.hessian_of(loss, sp, sd, backend="jax", **kw)
        dp["diffs"][name] = max(float(np.abs(Hd @ v - dense @ v).max()), float(np.abs(Hd @ V - dense @ V).max()))
        y = Hd @ Hd.from_numpy(v)  # native in, native out, on every device
        dp.setdefault("native_devices", {})[name] = len(y.devices())
        dp.setdefault("native_err", {})[name] = float(np.abs(np.asarray(y) - dense @ v).max())
    dp["algorithms"] = algorithms(Hd)  # the default mode, built last
    res["data_parallel"] = dp
    _tick("data parallel")
    # leaves on different device sets, and data committed elsewhere: curvop errors
    errors = {}
    cases = {"two_single_devices": lambda: {"w": jax.device_put(jnp.ones((2, 2)), DEV[0]),
                                            "b": jax.device_put(jnp.ones(2), DEV[1])}}
    if N >= 4:
        m1, m2 = Mesh(np.array(DEV[:2]), ("a",)), Mesh(np.array(DEV[2:4]), ("a",))
        cases["two_meshes"] = lambda: {"w": jax.device_put(jnp.ones((4, 2)), NamedSharding(m1, P("a"))),
                                       "b": jax.device_put(jnp.ones(2), NamedSharding(m2, P()))}
    for name, make_params in cases.items():
        try:
            curvop.hessian_of(lambda q: jnp.sum(q["w"] ** 3) + jnp.sum(q["b"] ** 4), make_params(), backend="jax")
            errors[name] = "no error"
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors[name] = f"{type(err).__module__}.{type(err).__name__}: {err}"
    try:
        committed = [(jax.device_put(x, DEV[0]), y) for x, y in batches]
        curvop.hessian_of(loss, params, committed, backend="jax")
        errors["data_elsewhere"] = "no error"
    except Exception as err:  # noqa: BLE001
        errors["data_elsewhere"] = f"{type(err).__module__}.{type(err).__name__}: {err}"
    try:  # unsharded parameters on one device, data committed to another: the same check
        curvop.hessian_of(loss, one_device(params), [(jax.device_put(x, DEV[1]), y) for x, y in batches],
                          backend="jax")
        errors["data_elsewhere_one_device"] = "no error"
    except Exception as err:  # noqa: BLE001
        errors["data_elsewhere_one_device"] = f"{type(err).__module__}.{type(err).__name__}: {err}"
    # uncommitted leaves (numpy converted by jnp.asarray) next to sharded ones are replicated on the mesh
    mixed = dict(params, b2=np.zeros(4))
    Hm = curvop.hessian_of(loss, mixed, batches, backend="jax")
    errors["mixed_uncommitted_diff"] = float(np.abs(Hm @ v - dense @ v).max())
    # one device: a leaf committed to device 1 and a numpy leaf; the numpy one follows it there
    on1 = dict(jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), DEV[1]), params), b2=np.zeros(4))
    H1 = curvop.hessian_of(loss, on1, [jax.device_put(b, DEV[1]) for b in batches], backend="jax")
    errors["mixed_one_device_diff"] = float(np.abs(H1 @ v - dense @ v).max())
    errors["mixed_one_device_where"] = str(H1.backend.device)
    res["errors"] = errors
    _tick("errors")
    return res


def measure(rounds=5, reps=10):
    """Seconds per native product (best of ``rounds`` interleaved rounds of ``reps``) and bytes per
    device of a vector: the flat vector split over the devices (curvop's layout), the same but
    replicated (what ravel_pytree gives), the unsharded model on one device."""
    rng = np.random.default_rng(0)
    params = make(rng, width=1024, classes=256, d_in=512)
    batch = (jnp.asarray(rng.standard_normal((64, 512))), jnp.asarray(rng.integers(0, 256, 64)))
    ops, real = {}, _jax_sharding.ShardedLayout
    for name, groups in {"split": None, "replicated": 1}.items():
        _jax_sharding.ShardedLayout = functools.partial(real, groups=groups)  # force the flat layout
        try:
            ops[name] = curvop.hessian_of(loss, params, jax.device_put(batch, REP), backend="jax", cache=False)
        finally:
            _jax_sharding.ShardedLayout = real
    ops["one_device"] = curvop.hessian_of(loss, one_device(params), jax.device_put(batch, DEV[0]), backend="jax",
                                          cache=False)
    xs = {k: H.random(H.shape[0], "gaussian", seed=0) for k, H in ops.items()}
    best = {k: float("inf") for k in ops}
    for _ in range(rounds):
        for k, H in ops.items():
            y = H @ xs[k]
            y.block_until_ready()
            t = time.perf_counter()
            for _ in range(reps):
                y = H @ xs[k]
            y.block_until_ready()
            best[k] = min(best[k], (time.perf_counter() - t) / reps)
    ys = {k: H @ xs[k] for k, H in ops.items()}
    return {k: {"n": H.shape[0], "s_per_product": best[k], "devices": len(ys[k].devices()),
                "bytes_per_device": max(s.data.nbytes for s in ys[k].addressable_shards)}
            for k, H in ops.items()}


json.dump(check() if MODE == "check" else measure(), open(OUT, "w"), indent=1)
