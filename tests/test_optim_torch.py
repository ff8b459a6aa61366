"""Issue 23 on torch: ``curvop.optim.AdaHessian``, ``SophiaH`` and ``SophiaG`` against the numpy rules.

On the diagonal quadratic of ``tests/optim_reference.py`` every probe gives the exact diagonal, so
the trajectories must equal the rules to 1e-12 (relative above 1). The estimate on a real network
is checked against a dense ``torch.func.hessian`` with the probe the optimizer drew.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvop
import curvop.optim as co
import optim_reference as R
from curvop.arrays import random_probes
from curvop.optim.rules import probe_rng
from torch_reference import dense_hessian

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
torch.set_num_threads(1)
STEPS = 25


def _quadratic(prob):
    ps = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in prob.p0]
    a = [torch.tensor(x) for x in prob.a]
    c = [torch.tensor(x) for x in prob.c]
    return ps, lambda: sum(0.5 * (ai * (p - ci) ** 2).sum() for ai, ci, p in zip(a, c, ps))


def _run(prob, make, official: bool = False, steps: int = STEPS):
    ps, loss = _quadratic(prob)
    opt = make(ps)
    out = []
    for _ in range(steps):
        if official:
            opt.zero_grad()
            loss().backward(create_graph=True)
            opt.step()
        else:
            opt.step(loss)
        out.append([p.detach().numpy().copy() for p in ps])
    return out


# --- trajectories equal the rules ------------------------------------------------------------------
@pytest.mark.parametrize("official", [False, True], ids=["closure", "official-pattern"])
@pytest.mark.parametrize("wd, power", [(0.0, 1.0), (0.1, 0.5)])
def test_adahessian_trajectory_is_the_rule(official, wd, power):
    prob = R.quadratic(negative=True)
    want = R.adahessian(prob, STEPS, lr=0.1, weight_decay=wd, hessian_power=power, kernel_axes=(2, 3))
    got = _run(prob, lambda ps: co.AdaHessian(ps, lr=0.1, weight_decay=wd, hessian_power=power), official)
    assert R.max_error(got, want) < 1e-12


@pytest.mark.parametrize("every, wd", [(1, 0.0), (3, 0.1)])
def test_sophia_h_trajectory_is_the_rule(every, wd):
    prob = R.quadratic(negative=True)
    want = R.sophia(prob, STEPS, lr=0.05, every=every, weight_decay=wd)
    got = _run(prob, lambda ps: co.SophiaH(ps, lr=0.05, every=every, weight_decay=wd))
    assert R.max_error(got, want) < 1e-12


@pytest.mark.parametrize("every, wd", [(1, 0.0), (3, 0.1)])
def test_sophia_g_trajectory_is_the_rule(monkeypatch, every, wd):
    """Outputs are the parameters themselves, the loss ``Σ (f − y)²`` (MSE, sum); the sampler is
    replaced by fixed targets ``y*``, so ĥ = (2(p − y*))² (scale 1 for a sum) is deterministic."""
    import curvop.optim.torch as T

    prob = R.quadratic(shapes=((5,), (2, 3, 2, 2)), seed=3)
    n = sum(a.size for a in prob.a)
    c = torch.tensor(np.concatenate([x.ravel() for x in prob.c]))
    star = torch.linspace(-1, 1, n, dtype=torch.float64)
    monkeypatch.setattr(T, "sample_targets", lambda out, likelihood, **kw: [star.view_as(out)])
    ps = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in prob.p0]
    opt = co.SophiaG(ps, lr=0.05, every=every, weight_decay=wd, loss_fn=torch.nn.MSELoss(reduction="sum"))
    got = []
    for _ in range(STEPS):
        opt.step(lambda: (torch.cat([p.reshape(-1) for p in ps]), c))
        got.append([p.detach().numpy().copy() for p in ps])
    two = R.Quadratic(tuple(np.full_like(a, 2.0) for a in prob.a), prob.c, prob.p0)  # Σ (p − c)²: a = 2
    splits = np.cumsum([a.size for a in prob.a])[:-1]
    stars = [s.reshape(a.shape) for s, a in zip(np.split(star.numpy(), splits), prob.a)]
    want = R.sophia(two, STEPS, lr=0.05, every=every, weight_decay=wd,
                    hhat=lambda p: [(2 * (x - s)) ** 2 for x, s in zip(p, stars)])
    assert R.max_error(got, want) < 1e-12


def test_param_groups_take_their_own_hyperparameters():
    """The quadratic is separable, so each group follows the rule with its own lr and weight decay."""
    prob = R.quadratic(negative=True)
    ps, loss = _quadratic(prob)
    opt = co.AdaHessian([{"params": [ps[0]], "lr": 0.05}, {"params": [ps[1]], "weight_decay": 0.2}], lr=0.1)
    for _ in range(STEPS):
        opt.step(loss)
    first = R.adahessian(prob, STEPS, lr=0.05)[-1][0]
    second = R.adahessian(prob, STEPS, lr=0.1, weight_decay=0.2)[-1][1]
    assert R.max_error([[ps[0].detach().numpy(), ps[1].detach().numpy()]], [[first, second]]) < 1e-12


# --- the estimate on a network, against a dense Hessian -------------------------------------------
def _net(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3)).double()
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    return model, x, y, torch.nn.CrossEntropyLoss()


@pytest.mark.parametrize("official", [False, True], ids=["closure", "official-pattern"])
def test_adahessian_first_step_uses_the_probe_it_drew_on_the_dense_hessian(official):
    """After step 1, v = (1 − β₂)·D² with D = z ⊙ Hz averaged over the conv kernel; z is the probe
    of (seed, step 1) as curvop draws it, H the dense Hessian (not curvop's)."""
    model, x, y, loss_fn = _net()
    Hd = dense_hessian(model, loss_fn, [(x, y)])
    params = list(model.parameters())
    opt = co.AdaHessian(params, lr=0.01, seed=5, num_probes=2)
    if official:
        loss_fn(model(x), y).backward(create_graph=True)
        opt.step()
    else:
        opt.step(lambda: loss_fn(model(x), y))
    Z = random_probes(probe_rng(5, 1), (Hd.shape[0], 2))
    D = (Z * (Hd @ Z)).mean(axis=1)
    parts = np.split(D, np.cumsum([p.numel() for p in params])[:-1])
    for p, d in zip(params, parts):
        d = d.reshape(p.shape)
        if p.dim() == 4:
            d = np.broadcast_to(d.mean(axis=(2, 3), keepdims=True), p.shape)
        np.testing.assert_allclose(opt.state[p]["exp_hessian_diag_sq"].numpy(), 0.001 * d**2, rtol=1e-9, atol=1e-20)
        assert p.grad is not None and p.grad.grad_fn is None  # a plain gradient is left, no graph


def test_sophia_h_curvature_is_the_dense_diagonal_estimate_on_curvature_steps_only(monkeypatch):
    """Steps 1 and 3 (every=2) take Hessian-vector products, step 2 none; h after step 1 is
    (1 − β₂)·z ⊙ Hz with the dense H and the probe of (seed, 1)."""
    import curvop.backends.torch.graph as G

    model, x, y, loss_fn = _net(1)
    params = list(model.parameters())
    opt = co.SophiaH(params, lr=1e-3, every=2, seed=3)
    products = []
    real = G._reverse_product
    monkeypatch.setattr(G, "_reverse_product", lambda *a, **k: products.append(1) or real(*a, **k))
    Hd = dense_hessian(model, loss_fn, [(x, y)])
    counts = []
    opt.step(lambda: loss_fn(model(x), y))
    counts.append(len(products))
    z = random_probes(probe_rng(3, 1), (Hd.shape[0], 1))[:, 0]
    h1 = 0.01 * z * (Hd @ z)
    got = torch.cat([opt.state[p]["hessian"].reshape(-1) for p in params]).numpy()
    np.testing.assert_allclose(got, h1, rtol=1e-9, atol=1e-18)
    for _ in range(2):
        opt.step(lambda: loss_fn(model(x), y))
        counts.append(len(products))
        if len(counts) == 2:
            np.testing.assert_array_equal(torch.cat([opt.state[p]["hessian"].reshape(-1) for p in params]).numpy(),
                                          got)
    assert counts[0] >= 1 and counts[1] == counts[0] and counts[2] == counts[1] + 1  # one probe at step 3


def test_operator_is_built_once_with_its_checks_then_moved_to_each_steps_graph(monkeypatch):
    """curvop.hessian_of runs at the first step only, with the symmetry check (no determinism check:
    every product is on the step's one graph); the next steps' products are of their own graph (the dense H at the moved
    parameters, the probe of (seed, t)); check=False builds without checks."""
    import curvop.optim.torch as T

    builds = []
    real = curvop.hessian_of
    monkeypatch.setattr(T.curvop, "hessian_of", lambda *a, **k: builds.append(k) or real(*a, **k))
    model, x, y, loss_fn = _net(3)
    params = list(model.parameters())
    opt = co.AdaHessian(params, lr=0.05, seed=2)
    for t in range(1, 4):
        Hd = dense_hessian(model, loss_fn, [(x, y)])
        before = [opt.state[p]["exp_hessian_diag_sq"].clone() for p in params] if t > 1 else None
        opt.step(lambda: loss_fn(model(x), y))
        z = random_probes(probe_rng(2, t), (Hd.shape[0], 1))[:, 0]
        D = np.split(z * (Hd @ z), np.cumsum([p.numel() for p in params])[:-1])
        for i, (p, d) in enumerate(zip(params, D)):
            d = d.reshape(p.shape)
            if p.dim() == 4:
                d = np.broadcast_to(d.mean(axis=(2, 3), keepdims=True), p.shape)
            v0 = 0.0 if before is None else 0.999 * before[i].numpy()
            np.testing.assert_allclose(opt.state[p]["exp_hessian_diag_sq"].numpy(), v0 + 0.001 * d**2,
                                       rtol=1e-9, atol=1e-20)
    assert len(builds) == 1 and not builds[0]["check_deterministic"] and builds[0]["check_symmetric"]
    loss_fn(model(x), y).backward(create_graph=True)
    opt.step()  # the official pattern: another graph form, built once more, symmetry-checked
    assert len(builds) == 2 and not builds[1]["check_deterministic"] and builds[1]["check_symmetric"]
    co.AdaHessian(params, check=False).step(lambda: loss_fn(model(x), y))
    assert not builds[2]["check_deterministic"] and not builds[2]["check_symmetric"]


@pytest.mark.parametrize("name", ["adahessian", "sophia_h"])
def test_a_dropout_closure_is_evaluated_once_per_step_and_accepted(name):
    """Every product of a step is taken on that step's one graph, so a loss with dropout is the
    step's own sampled loss (as in the official AdaHessian): no determinism check, which would run
    the user's closure a second time (and refuse dropout) at the first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    calls = []

    def closure():
        calls.append(1)
        return torch.nn.functional.cross_entropy(model(x), y)

    opt = co.AdaHessian(model.parameters()) if name == "adahessian" else co.SophiaH(model.parameters(), every=1)
    for step in range(1, 4):
        assert opt.step(closure) is not None
        assert len(calls) == step


# --- state, seeds, reproducibility ---------------------------------------------------------------
def _make(name, params):
    if name == "adahessian":
        return co.AdaHessian(params, lr=0.02, seed=1)
    if name == "sophia_h":
        return co.SophiaH(params, lr=0.01, every=3, seed=1)
    return co.SophiaG(params, lr=0.01, every=3, seed=1, loss_fn=torch.nn.CrossEntropyLoss())


def _closure(name, model, x, y, loss_fn):
    if name == "sophia_g":
        return lambda: (model(x), y)
    return lambda: loss_fn(model(x), y)


@pytest.mark.parametrize("name", ["adahessian", "sophia_h", "sophia_g"])
def test_state_dict_round_trip_continues_the_same_run(name):
    """10 steps straight, and 4 steps + state_dict into a fresh optimizer + 6 steps: the same bits."""
    model, x, y, loss_fn = _net(2)
    start = [p.detach().clone() for p in model.parameters()]
    opt = _make(name, list(model.parameters()))
    for _ in range(10):
        opt.step(_closure(name, model, x, y, loss_fn))
    straight = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    opt = _make(name, list(model.parameters()))
    for _ in range(4):
        opt.step(_closure(name, model, x, y, loss_fn))
    saved = opt.state_dict()
    opt = _make(name, list(model.parameters()))
    opt.load_state_dict(saved)
    for _ in range(6):
        opt.step(_closure(name, model, x, y, loss_fn))
    for p, s in zip(model.parameters(), straight):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adahessian", "sophia_h", "sophia_g"])
def test_probes_are_seeded_and_leave_torch_rng_alone(name):
    def run(seed):
        model, x, y, loss_fn = _net(4)
        opt = _make(name, list(model.parameters()))
        for g in opt.param_groups:
            g["seed"] = seed
        torch.manual_seed(123)
        for _ in range(4):
            opt.step(_closure(name, model, x, y, loss_fn))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.rand(1)

    (a, ra), (b, rb), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert not torch.equal(a, c)
    torch.manual_seed(123)
    assert torch.equal(ra, torch.rand(1))  # the optimizer drew nothing from torch's generator


# --- errors ------------------------------------------------------------------------------------------
def test_official_pattern_without_create_graph_is_a_clear_error():
    model, x, y, loss_fn = _net()
    opt = co.AdaHessian(model.parameters())
    loss_fn(model(x), y).backward()
    with pytest.raises(ValueError, match="create_graph=True"):
        opt.step()


def test_closure_that_calls_backward_is_a_clear_error():
    model, x, y, loss_fn = _net()

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for opt in (co.AdaHessian(model.parameters()), co.SophiaH(model.parameters(), every=2)):
        with pytest.raises(RuntimeError, match="called loss.backward()"):
            opt.step(closure)


def test_sophia_needs_a_closure_and_sophia_g_a_supported_loss():
    model, x, y, loss_fn = _net()
    with pytest.raises(TypeError, match="needs a closure"):
        co.SophiaH(model.parameters()).step()
    with pytest.raises(TypeError, match="CrossEntropyLoss, MSELoss or BCEWithLogitsLoss"):
        co.SophiaG(model.parameters(), loss_fn=torch.nn.L1Loss())
    with pytest.raises(ValueError, match="label-smoothed"):
        co.SophiaG(model.parameters(), loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(TypeError, match=r"returns \(outputs, targets\)"):
        co.SophiaG(model.parameters(), loss_fn=loss_fn).step(lambda: loss_fn(model(x), y))
    with pytest.raises(ValueError, match="every must be a positive integer"):
        co.SophiaH(model.parameters(), every=0)


# --- Sophia-G's sampler: unbiased for the Gauss-Newton diagonal ------------------------------------
@pytest.mark.parametrize("kind", ["cross_entropy", "cross_entropy_ignored", "mse"])
def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal(kind):
    """Mean of ĥ = B·ĝ² over 3000 draws (the family's sampler) against diag(Jᵀ ∂²L/∂f² J) from
    torch.func (dense), within 4.5 standard errors in every entry; ignored targets stay ignored."""
    from curvop.optim.torch import _likelihood, gnb_targets

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss() if kind == "mse" else torch.nn.CrossEntropyLoss()
    y = torch.randn(5, 3, dtype=torch.float64) if kind == "mse" else torch.tensor([0, 1, 2, 1, 0])
    if kind == "cross_entropy_ignored":
        y[1] = -100
    params = dict(model.named_parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def outputs(flat):
        parts = {k: t.view(p.shape) for (k, p), t in zip(params.items(), torch.split(flat, sizes))}
        return torch.func.functional_call(model, parts, (x,))

    J = torch.func.jacrev(outputs)(flat0).reshape(15, -1)
    f0 = outputs(flat0).detach()
    Hf = torch.func.hessian(lambda f: loss_fn(f.view(5, 3), y))(f0.reshape(-1))
    want = torch.einsum("ip,ij,jp->p", J, Hf, J).numpy()
    out, likelihood = model(x), _likelihood(loss_fn)
    draws = []
    for seed in range(3000):
        sampled, scale = gnb_targets(loss_fn, likelihood, out, y, seed)
        g = torch.autograd.grad(loss_fn(out, sampled), list(model.parameters()), retain_graph=True)
        draws.append(scale * torch.cat([t.reshape(-1) for t in g]).square().numpy())
    draws = np.array(draws)
    z = (draws.mean(0) - want) / (draws.std(0, ddof=1) / np.sqrt(len(draws)) + 1e-300)
    assert np.max(np.abs(z)) < 4.5


@pytest.mark.parametrize("official", [False, True], ids=["closure", "official-pattern"])
def test_no_graph_or_batch_is_held_between_steps(official):
    """The operator kept from the first step holds neither that step's graph nor its closure (whose
    batch would stay alive, with every activation, until the next step)."""
    import gc
    import weakref

    model, x, y, loss_fn = _net(5)
    opt = co.AdaHessian(model.parameters(), lr=0.01)
    batch = x.clone()
    alive = weakref.ref(batch)
    if official:
        loss_fn(model(batch), y).backward(create_graph=True)
        opt.step()
        for p in model.parameters():
            p.grad = None
    else:
        opt.step(lambda: loss_fn(model(batch), y))
    del batch
    gc.collect()
    assert alive() is None
