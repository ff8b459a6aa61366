"""The JAX model adapter (issue 26): the build-time modes are the operator's, batches are pytrees of
arrays, and batches JAX cannot take (torch tensors, strings) get a message with the fix.

References are dense float64 Hessians from ``jax.hessian`` of the model written out here.
"""

from collections import namedtuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvop  # noqa: E402

Pair = namedtuple("Pair", "x y")


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def _data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)), rng.standard_normal((n, 3))


def test_issue26_item3_nnx_train_after_build_keeps_the_eval_hessian():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
            self.l1, self.drop = nnx.Linear(4, 5, rngs=rngs, **f64), nnx.Dropout(0.5, rngs=rngs)
            self.l2 = nnx.Linear(5, 3, rngs=rngs, **f64)

        def __call__(self, x):
            return self.l2(self.drop(jnp.tanh(self.l1(x))))

    model = Net(nnx.Rngs(0))
    model.eval()
    x, y = _data()
    H = curvop.hessian(model, mse, (x, y), cache=False)
    flat, unravel = ravel_pytree(nnx.state(model, nnx.Param))

    def loss(theta):  # the eval-mode network written out: dropout is the identity
        p = unravel(theta)
        h = jnp.tanh(x @ p["l1"]["kernel"][...] + p["l1"]["bias"][...])
        return mse(h @ p["l2"]["kernel"][...] + p["l2"]["bias"][...], y)

    ref = np.asarray(jax.hessian(loss)(flat))
    model.train()  # after the build: the operator keeps the build's flags
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    np.testing.assert_allclose(H @ v, ref @ v, rtol=1e-12, atol=1e-13)
    assert model.drop.deterministic is False  # the user's module is the user's


def test_issue26_item4_namedtuple_batches_over_a_loader():
    params = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)))}
    apply = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    (x1, y1), (x2, y2) = _data(6, 0), _data(2, 1)
    H = curvop.hessian((apply, params), mse, [Pair(x1, y1), Pair(x2, y2)])
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    flat, unravel = ravel_pytree(params)
    ref = np.asarray(jax.hessian(lambda t: mse(apply(unravel(t), x), y))(flat))
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-12, atol=1e-13)


def test_issue26_section4_torch_dataloader_batches_name_the_fix():
    torch = pytest.importorskip("torch")
    params = {"w": jnp.zeros((4, 3))}
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y)),
                                         batch_size=3)
    with pytest.raises(TypeError, match=r"torch tensors \(Tensor\).*collate_fn=.*np.asarray"):
        curvop.hessian((lambda p, x: x @ p["w"], params), mse, loader)


def test_issue26_section4_string_leaf_names_the_fix():
    params = {"w": jnp.zeros((4, 3))}
    x, y = _data()
    with pytest.raises(TypeError, match="holds a string .*close over it"):
        curvop.hessian((lambda p, inputs: inputs["x"] @ p["w"], params), mse, ({"x": x, "tag": "a"}, y))
