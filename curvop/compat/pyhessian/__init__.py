"""PyHessian on curvop: change ``from pyhessian import hessian`` to
``from curvop.compat.pyhessian import hessian`` and the script runs unchanged.

The class keeps PyHessian's constructor, methods, keywords and return structures; the numbers
come from curvop's algorithms (Lanczos for the eigenvalues, Hutchinson for the trace, stochastic
Lanczos quadrature for the density). :mod:`curvop.compat.pyhessian.density_plot` replaces
PyHessian's ``density_plot`` module (``get_esd_plot``). See ``docs/pyhessian.md`` for what differs.

Examples
--------
>>> import torch
>>> from curvop.compat.pyhessian import hessian
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
>>> eigs, vecs = hc.eigenvalues(top_n=2)
>>> len(eigs), [tuple(t.shape) for t in vecs[0]] == [tuple(p.shape) for p in model.parameters()]
(2, True)
"""

from curvop.compat.pyhessian._hessian import CompatWarning, hessian

__all__ = ["hessian", "CompatWarning", "density_plot"]


def __getattr__(name: str):  # ``curvop.compat.pyhessian.density_plot`` without importing matplotlib early
    if name == "density_plot":
        import importlib

        return importlib.import_module("curvop.compat.pyhessian.density_plot")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
