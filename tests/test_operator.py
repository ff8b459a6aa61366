"""``HessianOperator`` itself: ``to_dense`` checks its arguments (issue 12 item 11)."""

from __future__ import annotations

import numpy as np
import pytest

import curvop
from _matrices import with_spectrum


pytest.importorskip("torch")


# --- item 11: to_dense(chunk=...) is validated ----------------------------------------------------
def test_issue12_item11_to_dense_rejects_bad_chunk():
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 7)), seed=0)
    H = curvop.aslinearoperator(A)
    for chunk in (-1, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk.*positive integer"):
            H.to_dense(chunk=chunk)
    assert H.num_matvecs == 0
    np.testing.assert_allclose(H.to_dense(chunk=3), A, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(H.to_dense(chunk=np.int64(100)), A, rtol=1e-14, atol=1e-15)


# --- issue 23: HessianOperator.on, the same loss on another batch -----------------------------------
def test_issue23_on_other_data_is_the_hessian_there():
    """``H.on(batch)`` equals a Hessian built on that batch (dense ``torch.func.hessian`` reference),
    over one batch and over a loader of unequal batches, and counts its own products."""
    import torch

    from torch_reference import dense_hessian, tanh_mlp

    model, (x, y) = tanh_mlp(3, 4, 2, 20, seed=1)
    loss_fn = torch.nn.MSELoss()
    H = curvop.hessian(model, loss_fn, (x[:5], y[:5]))
    H.to_dense()
    for data in ((x[5:12], y[5:12]), [(x[:8], y[:8]), (x[8:20], y[8:20])]):
        moved = H.on(data)
        batches = [data] if isinstance(data, tuple) else data
        np.testing.assert_allclose(moved.to_dense(), dense_hessian(model, loss_fn, batches), rtol=1e-10, atol=1e-12)
        assert moved.num_matvecs == H.shape[0]
    with pytest.raises(TypeError, match="follows the live parameters"):
        H.on((x, y), params=list(model.parameters()))
    with pytest.raises(NotImplementedError, match="cannot be moved"):
        curvop.aslinearoperator(np.eye(3)).on(None)


# --- issue 26: copy.deepcopy works for every kind of operator; pickling is a clear curvop error ---------
def _operators():
    import torch

    A = np.diag([1.0, 2.0, 3.0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)).double()
    batch = (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
    yield "numpy", curvop.aslinearoperator(A), np.ones(3)
    yield "from_hvp", curvop.HessianOperator.from_hvp(lambda v: A @ v, np.zeros(3)), np.ones(3)
    yield "from_grad", curvop.HessianOperator.from_grad(lambda x: A @ x, np.zeros(3)), np.ones(3)
    yield "torch", curvop.hessian(model, torch.nn.MSELoss(), batch), torch.ones(11, dtype=torch.float64)
    yield "torch loader", curvop.hessian(model, torch.nn.MSELoss(), [batch, batch]), torch.ones(11, dtype=torch.float64)
    yield "torch hessian_of", curvop.hessian_of(lambda p: (p ** 4).sum(), torch.ones(3, dtype=torch.float64)), \
        torch.ones(3, dtype=torch.float64)
    try:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        yield "jax", curvop.hessian_of(lambda w: jnp.sum(w ** 4), jnp.ones(3)), jnp.ones(3)
    except ImportError:
        pass
    try:
        import tensorflow as tf

        w = tf.Variable(np.ones(3))
        yield "tensorflow", curvop.hessian_of(lambda w: tf.reduce_sum(w ** 4), w), tf.ones(3, tf.float64)
    except ImportError:
        pass


def test_issue26_deepcopy_of_every_operator_kind_multiplies_alike_and_pickle_is_a_clear_error():
    import copy
    import pickle

    for name, H, v in _operators():
        want = curvop.arrays.to_numpy(H @ v)
        for C in (copy.deepcopy(H), copy.copy(H), copy.deepcopy({"H": [H]})["H"][0]):  # failed on a _thread.lock
            assert type(C) is type(H) and C is not H, name
            assert np.array_equal(curvop.arrays.to_numpy(C @ v), want), name
        C = copy.deepcopy(H)
        counted = H.num_matvecs
        C @ v
        assert C.num_matvecs == counted + 1 and H.num_matvecs == counted, name  # counts its own products
        with pytest.raises(TypeError, match=r"HessianOperator .* cannot be pickled.*build it again"):
            pickle.dumps(H)


def test_issue26_a_deep_copy_follows_the_model_like_the_operator():
    import copy

    import torch

    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    H = curvop.hessian(model, lambda out, y: ((out ** 3).mean()), (x, torch.zeros(8, 1, dtype=torch.float64)))
    C = copy.deepcopy(H)
    v = torch.ones(4, dtype=torch.float64)
    with torch.no_grad():
        model.weight.mul_(2.0)  # an optimizer step, in place
    assert torch.equal(C @ v, H @ v)


# --- issue 27: `H @ native` goes straight to the product ------------------------------------------
def test_issue27_matmul_of_a_native_array_skips_scipys_scalar_checks(monkeypatch):
    import scipy.sparse.linalg as sla
    import torch

    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 5)), seed=1)
    H = curvop.aslinearoperator(torch.as_tensor(A))
    t = torch.arange(5.0, dtype=torch.float64)
    calls = []
    for name in ("__matmul__", "dot"):  # scipy's own entry points: they ask np.isscalar first
        real = getattr(sla.LinearOperator, name)
        monkeypatch.setattr(sla.LinearOperator, name, lambda s, x, _r=real, _n=name: calls.append(_n) or _r(s, x))
    for out in (H @ t, H.dot(t), H(t), H * t):
        assert isinstance(out, torch.Tensor)
        np.testing.assert_allclose(out.numpy(), A @ t.numpy(), rtol=1e-14)
    assert calls == []  # a native array never enters scipy's __matmul__ or dot (microseconds per product)
    np.testing.assert_allclose((H @ np.ones(5)), A @ np.ones(5), rtol=1e-14)
    assert calls == ["__matmul__"]  # numpy: scipy's path, as before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Scalar operands"):
        H @ 2.0
    assert isinstance(H @ H, sla.LinearOperator) and isinstance(H * 2.0, sla.LinearOperator)
    np.testing.assert_allclose((H @ H) @ np.ones(5), A @ A @ np.ones(5), rtol=1e-13)
