"""Issue 23: the optimizers' rules, framework-free.

The numpy float64 references (``tests/optim_reference.py``) are checked here against closed forms,
so that the framework tests (``test_optim_torch.py``, ``test_optim_jax.py``, ``test_optim_keras.py``)
compare every framework with references that are themselves right. Also: the shared rules module
(hyperparameter checks, the curvature schedule, the probes' seeds), one-probe Hutchinson, and the
layering (``curvop.optim`` imports no framework and no backend module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import curvop
import optim_reference as R
from curvop.optim.rules import check_adahessian, check_sophia, curvature_step, probe_rng

ROOT = Path(__file__).resolve().parents[1]


# --- the references against closed forms -----------------------------------------------------------
def test_adahessian_reference_without_averages_is_a_newton_step_scaled_by_lr():
    """β₁ = β₂ = 0, ε = 0, k = 1: p ← p − lr·g/|D| = p − lr·sign(a)(p − c), so p − c shrinks by (1 − lr)
    where a > 0 and grows by (1 + lr) where a < 0."""
    prob = R.quadratic(shapes=((6,),), negative=True)
    traj = R.adahessian(prob, 4, lr=0.3, betas=(0.0, 0.0), eps=0.0)
    a, c, p0 = prob.a[0], prob.c[0], prob.p0[0]
    for t, (p,) in enumerate(traj, start=1):
        np.testing.assert_allclose(p - c, (p0 - c) * (1 - 0.3 * np.sign(a)) ** t, rtol=1e-13)


def test_adahessian_reference_first_step_is_a_sign_step_of_length_lr():
    """Bias correction makes step 1 ``lr·g/(|D|+ε)`` whatever β; with hessian_power 0 it is ``lr·g/(1+ε)``."""
    prob = R.quadratic(shapes=((4,),))
    g, a = prob.grad(list(prob.p0))[0], prob.a[0]
    (p1,), = R.adahessian(prob, 1, lr=0.1, eps=1e-4)
    np.testing.assert_allclose(p1, prob.p0[0] - 0.1 * g / (np.abs(a) + 1e-4), rtol=1e-14)
    (q1,), = R.adahessian(prob, 1, lr=0.1, eps=1e-4, hessian_power=0.0, weight_decay=0.5)
    np.testing.assert_allclose(q1, prob.p0[0] * (1 - 0.05) - 0.1 * g / (1 + 1e-4), rtol=1e-14)


def test_adahessian_reference_averages_d_over_the_kernel_of_4d_weights():
    prob = R.quadratic(shapes=((2, 3, 2, 2),))
    (p1,), = R.adahessian(prob, 1, lr=0.1, eps=0.0)
    D = prob.a[0].mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(p1, prob.p0[0] - 0.1 * prob.grad(list(prob.p0))[0] / D, rtol=1e-14)
    np.testing.assert_allclose(R.kernel_mean(prob.a[0], (0, 1)), np.broadcast_to(prob.a[0].mean(axis=(0, 1)), (2, 3, 2, 2)))


def test_sophia_reference_clips_and_refreshes_every_k_steps():
    """β₁ = 0 (m = g): a step is ``lr·sign(g)·min(|g|/max(ρh, ε), 1)``; h = (1 − β₂)·a after step 1 and
    changes only on steps 1 + k·every."""
    prob = R.quadratic(shapes=((5,),), negative=True, seed=2)
    a, c = prob.a[0], prob.c[0]
    b2, rho, lr, eps = 0.5, 2.0, 0.1, 1e-12
    traj = R.sophia(prob, 5, lr=lr, betas=(0.0, b2), rho=rho, weight_decay=0.0, eps=eps, every=3)
    p, h = prob.p0[0].copy(), np.zeros(5)
    for t in range(1, 6):
        if t in (1, 4):
            h = b2 * h + (1 - b2) * a
        g = a * (p - c)
        p = p - lr * np.sign(g) * np.minimum(np.abs(g) / np.maximum(rho * h, eps), 1.0)
        np.testing.assert_allclose(traj[t - 1][0], p, rtol=1e-14)
    # negative curvature: max(ρh, ε) = ε, the step is a full sign step
    neg = a < 0
    assert neg.any()
    step1 = traj[0][0] - prob.p0[0]
    np.testing.assert_allclose(np.abs(step1[neg]), lr, rtol=1e-14)


def test_sophia_reference_weight_decay_is_decoupled():
    prob = R.quadratic(shapes=((3,),))
    plain = R.sophia(prob, 1, lr=0.1, weight_decay=0.0)[0][0]
    decayed = R.sophia(prob, 1, lr=0.1, weight_decay=0.3)[0][0]
    np.testing.assert_allclose(decayed, plain - 0.1 * 0.3 * prob.p0[0], rtol=1e-14)


# --- the shared rules --------------------------------------------------------------------------------
def test_curvature_steps_are_one_then_every_k():
    assert [t for t in range(1, 31) if curvature_step(t, 10)] == [1, 11, 21]
    assert all(curvature_step(t, 1) for t in range(1, 5))


def test_probe_rng_depends_on_seed_and_step_only():
    a = probe_rng(3, 7).integers(0, 2**31, 4)
    assert np.array_equal(a, probe_rng(3, 7).integers(0, 2**31, 4))
    assert not np.array_equal(a, probe_rng(3, 8).integers(0, 2**31, 4))
    assert not np.array_equal(a, probe_rng(4, 7).integers(0, 2**31, 4))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"betas": (0.9,)}, "betas must be a pair"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\] must be >= 0 and < 1"),
    ({"eps": float("nan")}, "eps must be"),
    ({"hessian_power": 1.5}, "hessian_power must be >= 0 and <= 1"),
    ({"num_probes": 0}, "num_probes must be a positive integer"),
])
def test_adahessian_hyperparameters_are_checked(kwargs, match):
    args = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        check_adahessian(**args)


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0.0}, "rho must be > 0"),
    ({"every": 0}, "every must be a positive integer"),
    ({"every": 2.5}, "every must be a positive integer"),
    ({"weight_decay": "0.1"}, "weight_decay must be a number"),
])
def test_sophia_hyperparameters_are_checked(kwargs, match):
    args = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, eps=1e-15, every=10) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        check_sophia(**args)


# --- one-probe Hutchinson (what AdaHessian and Sophia-H use) -------------------------------------
def test_one_probe_hutchinson_is_exact_on_a_diagonal_and_has_no_stderr():
    a = np.array([3.0, -1.0, 0.5, 2.0, 7.0])
    r = curvop.diagonal(np.diag(a), num_matvecs=1, seed=4)
    np.testing.assert_array_equal(r.estimate, a)
    assert np.isnan(r.stderr).all() and r.num_matvecs == 1 and r.num_probes == 1


def test_one_probe_hutchinson_is_unbiased():
    """z ⊙ Az over 4000 seeds: the mean is within 4.5 standard errors of diag(A) in every entry."""
    rng = np.random.default_rng(0)
    B = rng.normal(size=(12, 12))
    A = B + B.T
    est = np.array([curvop.diagonal(A, num_matvecs=1, seed=s).estimate for s in range(4000)])
    z = (est.mean(0) - np.diag(A)) / (est.std(0, ddof=1) / np.sqrt(len(est)))
    assert np.max(np.abs(z)) < 4.5


# --- layering -----------------------------------------------------------------------------------------
#: What an optimizer may take from a framework package: the curvature family's public target
#: sampling (Sophia-G draws its targets as the Monte-Carlo Fisher does, issue 23)
SAMPLING = {"sample_targets", "likelihood_of"}


def test_optim_modules_import_no_backend_module():
    """Optimizers sit beside tracking: they build operators and call algorithms, never a backend's
    modules; from a framework package only its public target sampling."""
    packages = {f"curvop.backends.{fw}" for fw in ("torch", "jax", "tensorflow")}
    for path in (ROOT / "curvop" / "optim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in packages:
                assert {a.name for a in node.names} <= SAMPLING, f"{path.name} imports {node.module}"
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("curvop.backends") for n in names), f"{path.name} imports {names}"


def test_import_curvop_optim_loads_no_framework():
    code = ("import sys, curvop.optim, curvop.optim.rules; "
            "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'keras', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]"
