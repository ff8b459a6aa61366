import numpy as np
import pytest

import curvop
from _matrices import KINDS, is_native, operator, with_spectrum

pytest.importorskip("torch")


@pytest.mark.parametrize("kind", KINDS)
def test_hutchinson_is_exact_on_a_diagonal_matrix(kind):
    d = np.linspace(-1.0, 4.0, 50)
    r = curvop.diagonal(operator(np.diag(d), kind), num_matvecs=3, seed=0)
    assert is_native(r.estimate, kind) and is_native(r.stderr, kind) and r.num_matvecs == 3
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), d, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_xdiag_beats_hutchinson_on_decaying_spectrum(kind):
    lam = 1.0 / np.arange(1, 501) ** 2
    A = with_spectrum(tuple(lam), seed=8)
    H, d = operator(A, kind), np.diag(A)
    err = {}
    for method in ("hutchinson", "xdiag"):
        r = curvop.diagonal(H, method=method, num_matvecs=60, seed=1)
        assert r.num_matvecs == 60 and is_native(r.estimate, kind)
        err[method] = np.linalg.norm(curvop.arrays.to_numpy(r.estimate) - d) / np.linalg.norm(d)
    assert err["xdiag"] * 10 <= err["hutchinson"], err
    assert err["xdiag"] < 0.05


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimators_are_unbiased(method):
    lam = np.linspace(-1.0, 2.0, 30)
    A = with_spectrum(tuple(lam), seed=9)
    est = np.array([curvop.diagonal(A, method=method, num_matvecs=6, seed=s).estimate for s in range(300)])
    z = (est.mean(axis=0) - np.diag(A)) / (est.std(axis=0, ddof=1) / np.sqrt(len(est)))
    assert np.max(np.abs(z)) < 4.5  # 30 entries, each within 4.5 standard errors


def test_hutchinson_stderr_covers_the_diagonal():
    A = with_spectrum(tuple(np.linspace(0.0, 3.0, 200)), seed=10)
    r = curvop.diagonal(A, num_matvecs=40, seed=2)
    assert np.mean(np.abs(r.estimate - np.diag(A)) <= 2 * r.stderr) >= 0.9


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        curvop.diagonal(np.eye(5), method="xdiag", num_matvecs=3)
    with pytest.raises(ValueError, match="method"):
        curvop.diagonal(np.eye(5), method="exact")


# --- XDiag exact when the budget reaches n (issue 12 item 5) -----------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_issue12_item5_xdiag_exact_diagonal_when_budget_reaches_n(kind, method):
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 5)), seed=5)  # the issue's n = 5, diagonal in [1, 2]
    r = curvop.diagonal(operator(A, kind), method=method, num_matvecs=60, seed=0)
    assert r.method == "exact" and r.num_matvecs == 5 and r.num_probes == 5
    assert is_native(r.estimate, kind) and is_native(r.stderr, kind)
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), np.diag(A), rtol=1e-12)
    assert np.all(curvop.arrays.to_numpy(r.stderr) == 0.0)
    # 70 > 64 columns: the unit vectors go in two blocks
    B = with_spectrum(tuple(np.linspace(-1.0, 3.0, 70)), seed=1)
    r = curvop.diagonal(operator(B, kind), method=method, num_matvecs=70)
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), np.diag(B), rtol=1e-12, atol=1e-14)
