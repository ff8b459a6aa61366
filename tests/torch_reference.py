"""Dense float64 references built independently of curvop, with torch.func.hessian."""

from __future__ import annotations

import torch
from torch.func import functional_call

#: Every torch product mode, by a readable id (for ``pytest.mark.parametrize``).
MODES = {
    "reverse-cached": dict(hvp="reverse", cache=True),
    "reverse-uncached": dict(hvp="reverse", cache=False),
    "forward-cached": dict(hvp="forward", cache=True),
    "forward-uncached": dict(hvp="forward", cache=False),
}


def dense_hessian(model, loss_fn, batches, names=None):
    """Hessian of the dataset loss: ``loss_fn`` applied to all samples at once.

    For a mean-reduced ``loss_fn`` this is the mean over all samples, for a sum-reduced one the sum:
    the definition curvop's batch weighting must reproduce.
    """
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return params_hessian(model, lambda p: loss_fn(functional_call(model, p, (x,)), y), names)


def params_hessian(model, f, names=None):
    """Hessian of ``f(parameters)`` in the flat order of ``model.named_parameters()`` (``names``: those
    only), by ``torch.func.hessian``; ``f`` gets the ``(parameters, other tensors)`` pair that
    ``functional_call`` takes, with the buffers and the parameters left out as constants."""
    flat0, unflatten = flat_params(model, names)
    return torch.func.hessian(lambda flat: f(unflatten(flat)))(flat0).detach().numpy()


def flat_model(model, names=None):
    """``(θ₀, out)``: the selected parameters (``names``, default all) flattened, and ``out(θ, x)``,
    the model's outputs at the flat ``θ`` (the other parameters and the buffers held fixed)."""
    flat0, unflatten = flat_params(model, names)
    return flat0, lambda flat, x: functional_call(model, unflatten(flat), (x,))


def flat_params(model, names=None):
    """``(θ₀, unflatten)``: the selected parameters flattened, and ``unflatten(θ)``, the ``(parameters,
    other tensors)`` pair ``functional_call`` takes (the other parameters and the buffers fixed)."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    fixed.update(model.named_buffers())
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def unflatten(flat):
        return dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)))), fixed

    return flat0, unflatten


def tanh_mlp(d_in: int, hidden: int, d_out: int, n: int, seed: int = 0):
    """A float64 ``Linear-Tanh-Linear`` model and an ``(x, y)`` regression batch of ``n`` samples,
    drawn in that order after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)).double()
    return model, (torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64))


def zero_hessian_operator():
    """``curvop.hessian`` of ``Linear(4, 3)`` + ``L1Loss`` (float64, 16 samples): exactly zero, 15×15
    (a linear model under a piecewise-linear loss)."""
    import curvop

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64))
    return curvop.hessian(model, torch.nn.L1Loss(), batch)
