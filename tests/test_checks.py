"""The algorithms' shared finiteness check (``curvop._checks``): one curvop error on NaN products (issue 12 item 7)."""

from __future__ import annotations

import warnings
import numpy as np
import pytest

import curvop
from curvop.backends.faults import NonFiniteProductError
from _matrices import KINDS, operator


pytest.importorskip("torch")


# --- item 7: NaN products raise, never converged=True -------------------------------------------
def _nan_matrix(n=20, bad=np.nan):
    A = np.eye(n)
    A[3, 3] = bad
    return A


@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item7_every_algorithm_raises_one_curvop_error_on_nan(kind):
    H = operator(_nan_matrix(), kind)
    calls = [
        lambda: curvop.diagonal(H, num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, method="xdiag", num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, num_matvecs=20),
        lambda: curvop.eigenvalues(H, k=2, seed=0),
        lambda: curvop.eigenvalues(H, k=2, which="LM", method="power", seed=0),
        lambda: curvop.spectral_density(H, num_steps=5, num_probes=2, seed=0),
    ]
    for call in calls:
        with pytest.raises(NonFiniteProductError, match="NaN or Inf"):
            call()
    H = operator(_nan_matrix(bad=np.inf), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for call in calls[:2] + calls[3:]:  # calls[2] multiplies inf by the zeros of unit vectors
            with pytest.raises(NonFiniteProductError):
                call()


# --- issue 26: every argument of every public algorithm is checked, whatever path the call takes -------
# (name, bad value) per algorithm; each is tried on every path of that algorithm (the exact answer when
# the budget reaches n, each method, both Lanczos reorthogonalisations and block sizes), and must be
# refused before the first product, naming the argument.
_BAD = {
    "trace": [("method", "bogus"), ("probes", "bogus"), ("num_matvecs", "5"), ("num_matvecs", 2.5),
              ("num_matvecs", True), ("num_matvecs", 0), ("progress", "yes"), ("seed", "x"), ("seed", -1)],
    "diagonal": [("method", "bogus"), ("num_matvecs", "5"), ("num_matvecs", 2.5), ("num_matvecs", True),
                 ("num_matvecs", 0), ("progress", "yes"), ("seed", "x")],
    "eigenvalues": [("tol", -1.0), ("tol", 0.0), ("tol", np.nan), ("tol", "x"), ("max_matvecs", "x"),
                    ("max_matvecs", 2.5), ("max_matvecs", 0), ("ncv", "x"), ("ncv", 1), ("verify", "x"),
                    ("progress", "yes"), ("basis_dtype", "int32"), ("basis_dtype", "bogus"),
                    ("max_basis_bytes", 0), ("max_basis_bytes", "x"), ("seed", "x"), ("tol_on", "bogus"),
                    ("k", True), ("k", 2.5), ("which", "XX"), ("basis_location", "gpu")],
    "spectral_density": [("num_steps", 0), ("num_steps", "x"), ("num_steps", 2.5), ("num_probes", 0),
                         ("block_size", 0), ("block_size", -1), ("block_size", 2.5), ("probes", "bogus"),
                         ("reorth", "bogus"), ("basis_location", "gpu"), ("basis_dtype", "int32"),
                         ("max_basis_bytes", 0), ("progress", "yes"), ("seed", "x")],
}
_PATHS = {
    "trace": [dict(method=m, num_matvecs=b) for m in ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace")
              for b in (6, 60)] + [dict(method="hutchinson", rtol=0.1)],
    "diagonal": [dict(method=m, num_matvecs=b) for m in ("hutchinson", "xdiag") for b in (6, 60)],
    "eigenvalues": [dict(), dict(method="power", which="LM"), dict(verify=False), dict(k=2, ncv=5)],
    "spectral_density": [dict(reorth=r, block_size=b, num_probes=2) for r in ("full", "local") for b in (None, 1)],
}


@pytest.mark.parametrize("name", list(_BAD))
def test_issue26_every_argument_is_checked_on_every_path(name):
    fn = getattr(curvop, name)
    A = np.diag(np.arange(1.0, 21.0))
    accepted = []
    for arg, bad in _BAD[name]:
        for path in _PATHS[name]:
            H = curvop.aslinearoperator(A)
            kwargs = {"seed": 0, **path, arg: bad}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(H, **kwargs)
            except (TypeError, ValueError) as err:
                assert arg in str(err) or (arg == "basis_location" and "location" in str(err)), (arg, bad, err)
                assert H.num_matvecs == 0, (arg, bad, path)  # refused before any product
            else:
                accepted.append((arg, bad, path))
    assert not accepted, accepted


@pytest.mark.parametrize("arg, bad", [("k", 0), ("trace", "yes"), ("trace_matvecs", 1), ("tol", -1.0),
                                      ("max_matvecs", "x"), ("warm_start", "no"), ("seed", -1),
                                      ("tol_on", "bogus"), ("hessian_options", None)])
def test_issue26_tracker_checks_its_options_when_made(arg, bad):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 1).double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    with pytest.raises((TypeError, ValueError), match=arg):
        curvop.SharpnessTracker(model, torch.nn.MSELoss(), batch, **{arg: bad})


def test_issue26_good_arguments_of_every_kind_are_accepted():
    A = np.diag(np.arange(1.0, 21.0))
    assert curvop.trace(A, num_matvecs=np.int64(6), seed=np.random.default_rng(0), progress=np.bool_(False)).num_matvecs == 6
    assert curvop.trace(A, num_matvecs=1e3).method == "exact"  # an integral float is an integer
    r = curvop.eigenvalues(A, tol=np.float32(1e-6), max_matvecs=np.int32(100), basis_dtype="float32", seed=0)
    assert r.converged and r.eigenvalues[0] == pytest.approx(20.0)
    assert len(curvop.spectral_density(A, num_steps=5.0, num_probes=2, block_size=1, seed=0).nodes) == 2
