"""What every model-zoo test checks, and the independent torch reference it checks against.

Each zoo test builds a real architecture from its library's own classes (random weights, no
download, tiny sizes, float64, eval mode), calls ``curvop.hessian`` with the defaults only, and
checks with :func:`check_operator`:

* ``H @ v`` against a product computed here, without curvop: a double backward through
  ``torch.autograd`` with torch's math attention kernel (``jax.jvp(jax.grad)`` or nested
  ``GradientTape`` for the other frameworks, in their test files), to ``RTOL`` in norm;
* symmetry, ``u . Hv = v . Hu`` to ``RTOL`` of ``|u| |Hv|``;
* the top eigenvalue from :func:`curvop.eigenvalues` against scipy's ``eigsh`` on the same operator.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse.linalg as sla

import curvop

RTOL = 1e-10  # float64 products: every difference is rounding (the issue measured 1e-15)


def torch_reference_hvp(model: Any, loss: Callable[[], Any], v: Any) -> Any:
    """``H v`` by double backward through ``loss()``, in the order of ``model.named_parameters()``.

    Attention runs on torch's math kernel, whose backward is differentiable (the fused kernels'
    are not); ``loss`` is a closure over the model and the batch.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    chunks = torch.split(v, [p.numel() for p in params])
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss(), params, create_graph=True, allow_unused=True)
        gv = sum((g * c.view_as(g)).sum() for g, c in zip(grads, chunks) if g is not None)
        hv = torch.autograd.grad(gv, params, allow_unused=True)
    return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])


def check_operator(H: Any, reference_hvp: Callable[[np.ndarray], np.ndarray], *, seed: int = 0,
                   rtol: float = RTOL) -> None:
    """Product against the reference, symmetry, and the top eigenvalue against ``eigsh``, to ``rtol``."""
    rng = np.random.default_rng(seed)
    n = H.shape[0]
    u, v = rng.standard_normal(n), rng.standard_normal(n)
    hv, hu = np.asarray(H @ v), np.asarray(H @ u)
    assert hv.dtype == np.float64 and hv.shape == (n,)
    ref = np.asarray(reference_hvp(v), dtype=np.float64)
    err = np.linalg.norm(hv - ref) / np.linalg.norm(ref)
    assert err <= rtol, f"H @ v differs from the reference by {err:.2e} (relative)"
    asym = abs(u @ hv - v @ hu) / (np.linalg.norm(u) * np.linalg.norm(hv))
    assert asym <= rtol, f"u.Hv - v.Hu = {asym:.2e} (relative)"
    top = curvop.eigenvalues(H, k=1, which="LA", tol=max(rtol, 1e-10), max_matvecs=600, seed=seed)
    ref_top = sla.eigsh(H, k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    assert top.converged
    np.testing.assert_allclose(top.eigenvalues[0], ref_top, rtol=rtol)


def check_torch(H: Any, model: Any, loss: Callable[[], Any], *, seed: int = 0, rtol: float = RTOL) -> None:
    """:func:`check_operator` with :func:`torch_reference_hvp` (``model``, ``loss``) as the reference."""
    import torch

    check_operator(H, lambda v: torch_reference_hvp(model, loss, torch.from_numpy(v)).numpy(), seed=seed,
                   rtol=rtol)
