import numpy as np
import pytest
from scipy.stats import wasserstein_distance

import curvop
from _matrices import KINDS, operator, orthogonal, with_spectrum

pytest.importorskip("torch")


def _known_spectrum(n=2000):
    # a bulk near zero, a spread middle and a few outliers, as in a trained network's Hessian
    rng = np.random.default_rng(11)
    lam = np.concatenate([rng.gamma(0.5, 0.2, n - 60), rng.uniform(2.0, 6.0, 55), [9.0, 11.0, 14.0, 18.0, 25.0]])
    return np.sort(lam)


@pytest.mark.parametrize("kind", KINDS)
def test_slq_measure_is_close_in_wasserstein_distance(kind):
    lam = _known_spectrum()
    sd = curvop.spectral_density(operator(with_spectrum(tuple(lam), seed=12), kind), num_steps=100, seed=0)
    assert sd.num_matvecs == 100 and len(sd.nodes) == 1 and sd.nodes[0].dtype == np.float64
    w1 = wasserstein_distance(sd.nodes[0], lam, u_weights=sd.weights[0])
    assert w1 <= 0.02 * (lam.max() - lam.min())
    assert np.isclose(sd.nodes[0].max(), lam.max(), rtol=1e-8)  # extreme Ritz value converged
    grid, values = sd.density()
    assert np.all(values >= 0)
    assert abs(np.trapezoid(values, grid) - 1.0) < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_log_determinant_within_2_percent(kind):
    lam = np.random.default_rng(13).uniform(1.0, 10.0, 2000)
    sd = curvop.spectral_density(operator(with_spectrum(tuple(lam), seed=14), kind), num_steps=50, num_probes=10,
                                 seed=1)
    assert sd.num_matvecs == 500
    logdet = np.log(lam).sum()
    assert abs(sd.expectation(np.log) - logdet) <= 0.02 * abs(logdet)
    assert abs(sd.trace() - lam.sum()) <= 0.05 * lam.sum()


def test_small_operator_is_exact_and_weights_sum_to_one():
    lam = np.linspace(1.0, 5.0, 20)
    sd = curvop.spectral_density(with_spectrum(tuple(lam), seed=15), num_steps=50, num_probes=3, seed=0)
    for nodes, weights in zip(sd.nodes, sd.weights):
        assert nodes.size <= 20 and np.isclose(weights.sum(), 1.0)
        np.testing.assert_allclose(nodes, lam[np.abs(lam[:, None] - nodes).argmin(axis=0)], atol=1e-8)
    # with all of the Krylov space, quadrature is exact for z^T f(H) z
    grid = np.linspace(0.0, 6.0, 3001)
    _, values = sd.density(grid=grid, sigma=0.05)
    assert abs(np.trapezoid(values, grid) - 1.0) < 1e-6


def test_plot_draws_on_given_axes():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    sd = curvop.spectral_density(np.diag(np.linspace(0.0, 1.0, 100)), num_steps=30, seed=0)
    fig, ax = plt.subplots()
    assert sd.plot(ax=ax) is ax and ax.get_yscale() == "log" and len(ax.lines) == 1
    plt.close(fig)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_steps"):
        curvop.spectral_density(np.eye(3), num_steps=0)
    with pytest.raises(ValueError, match="square"):
        curvop.spectral_density(np.ones((3, 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_lockstep_lanczos_matches_one_run_at_a_time(kind):
    from curvop.krylov import lanczos_tridiag

    lam = np.r_[np.linspace(0.0, 1.0, 40), 1.0, 1.0]  # a repeated eigenvalue, n = 42
    H = operator(with_spectrum(tuple(lam), seed=16), kind)
    Z = np.random.default_rng(0).standard_normal((42, 3))
    Q = orthogonal(42, 16)
    Z[:, 2] = Q[:, 0] + Q[:, 5]  # two eigenvectors: this run stops after 2 steps, the others go on
    Hop = curvop.aslinearoperator(H)
    runs, _ = lanczos_tridiag(Hop, Hop.from_numpy(Z), 30)
    runs = [(T.alpha, T.beta) for T in runs]
    for i, (a, b) in enumerate(runs):
        (T1,), _ = lanczos_tridiag(Hop, Hop.from_numpy(Z[:, i]), 30)
        a1, b1 = T1.alpha, T1.beta
        assert a.size == a1.size and b.size == b1.size
        np.testing.assert_allclose(a, a1, atol=1e-10)
        np.testing.assert_allclose(b, b1, atol=1e-10)
    assert runs[2][0].size == 2 and runs[0][0].size == 30


def test_progress_bar_counts_every_product(capsys):
    pytest.importorskip("tqdm")
    A = np.diag(np.linspace(1.0, 2.0, 60))
    curvop.eigenvalues(A, progress=True, seed=0)
    curvop.trace(A, num_matvecs=12, progress=True, seed=0)
    curvop.diagonal(A, num_matvecs=6, progress=True, seed=0)
    sd = curvop.spectral_density(A, num_steps=10, num_probes=2, progress=True, seed=0)
    err = capsys.readouterr().err
    assert "trace (auto)" in err and "12/12" in err and "20/20" in err and sd.num_matvecs == 20


def test_stacked_basis_grown_step_by_step_equals_the_list_form():
    from curvop import arrays

    rng = np.random.default_rng(0)
    blocks = [np.linalg.qr(rng.standard_normal((30, 4)))[0] for _ in range(3)]
    blocks = [np.stack([b[:, i] for b in blocks], axis=1) for i in range(3)]  # 3 steps of (n, p=3)
    grown = arrays.stack_blocks(blocks[:1])
    for b in blocks[1:]:
        grown = arrays.stack_blocks([b], onto=grown)
    assert grown.shape == (3, 30, 3)
    np.testing.assert_array_equal(grown, arrays.stack_blocks(blocks))
    w = rng.standard_normal((30, 3))
    np.testing.assert_allclose(arrays.project_out_each(w, grown), arrays.project_out_each(w, blocks), atol=1e-14)
    for i in range(3):  # column i is orthogonal to run i's basis
        np.testing.assert_allclose(np.stack([b[:, i] for b in blocks], 1).T @ arrays.project_out_each(w, grown)[:, i],
                                   0, atol=1e-12)


def test_issue13_item5_local_slq_holds_five_blocks_not_six():
    # reorth="local" through curvop.krylov's recurrence frees the previous product before the next
    # one: 5 blocks of (n, p) at the peak (the old lanczos_tridiag_batch held 6).
    from test_scale_memory import N, _d, _peak_vectors

    H = curvop.HessianOperator.from_hvp(lambda v: _d * v, np.zeros(N), matmat_fn=lambda V: _d[:, None] * V)
    peak, sd = _peak_vectors(lambda: curvop.spectral_density(H, num_steps=10, num_probes=2, reorth="local", seed=0))
    assert sd.num_matvecs == 20
    assert peak <= 5 * 2 + 0.25, peak


# --- item 16 (part): one default kernel width --------------------------------------------------
def test_issue12_item16_plot_and_density_share_one_default_width():
    from curvop import plot

    A = with_spectrum(tuple(np.r_[np.linspace(0.0, 1.0, 95), [20, 30, 40, 50, 60]]), seed=4)
    sd = curvop.spectral_density(A, num_steps=30, num_probes=2, seed=0)
    grid, drawn = plot.density_curve(sd)
    _, own = sd.density(grid=grid)
    np.testing.assert_allclose(drawn, own, rtol=1e-12)
