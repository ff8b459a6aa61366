"""Model zoo (issue 11, item 7): Flax linen and NNX models with the defaults, float64.

The reference product is ``jax.jvp(jax.grad(loss))`` written here, without curvop.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # global flag: float64 needs it (see docs/jax.md)
linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvop  # noqa: E402
from _zoo import check_operator  # noqa: E402

pytestmark = pytest.mark.zoo
F64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def jvp_grad_reference(loss, params):
    """``v -> H v`` for ``loss(params)``, by forward-over-reverse on the flattened parameters."""
    flat, unravel = ravel_pytree(params)
    g = jax.grad(lambda f: loss(unravel(f)))
    return lambda v: np.asarray(jax.jvp(g, (flat,), (jnp.asarray(v),))[1])


@pytest.fixture(scope="module")
def images():
    key = jax.random.PRNGKey(0)
    return jax.random.normal(key, (3, 8, 8, 2)), jnp.array([0, 2, 1])


class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.Conv(4, (3, 3), **F64)(x)
        x = linen.BatchNorm(use_running_average=True, **F64)(x)
        x = linen.avg_pool(jnp.tanh(x), (2, 2), strides=(2, 2))
        x = linen.Dropout(0.2, deterministic=True)(x)
        return linen.Dense(3, **F64)(x.reshape(x.shape[0], -1))


def test_issue11_item7_flax_linen(images):
    x, y = images
    model = LinenCNN()
    variables = model.init(jax.random.PRNGKey(1), x)
    # batch statistics away from 0 and 1, and in float64: Flax makes them float32 whatever
    # param_dtype says, and float32 statistics cost 8 digits (6e-8 against the reference)
    stats = jax.tree_util.tree_map(lambda s: s.astype(jnp.float64) + 0.3, variables["batch_stats"])

    def apply(params, inputs):  # differentiate the parameters, hold the batch statistics fixed
        return model.apply({"params": params, "batch_stats": stats}, inputs)

    H = curvop.hessian((apply, variables["params"]), cross_entropy, (x, y))
    check_operator(H, jvp_grad_reference(lambda p: cross_entropy(apply(p, x), y), variables["params"]))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs, **F64)
        self.bn = nnx.BatchNorm(4, rngs=rngs, **F64)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs, **F64)

    def __call__(self, x):
        x = nnx.avg_pool(jnp.tanh(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
        return self.head(self.drop(x).reshape(x.shape[0], -1))


def test_issue11_item7_flax_nnx(images):
    x, y = images
    model = NnxCNN(nnx.Rngs(0))
    model.bn.mean = nnx.BatchStat(jnp.full(4, 0.2))  # float64 running statistics, not 0 and 1
    model.bn.var = nnx.BatchStat(jnp.full(4, 1.5))
    model.eval()
    H = curvop.hessian(model, cross_entropy, (x, y))  # the module itself
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    check_operator(H, jvp_grad_reference(lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(x), y), params))
