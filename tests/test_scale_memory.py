"""Issue 15 items 1-2: the memory model of docs/scale.md, measured, and the bounded-memory Krylov options.

Peaks are measured with ``tracemalloc`` (numpy registers every array allocation with it) on a
numpy operator ``v -> d * v`` with n = 200,000 (1.6 MB per float64 vector), so a vector is far
above Python's own allocations; a product allocates exactly one output vector. Each formula below
is the one docs/scale.md states, in vectors of ``n`` elements, and must match within 20 %.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg

import curvop
from curvop import HessianOperator
from curvop.eigen import _choose_ncv, default_basis_budget

from _matrices import with_spectrum

N = 200_000
VEC = N * 8
_d = np.concatenate([np.linspace(1.0, 2.0, N - 3), [5.0, 7.0, 10.0]])
_flat = np.linspace(1.0, 10.0, N)


def _op() -> HessianOperator:
    return HessianOperator.from_hvp(lambda v: _d * v, np.zeros(N), matmat_fn=lambda V: _d[:, None] * V)


def _peak_vectors(f) -> tuple[float, object]:
    """Peak bytes ``f()`` allocates above what was live before it, in vectors of ``N`` float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out = f()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    return peak / VEC, out


def _close(measured: float, model: float) -> None:
    assert abs(measured - model) <= 0.2 * model, f"measured {measured:.2f} vectors, the model says {model:.2f}"


# --- item 1: the memory model, algorithm by algorithm ----------------------------------------
@pytest.mark.parametrize("ncv", [8, 24])
def test_issue15_item1_lanczos_peak_is_ncv_plus_k_plus_1_vectors(ncv):
    """Preallocated basis, restarted in place: ``ncv + k + 1`` vectors (the old regrown basis: ~2 ncv)."""
    H = HessianOperator.from_hvp(lambda v: _flat * v, np.zeros(N))  # top gap 5e-6: slow, many restarts
    peak, r = _peak_vectors(lambda: curvop.eigenvalues(H, k=1, ncv=ncv, tol=1e-12, max_matvecs=80, seed=0))
    assert r.num_matvecs == 80 and 80 > 3 * ncv  # several thick restarts happened
    assert np.isclose(r.eigenvalues[0], 10.0, rtol=1e-3)
    _close(peak, ncv + 1 + 1)


def test_issue15_item1_lanczos_k3_and_power_peaks():
    H = _op()
    _close(_peak_vectors(lambda: curvop.eigenvalues(H, k=3, ncv=12, tol=1e-12, max_matvecs=80, seed=0))[0], 12 + 3 + 1)
    _close(_peak_vectors(lambda: curvop.eigenvalues(H, k=2, which="LM", method="power", max_matvecs=30,
                                                    seed=0))[0], 2 + 6)


@pytest.mark.parametrize("steps,probes", [(10, 1), (30, 1), (30, 3)])
def test_issue15_item1_slq_peaks_full_and_local(steps, probes):
    """SLQ: ``p (steps + 5)`` vectors with full reorthogonalisation, ``6 p`` with local (any steps)."""
    H = _op()
    full, a = _peak_vectors(lambda: curvop.spectral_density(H, num_steps=steps, num_probes=probes, reorth="full", seed=0))
    local, b = _peak_vectors(lambda: curvop.spectral_density(H, num_steps=steps, num_probes=probes, reorth="local",
                                                             seed=0))
    _close(full, probes * (steps + 5))
    _close(local, 6 * probes)
    assert a.num_matvecs == b.num_matvecs == steps * probes


@pytest.mark.parametrize("m", [10, 20])
def test_issue15_item1_trace_and_diagonal_peaks(m):
    """Block methods hold their probe blocks: Hutchinson ``3m``, Hutch++ ``1.5m``, XTrace ``2m``,
    ``"auto"`` ``3m``; diagonal: Hutchinson ``3m + 2``, XDiag ``4m``."""
    H = _op()
    for method, model in (("hutchinson", 3 * m), ("hutch++", 1.5 * m), ("xtrace", 2 * m), ("auto", 3 * m)):
        _close(_peak_vectors(lambda: curvop.trace(H, method=method, num_matvecs=m, seed=0))[0], model)
    _close(_peak_vectors(lambda: curvop.diagonal(H, num_matvecs=m, seed=0))[0], 3 * m + 2)
    _close(_peak_vectors(lambda: curvop.diagonal(H, method="xdiag", num_matvecs=m, seed=0))[0], 4 * m)


# --- item 2: the options that bound the memory ----------------------------------------------
def test_issue15_item2_float32_basis_halves_the_basis_and_keeps_the_eigenvalue():
    H = _op()
    peak, r = _peak_vectors(lambda: curvop.eigenvalues(H, k=1, ncv=24, tol=1e-6, basis_dtype="float32", seed=0))
    _close(peak, 24 / 2 + 1 + 3)
    assert r.converged and np.isclose(r.eigenvalues[0], 10.0, rtol=1e-6)
    assert r.eigenvectors.dtype == np.float64


def test_issue15_item2_max_basis_bytes_lowers_the_default_ncv():
    H = _op()
    peak, r = _peak_vectors(lambda: curvop.eigenvalues(H, k=1, tol=1e-10, max_basis_bytes=5 * VEC, seed=0))
    _close(peak, 5 + 1 + 1)
    assert r.converged and np.isclose(r.eigenvalues[0], 10.0, rtol=1e-10)


