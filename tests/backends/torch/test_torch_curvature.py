"""The curvature family on torch against dense float64 references (tests/curvature_reference.py).

The data is a loader of unequal batches (10, 10, 3 samples), so every test also checks that the
batches are weighted as the definitions on the whole data set require.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import curvop  # noqa: E402
from curvature_reference import (concat, dense_empirical_fisher, dense_ggn, dense_jacobian,  # noqa: E402
                                 per_sample_gradients)
from torch_reference import MODES, dense_hessian  # noqa: E402

SIZES = (10, 10, 3)
ALL_MODES = {f"{name}-{'batched' if b else 'looped'}": {**m, "batched": b}
             for name, m in MODES.items() for b in (False, True)}


def _mlp(d_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


def _batches(targets: torch.Tensor, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(sum(SIZES), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out, i = [], 0
    for n in SIZES:
        out.append((x[i:i + n], targets[i:i + n]))
        i += n
    return out


def _targets(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    n = sum(SIZES)
    if kind == "classes":
        return torch.randint(0, 3, (n,), generator=g)
    if kind == "classes_ignored":  # every fourth target ignored
        t = torch.randint(0, 3, (n,), generator=g)
        t[::4] = -7
        return t
    if kind == "binary":
        return (torch.rand(n, 3, generator=g) < 0.5).double()
    return torch.randn(n, 3, dtype=torch.float64, generator=g)


LOSSES = {
    "cross_entropy": (nn.CrossEntropyLoss(), "classes"),
    "mse_mean": (nn.MSELoss(), "values"),
    "mse_sum": (nn.MSELoss(reduction="sum"), "values"),
    "bce_logits": (nn.BCEWithLogitsLoss(), "binary"),
    "cross_entropy_ignored": (nn.CrossEntropyLoss(ignore_index=-7), "classes_ignored"),
}


def _close(A: np.ndarray, B: np.ndarray, rtol: float = 1e-12) -> None:
    assert np.abs(A - B).max() <= rtol * np.abs(B).max(), np.abs(A - B).max() / np.abs(B).max()


# --- definitions against dense references ---------------------------------------------------------
MEMBERS = {  # what curvop builds, and its dense reference
    "ggn": (curvop.ggn, lambda model, loss_fn, batches: dense_ggn(model, loss_fn, batches)),
    "empirical": (lambda *a, **k: curvop.fisher(*a, kind="empirical", **k),
                  lambda model, loss_fn, batches: dense_empirical_fisher(model, loss_fn, batches, reduction=loss_fn.reduction)),
}


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse_mean", "mse_sum"])
@pytest.mark.parametrize("member", MEMBERS)
def test_ggn_and_empirical_fisher_match_dense_references_over_unequal_batches(member, loss, mode):
    """GGN: ``Jᵀ (∂²L/∂f²) J``; empirical Fisher: ``c Σₙ ∇ℓₙ∇ℓₙᵀ`` (per-sample gradients by torch.func)."""
    build, reference = MEMBERS[member]
    model = _mlp()
    loss_fn, kind = LOSSES[loss]
    batches = _batches(_targets(kind))
    _close(build(model, loss_fn, batches, **ALL_MODES[mode]).to_dense(), reference(model, loss_fn, batches))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_mean"])
def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters(loss):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    loss_fn, kind = LOSSES[loss]
    batches = _batches(_targets(kind))
    G = curvop.ggn(model, loss_fn, batches).to_dense()
    _close(G, dense_hessian(model, loss_fn, batches))
    # and for a nonlinear model it is not the Hessian (the check above could not pass by accident)
    mlp = _mlp()
    assert np.abs(curvop.ggn(mlp, loss_fn, batches).to_dense() - dense_hessian(mlp, loss_fn, batches)).max() > 1e-4


def test_ggn_with_a_functional_loss_and_a_parameter_selection():
    model = _mlp()
    batches = _batches(_targets("classes"))
    names = ["2.weight", "2.bias"]
    G = curvop.ggn(model, torch.nn.functional.cross_entropy, batches, reduction="mean", params=["2"])
    _close(G.to_dense(), dense_ggn(model, torch.nn.functional.cross_entropy, batches, names=names))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_jacobian_products_match_the_dense_jacobian(mode):
    model = _mlp()
    batches = _batches(_targets("classes"))
    x, _ = concat(batches)
    Jd = dense_jacobian(model, x).numpy()
    J = curvop.jacobian(model, batches, **ALL_MODES[mode])
    assert J.shape == Jd.shape == (69, 43)
    rng = np.random.default_rng(0)
    V, U = rng.standard_normal((43, 3)), rng.standard_normal((69, 2))
    _close(J.matmat(V), Jd @ V)
    _close(J @ V[:, 0], Jd @ V[:, 0])
    _close(J.T @ U, Jd.T @ U)
    _close(J.rmatvec(U[:, 0]), Jd.T @ U[:, 0])
    ut = torch.from_numpy(U[:, 0])
    jt = J.T @ ut  # native in, native out
    assert isinstance(jt, torch.Tensor)
    _close(jt.numpy(), Jd.T @ U[:, 0])
    _close((J @ torch.from_numpy(V)).numpy(), Jd @ V)
    _close(J.rmatmat(torch.from_numpy(U)).numpy(), Jd.T @ U)


def test_jacobian_svds_gives_the_ntk_spectrum():
    from scipy.sparse.linalg import svds

    model = _mlp()
    x = torch.randn(12, 4, dtype=torch.float64)
    J = curvop.jacobian(model, x)  # a bare tensor: the inputs
    s = np.sort(svds(J, k=4, return_singular_vectors=False))[::-1]
    Jd = dense_jacobian(model, x).numpy()
    np.testing.assert_allclose(s, np.linalg.svd(Jd, compute_uv=False)[:4], rtol=1e-10)
    ntk = np.linalg.eigvalsh(Jd @ Jd.T)[::-1][:4]
    np.testing.assert_allclose(s ** 2, ntk, rtol=1e-9)


def test_jacobian_shape_errors_name_the_expected_length():
    J = curvop.jacobian(_mlp(), torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="J.T @ u expects a vector of length 15"):
        J.rmatvec(np.ones(43))
    with pytest.raises(ValueError, match="J @ v expects a vector of length 43"):
        J.matvec(torch.ones(15, dtype=torch.float64))


# --- the Monte-Carlo Fisher -----------------------------------------------------------------------
def _quadratic_forms(op, V):
    return np.einsum("ij,ij->j", V, op.matmat(V))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_mean", "mse_sum", "bce_logits", "cross_entropy_ignored"])
def test_mc_fisher_expectation_is_the_ggn(loss):
    """Quadratic forms ``vᵀFv`` of 60 independently seeded MC Fishers (8 draws each) average to
    ``vᵀGv`` within 4 standard errors (the standard error measured from the 60 replicates)."""
    model = _mlp()
    loss_fn, kind = LOSSES[loss]
    batches = _batches(_targets(kind))
    G = dense_ggn(model, loss_fn, batches)
    V = np.random.default_rng(3).standard_normal((G.shape[0], 4))
    truth = np.einsum("ij,ij->j", V, G @ V)
    reps = np.stack([_quadratic_forms(curvop.fisher(model, loss_fn, batches, mc_samples=8, seed=s, cache=True,
                                                    check_deterministic=False), V) for s in range(60)])
    mean, se = reps.mean(0), reps.std(0, ddof=1) / np.sqrt(len(reps))
    assert np.all(np.abs(mean - truth) <= 4 * se), (mean, truth, se)
    assert np.all(se < 0.1 * np.abs(truth))  # the test has the power to see a wrong scale


def test_mc_fisher_with_a_fixed_seed_is_the_formula_on_the_drawn_targets():
    """``(1/N) Σₙ (1/M) Σₘ ∇ℓₙ(ỹₙₘ) ∇ℓₙ(ỹₙₘ)ᵀ`` with the targets of ``sample_targets`` under the
    per-batch seeds (the gradients computed per sample by torch.func, not by curvop)."""
    from curvop.backends.curvature import mc_batch_seed
    from curvop.backends.torch import sample_targets

    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(_targets("classes"))
    F = curvop.fisher(model, loss_fn, batches, mc_samples=3, seed=11)
    ref = 0
    for i, (x, _) in enumerate(batches):
        draws = sample_targets(model(x), "categorical", seed=mc_batch_seed(11, i), samples=3)
        for t in draws:
            g = per_sample_gradients(model, loss_fn, x, t)
            ref = ref + (g.T @ g).numpy()
    _close(F.to_dense(), ref / (3 * sum(SIZES)))


def test_mc_fisher_seeds():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(_targets("classes"))
    v = torch.randn(43, dtype=torch.float64)
    state = torch.get_rng_state()
    F1 = curvop.fisher(model, loss_fn, batches, seed=5)
    F2 = curvop.fisher(model, loss_fn, batches, seed=5, cache=True)
    F3 = curvop.fisher(model, loss_fn, batches, seed=6)
    assert torch.allclose(F1 @ v, F2 @ v, rtol=1e-13, atol=0) and torch.equal(F1 @ v, F1 @ v)
    assert not torch.allclose(F1 @ v, F3 @ v)
    F4 = curvop.fisher(model, loss_fn, batches)
    assert isinstance(F4.backend.seed, int) and F1.backend.seed == 5
    assert torch.equal(torch.get_rng_state(), state)  # drawn from private generators
    assert "Monte-Carlo Fisher (categorical, 1 sample, seed 5)" in repr(F1)


def test_mc_fisher_refuses_losses_that_are_not_a_likelihood():
    model, batches = _mlp(), _batches(_targets("values"))
    with pytest.raises(ValueError, match="likelihood= one of them"):
        curvop.fisher(model, nn.L1Loss(), batches)
    with pytest.raises(ValueError, match="class-weighted or label-smoothed"):
        curvop.fisher(model, nn.CrossEntropyLoss(label_smoothing=0.1), _batches(_targets("classes")))
    with pytest.raises(ValueError, match="ignore_index=2 is one of the 3 classes"):  # draws of class 2 dropped
        curvop.fisher(model, nn.CrossEntropyLoss(ignore_index=2), _batches(_targets("classes"))) @ np.ones(43)
    with pytest.raises(ValueError, match="kind must be 'mc'"):
        curvop.fisher(model, nn.MSELoss(), batches, kind="true")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        curvop.fisher(model, nn.MSELoss(), batches, mc_samples=0)
    with pytest.raises(ValueError, match="needs the model outputs and the loss separately"):
        curvop.ggn(model, None, batches)
    # an explicit likelihood serves a loss curvop cannot read (a lambda computing the MSE)
    F = curvop.fisher(model, lambda f, y: ((f - y) ** 2).mean(), batches, likelihood="gaussian", reduction="mean")
    assert F.shape == (43, 43)


# --- operators and algorithms ---------------------------------------------------------------------
def test_family_is_psd_and_trace_auto_runs_xnystrace():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(_targets("classes"))
    G = curvop.ggn(model, loss_fn, batches, cache=True)
    H = curvop.hessian(model, loss_fn, batches)
    assert G.is_psd and not H.is_psd
    assert curvop.fisher(model, loss_fn, batches, kind="empirical").is_psd
    r = curvop.trace(G, num_matvecs=30, seed=0)
    assert r.method == "xnystrace"
    dense = dense_ggn(model, loss_fn, batches)
    assert abs(r.estimate - np.trace(dense)) <= max(4 * r.stderr, 1e-12 * np.trace(dense))
    assert curvop.trace(H, num_matvecs=30, seed=0).method in ("xtrace", "hutchinson")


def test_algorithms_run_on_the_ggn_unchanged():
    model, loss_fn = _mlp(), nn.MSELoss()
    batches = _batches(_targets("values"))
    G = curvop.ggn(model, loss_fn, batches, cache=True)
    dense = dense_ggn(model, loss_fn, batches)
    lam = np.linalg.eigvalsh(dense)[::-1]
    np.testing.assert_allclose(curvop.eigenvalues(G, k=3, tol=1e-10, seed=0).eigenvalues, lam[:3], rtol=1e-8)
    np.testing.assert_allclose(curvop.diagonal(G, num_matvecs=43).estimate, np.diag(dense), rtol=1e-10, atol=1e-14)
    d = curvop.spectral_density(G, num_steps=20, num_probes=2, seed=0)
    assert min(x.min() for x in d.nodes) > -1e-8 * lam[0]  # PSD: no negative Ritz values


def test_ggn_follows_in_place_parameter_updates():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(_targets("classes"))
    G = curvop.ggn(model, loss_fn, batches, cache=True)
    G.to_dense()
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    _close(G.to_dense(), dense_ggn(model, loss_fn, batches))


def test_the_model_and_its_state_are_untouched():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(_targets("classes"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    G = curvop.fisher(model, loss_fn, batches, kind="empirical", cache=True)
    G @ np.ones(43)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_train_mode_ggn_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    batches = _batches(_targets("classes"))
    with pytest.raises(ValueError, match="training mode"):
        curvop.ggn(model, nn.CrossEntropyLoss(), batches)
    G = curvop.ggn(model, nn.CrossEntropyLoss(), batches, train_mode=True, seed=0)
    D = G.to_dense()
    assert np.allclose(D, D.T, rtol=0, atol=1e-14) and np.linalg.eigvalsh(D).min() > -1e-12


def test_mc_draws_fall_back_to_a_loop_with_a_warning():
    """A loss that reads a value on the host (``.item()``) cannot be vmapped over the draws: the
    gradients are then computed one draw at a time, with a warning, and the matrix is the same."""
    model, batches = _mlp(), _batches(_targets("classes"))

    def host_loss(f, t):
        return nn.functional.cross_entropy(f, t) * (1.0 if float(t.sum().item()) >= 0 else 0.0)

    with pytest.warns(UserWarning, match="one at a time"):
        F = curvop.fisher(model, host_loss, batches, mc_samples=3, seed=2, likelihood="categorical",
                          reduction="mean", batch_weight=lambda b: len(b[1]))
    ref = curvop.fisher(model, nn.CrossEntropyLoss(), batches, mc_samples=3, seed=2)
    _close(F.to_dense(), ref.to_dense())