def test_issue15_item2_default_ncv_fits_the_training_step():
    """GPT-2 small in float32 (0.5 GB vectors): the default keeps 4 vectors (2 GB), not 20 (10 GB)."""
    n = 124_439_808
    gpt2 = scipy.sparse.linalg.LinearOperator((n, n), matvec=lambda v: v, dtype=np.float32)  # never applied
    H = curvop.aslinearoperator(gpt2)
    vec = 124_439_808 * 4
    assert default_basis_budget(vec) == 4 * vec
    assert _choose_ncv(H, 1, None, None, None) == 4
    assert _choose_ncv(H, 5, None, None, None) == 7  # never below k + 2 by default
    assert _choose_ncv(H, 1, None, "float16", None) == 8  # a smaller dtype holds more vectors
    small = curvop.aslinearoperator(np.eye(1000))
    assert _choose_ncv(small, 1, None, None, None) == 20  # small models: unchanged


def test_issue15_item2_explicit_bounds_that_cannot_hold_give_curvop_errors():
    H = _op()
    with pytest.raises(ValueError, match="max_basis_bytes.*lower ncv"):
        curvop.eigenvalues(H, k=1, ncv=10, max_basis_bytes=4 * VEC)
    with pytest.raises(ValueError, match="k \\+ 1 = 3"):
        curvop.eigenvalues(H, k=2, max_basis_bytes=2 * VEC)
    with pytest.raises(ValueError, match="basis_location must be 'device'.*'host'"):
        curvop.eigenvalues(H, basis_location="gpu")
    with pytest.raises(ValueError, match="reorth must be"):
        curvop.spectral_density(H, reorth="selective")


def test_issue15_item2_slq_auto_goes_local_over_the_bound():
    H = _op()
    peak, sd = _peak_vectors(lambda: curvop.spectral_density(H, num_steps=40, max_basis_bytes=10 * VEC, seed=0))
    _close(peak, 6)
    local = curvop.spectral_density(H, num_steps=40, reorth="local", seed=0)
    np.testing.assert_array_equal(sd.nodes[0], local.nodes[0])
    full = curvop.spectral_density(H, num_steps=40, seed=0)  # 40 vectors fit the default bound here
    assert not np.array_equal(full.nodes[0], local.nodes[0])


def _spectrum(n=1500):
    rng = np.random.default_rng(11)
    return np.sort(np.concatenate([rng.gamma(0.5, 0.2, n - 40), rng.uniform(2.0, 6.0, 35), [9.0, 11.0, 14.0, 18.0, 25.0]]))


def test_issue15_item2_local_reorth_density_is_close_to_full():
    """Without a stored basis the converged outliers get ghost copies, but the quadrature measure
    barely moves: same trace (Rademacher), smoothed density within 2 % in L1, same extremes."""
    lam = _spectrum()
    A = with_spectrum(tuple(lam), seed=12)
    full = curvop.spectral_density(A, num_steps=150, reorth="full", seed=0)
    local = curvop.spectral_density(A, num_steps=150, reorth="local", seed=0)
    assert np.isclose(local.trace(), full.trace(), rtol=1e-8)
    assert np.isclose(local.expectation(np.square), full.expectation(np.square), rtol=1e-8)
    sigma = full.default_sigma()
    grid = np.linspace(lam.min() - 1.0, lam.max() + 1.0, 4000)
    _, pf = full.density(grid, sigma)
    _, pl = local.density(grid, sigma)
    assert np.trapezoid(np.abs(pf - pl), grid) < 0.02
    assert np.isclose(local.nodes[0].max(), lam.max(), rtol=1e-8)
    # and the ghosts are real: more nodes near the top eigenvalue than full reorthogonalisation has
    assert np.sum(np.isclose(local.nodes[0], lam.max(), rtol=1e-6)) > np.sum(np.isclose(full.nodes[0], lam.max(), rtol=1e-6))


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_issue15_item2_host_basis_matches_device_basis(kind):
    """A host-memory basis (numpy) with native products gives the device basis's eigenpairs."""
    A = with_spectrum(tuple(np.linspace(0.0, 1.0, 197).tolist() + [3.0, 4.0, 5.0]), seed=4)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        H = curvop.aslinearoperator(torch.as_tensor(A))
    else:
        jax = pytest.importorskip("jax")
        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            Aj = jax.numpy.asarray(A)
            H = HessianOperator.from_hvp(lambda v: Aj @ v, jax.numpy.zeros(A.shape[0]))
            _host_vs_device(H)
        finally:
            jax.config.update("jax_enable_x64", x64)
        return
    _host_vs_device(H)


def _host_vs_device(H):
    dev = curvop.eigenvalues(H, k=2, ncv=6, tol=1e-10, seed=1)
    host = curvop.eigenvalues(H, k=2, ncv=6, tol=1e-10, seed=1, basis_location="host")
    np.testing.assert_allclose(host.eigenvalues, [5.0, 4.0], rtol=1e-10)
    np.testing.assert_allclose(host.eigenvalues, dev.eigenvalues, rtol=1e-12)
    assert type(host.eigenvectors) is type(dev.eigenvectors)
    sd_dev = curvop.spectral_density(H, num_steps=30, num_probes=2, seed=3)
    sd_host = curvop.spectral_density(H, num_steps=30, num_probes=2, seed=3, basis_location="host")
    for a, b in zip(sd_dev.nodes, sd_host.nodes):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
