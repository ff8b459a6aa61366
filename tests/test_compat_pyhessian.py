"""curvop.compat.pyhessian against PyHessian itself (issue 16, item 1).

PyHessian's README / example-script pattern runs twice, once with ``from pyhessian import hessian``
and once with ``from curvop.compat.pyhessian import hessian``, nothing else changed. References are
independent of both: a dense float64 Hessian from ``torch.func.hessian``.
"""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import curvop  # noqa: E402
from curvop.compat.pyhessian import CompatWarning, hessian  # noqa: E402
from curvop.compat.pyhessian.density_plot import density_generate, get_esd_plot  # noqa: E402

SCRIPT = """
import numpy as np
import torch
{import_line}

torch.manual_seed(1)
model.eval()
criterion = torch.nn.CrossEntropyLoss()
hessian_comp = hessian(model, criterion, data=(inputs, targets), cuda=False)
top_eigenvalues, top_eigenvector = hessian_comp.eigenvalues(top_n=2{eig_kwargs})
trace = hessian_comp.trace()
"""
DENSITY = """
density_eigen, density_weight = hessian_comp.density()
"""
PYHESSIAN = "from pyhessian import hessian"
CURVOP = "from curvop.compat.pyhessian import hessian"


def _model(seed: int = 0, batchnorm: bool = True):
    """A small MLP (with BatchNorm) on digits, briefly trained: 64 -> 12 -> 10, 934 parameters."""
    torch.manual_seed(seed)
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 12)]
    layers += [torch.nn.BatchNorm1d(12)] if batchnorm else []
    model = torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(12, 10))
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def _data(n: int = 200):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[:n] / 16.0, dtype=torch.float32), torch.tensor(d.target[:n])


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x, y = _data()
    return model, x, y, _dense(model, x, y)


def _dense(model, x, y) -> np.ndarray:
    """The float64 Hessian of the eval-mode loss over (x, y), by torch.func.hessian (no curvop)."""
    m = copy.deepcopy(model).double().eval()
    names = [k for k, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    buffers = dict(m.named_buffers())

    def loss(w):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = w[i: i + s.numel()].view(s)
            i += s.numel()
        out = torch.func.functional_call(m, (parts, buffers), (x.double(),))
        return torch.nn.functional.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat).numpy()


class Counter:
    """Counts PyHessian's Hessian-vector products (single batch and data loader paths)."""

    def __init__(self, monkeypatch):
        self.n = 0
        module = sys.modules["pyhessian.hessian"]
        hvp, loader = module.hessian_vector_product, module.hessian.dataloader_hv_product

        def counted_hvp(*a, **k):
            self.n += 1
            return hvp(*a, **k)

        def counted_loader(*a, **k):
            self.n += 1
            return loader(*a, **k)

        monkeypatch.setattr(module, "hessian_vector_product", counted_hvp)
        monkeypatch.setattr(module.hessian, "dataloader_hv_product", counted_loader)


def _run(import_line: str, model, x, y, eig_kwargs: str = "", density: bool = False) -> dict:
    ns = {"model": copy.deepcopy(model), "inputs": x, "targets": y}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyHessian's backward(create_graph=True) warning
        exec(SCRIPT.format(import_line=import_line, eig_kwargs=eig_kwargs) + (DENSITY if density else ""), ns)
    return ns


def _products(ns: dict, counter: Counter | None) -> int:
    return counter.n if counter is not None else ns["hessian_comp"].operator.num_matvecs


def test_issue16_item1_readme_script_same_eigenvalues_and_trace_in_fewer_products(setup, monkeypatch, capsys):
    pytest.importorskip("pyhessian")
    model, x, y, dense = setup
    exact = np.linalg.eigvalsh(dense)
    top2 = exact[np.argsort(-np.abs(exact))[:2]]
    counter = Counter(monkeypatch)

    ours = _run(CURVOP, model, x, y)
    ours_eig = ours["hessian_comp"].operator.num_matvecs - len(ours["trace"])
    before = counter.n
    theirs = _run(PYHESSIAN, model, x, y)
    their_eig = counter.n - before - len(theirs["trace"])
    before = counter.n
    converged = _run(PYHESSIAN, model, x, y, eig_kwargs=", maxIter=2000, tol=1e-7")
    converged_eig = counter.n - before - len(converged["trace"])

    # the same top eigenvalues to 1e-3: ours (default tol) against PyHessian run to convergence
    np.testing.assert_allclose(ours["top_eigenvalues"], converged["top_eigenvalues"], rtol=1e-3)
    # ... and ours against the exact float64 eigenvalues, to the tol asked for (1e-3)
    np.testing.assert_allclose(ours["top_eigenvalues"], top2, rtol=1e-3)
    their_err = np.abs(np.asarray(theirs["top_eigenvalues"]) - top2) / np.abs(top2)
    our_err = np.abs(np.asarray(ours["top_eigenvalues"]) - top2) / np.abs(top2)
    # fewer products than PyHessian at its defaults, which is less accurate
    assert ours_eig < their_eig, (ours_eig, their_eig)
    assert our_err.max() < their_err.max()

    # trace means within their combined standard errors (3 of them); unbiasedness: the test below
    (mo, so), (mt, st) = _mean_se(ours["trace"]), _mean_se(theirs["trace"])
    assert abs(mo - mt) <= 3 * np.hypot(so, st), (mo, so, mt, st)
    with capsys.disabled():
        print(f"\n[issue16] top-2 eigenvalues: curvop {ours_eig} products (max rel err {our_err.max():.1e}), "
              f"PyHessian defaults {their_eig} (max rel err {their_err.max():.1e}), PyHessian to tol 1e-7 "
              f"{converged_eig}; trace: curvop {len(ours['trace'])} samples {mo:.4g} ± {so:.2g}, PyHessian "
              f"{len(theirs['trace'])} samples {mt:.4g} ± {st:.2g}, exact {np.trace(dense):.4g}")


def _mean_se(samples):
    return np.mean(samples), np.std(samples, ddof=1) / np.sqrt(len(samples))


def test_issue16_item1_trace_samples_are_unbiased_hutchinson_samples(setup):
    model, x, y, dense = setup
    samples = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False, seed=0).trace(maxIter=1000, tol=0)
    mean, se = _mean_se(samples)
    assert len(samples) == 1000 and abs(mean - np.trace(dense)) <= 3 * se
    # Rademacher probes: the per-sample variance is 2 (||H||_F^2 - sum diag^2)
    var = 2 * (np.sum(dense**2) - np.sum(np.diag(dense) ** 2))
    assert np.var(samples, ddof=1) == pytest.approx(var, rel=0.15)


def test_issue16_item1_density_runs_where_pyhessian_crashes(setup, tmp_path, monkeypatch):
    model, x, y, dense = setup
    monkeypatch.chdir(tmp_path)
    if pytest.importorskip("pyhessian") and not hasattr(torch, "eig"):
        with pytest.raises(AttributeError, match="eig"):
            _run(PYHESSIAN, model, x, y, density=True)
    ns = _run(CURVOP, model, x, y, density=True)
    eigen, weight = ns["density_eigen"], ns["density_weight"]
    assert len(eigen) == len(weight) == 1 and len(eigen[0]) == len(weight[0]) == 100
    assert all(isinstance(v, float) for v in eigen[0] + weight[0])
    assert abs(sum(weight[0]) - 1) < 1e-9
    exact = np.linalg.eigvalsh(dense)
    # Ritz values lie inside the spectrum (float32 products: up to rounding), the largest converged
    scale = np.abs(exact).max()
    assert min(eigen[0]) >= exact[0] - 1e-4 * scale and max(eigen[0]) <= exact[-1] + 1e-4 * scale
    assert max(eigen[0]) == pytest.approx(exact[-1], rel=1e-4)
    get_esd_plot(eigen, weight)  # PyHessian's plot, written where PyHessian writes it
    assert (tmp_path / "example.pdf").stat().st_size > 1000


def test_issue16_item1_products_equal_pyhessian_single_batch_and_loader(setup):
    pytest.importorskip("pyhessian")
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    model, x, y, _ = setup
    torch.manual_seed(3)
    v = [torch.randn_like(p) for p in model.parameters()]
    ref = PyHessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    expected = hessian_vector_product(ref.gradsH, ref.params, v)
    _, got = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False).dataloader_hv_product(v)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

    loader = [(x[:120], y[:120]), (x[120:], y[120:])]  # unequal batches: weighted by size in both
    ref = PyHessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False)
    e_vhv, expected = ref.dataloader_hv_product(v)
    g_vhv, got = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False).dataloader_hv_product(v)
    assert g_vhv == pytest.approx(e_vhv, rel=1e-4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), rtol=1e-4, atol=1e-5)


def test_issue16_item1_eigenvectors_are_lists_of_per_parameter_tensors(setup):
    model, x, y, dense = setup
    hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values, vectors = hc.eigenvalues(top_n=3, tol=1e-4)
    exact = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(values, exact[np.argsort(-np.abs(exact))[:3]], rtol=1e-4)
    assert all(isinstance(v, float) for v in values) and len(vectors) == 3
    for lam, vec in zip(values, vectors):
        assert [t.shape for t in vec] == [p.shape for p in model.parameters()]
        flat = torch.cat([t.reshape(-1) for t in vec]).double().numpy()
        assert np.linalg.norm(flat) == pytest.approx(1.0, rel=1e-5)
        assert np.linalg.norm(dense @ flat - lam * flat) <= 1e-3 * abs(lam)


def test_issue16_item1_cuda_true_without_cuda_is_a_clear_error(setup):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, x, y, _ = setup
    with pytest.raises(RuntimeError, match="no CUDA device.*pass cuda=False"):
        hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y))  # PyHessian's default is cuda=True


def test_issue16_item1_model_mode_grads_buffers_and_rng_untouched(setup):
    model, x, y, dense = setup
    m = copy.deepcopy(model).train()  # PyHessian puts the model in eval mode and leaves it there
    stats = {k: b.clone() for k, b in m.named_buffers()}
    rng = torch.get_rng_state()
    hc = hessian(m, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values, _ = hc.eigenvalues()
    hc.trace(maxIter=10)
    hc.density(iter=5)
    assert all(mod.training for mod in m.modules())
    assert all(torch.equal(b, stats[k]) for k, b in m.named_buffers())
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    exact = np.linalg.eigvalsh(dense)  # the eval-mode Hessian, as PyHessian computes it
    assert values[0] == pytest.approx(exact[np.argmax(np.abs(exact))], rel=1e-3)


def test_issue16_item1_bad_input_and_unconverged_results_are_reported(setup):
    model, x, y, _ = setup
    crit = torch.nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="exactly one of data"):
        hessian(model, crit, cuda=False)
    with pytest.raises(ValueError, match="exactly one of data"):
        hessian(model, crit, data=(x, y), dataloader=[(x, y)], cuda=False)
    hc = hessian(model, crit, data=(x, y), cuda=False)
    with pytest.raises(ValueError, match="top_n"):
        hc.eigenvalues(top_n=0)
    with pytest.warns(CompatWarning, match="raise maxIter"):
        hc.eigenvalues(maxIter=2, tol=1e-8)
    with pytest.raises(AttributeError, match="hc.operator"):
        hc.gradsH  # noqa: B018


def test_issue16_item1_repeatable_under_torch_manual_seed(setup):
    model, x, y, _ = setup
    crit = torch.nn.CrossEntropyLoss()
    torch.manual_seed(5)
    a = hessian(model, crit, data=(x, y), cuda=False)
    first, second = a.trace(maxIter=10), a.trace(maxIter=10)
    torch.manual_seed(5)
    assert hessian(model, crit, data=(x, y), cuda=False).trace(maxIter=10) == first
    assert first != second  # each call draws new probes, as PyHessian's do


def test_issue16_item1_trace_stops_on_its_standard_error(setup):
    model, x, y, _ = setup
    hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False, seed=0)
    loose = hc.trace(maxIter=100, tol=0.5)
    assert len(loose) == 10  # the first block of 10 already has stderr <= 0.5 |mean|
    assert np.std(loose, ddof=1) / np.sqrt(10) <= 0.5 * abs(np.mean(loose))
    assert len(hc.trace(maxIter=37, tol=1e-9)) == 37


def test_issue16_item1_density_generate_is_pyhessians_curve():
    eig = [[-1.0, 0.5, 3.0], [-0.5, 1.0, 2.5]]
    w = [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]]
    density, grid = density_generate(eig, w, num_bins=2001)
    # independently: Gaussians of variance 1e-5 * max(1, width) on [mean min - 0.01, mean max + 0.01]
    lo, hi = np.mean([-1.0, -0.5]) - 0.01, np.mean([3.0, 2.5]) + 0.01
    var = 1e-5 * max(1.0, hi - lo)
    g = np.linspace(lo, hi, 2001)
    ref = np.mean([sum(wj * np.exp(-(g - e) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)
                       for e, wj in zip(es, ws)) for es, ws in zip(eig, w)], axis=0)
    ref /= ref.sum() * (g[1] - g[0])
    np.testing.assert_allclose(grid, g)
    np.testing.assert_allclose(density, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="equal-length"):
        density_generate([[1.0, 2.0]], [[1.0]])


@pytest.mark.gpu
def test_issue16_item1_cuda_true_on_a_gpu_matches_pyhessian(setup):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("pyhessian")
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    model, x, y, dense = setup
    gpu = copy.deepcopy(model).cuda()
    torch.manual_seed(3)
    v = [torch.randn_like(p) for p in gpu.parameters()]
    ref = PyHessian(copy.deepcopy(gpu), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=True)
    expected = hessian_vector_product(ref.gradsH, ref.params, v)
    hc = hessian(gpu, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=True)  # data moved to the GPU
    _, got = hc.dataloader_hv_product(v)
    for g, e in zip(got, expected):
        assert g.is_cuda
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    values, vectors = hc.eigenvalues(top_n=2)
    exact = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(values, exact[np.argsort(-np.abs(exact))[:2]], rtol=1e-3)
    assert all(t.is_cuda for t in vectors[0])
    with pytest.raises(ValueError, match="call model.cuda"):
        hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=True)  # model left on the CPU


def products_table(seeds: int = 5) -> str:
    """PyHessian 0.1 against the compat layer at PyHessian's defaults: products and relative errors.

    The table of docs/pyhessian.md: ``PYTHONPATH=. python tests/test_compat_pyhessian.py``.
    """
    import pyhessian  # noqa: F401

    module = sys.modules["pyhessian.hessian"]
    count = {"n": 0}
    hvp = module.hessian_vector_product

    def counted(*a, **k):
        count["n"] += 1
        return hvp(*a, **k)

    module.hessian_vector_product = counted
    model, (x, y) = _model(), _data()
    dense = _dense(model, x, y)
    exact = np.linalg.eigvalsh(dense)
    top, tr = exact[np.argsort(-np.abs(exact))[:2]], np.trace(dense)
    rows: dict = {}
    for name, cls in (("PyHessian 0.1", module.hessian), ("curvop.compat.pyhessian", hessian)):
        for seed in range(seeds):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                hc = cls(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            used = (lambda: count["n"]) if cls is module.hessian else (lambda: hc.operator.num_matvecs)  # noqa: B023
            for key, call in (("eigenvalues()", lambda: hc.eigenvalues()),  # noqa: B023
                              ("eigenvalues(top_n=2)", lambda: hc.eigenvalues(top_n=2)),  # noqa: B023
                              ("trace()", lambda: hc.trace())):  # noqa: B023
                before = used()
                out = call()
                if key == "trace()":
                    err = abs(np.mean(out) - tr) / abs(tr)
                else:
                    k = len(out[0])
                    err = float(np.max(np.abs(np.asarray(out[0]) - top[:k]) / np.abs(top[:k])))
                rows.setdefault((name, key), []).append((used() - before, err))
    module.hessian_vector_product = hvp
    lines = ["| library | call | products: mean (range) | max relative error |", "|---|---|---|---|"]
    for (name, key), values in rows.items():
        a = np.asarray(values)
        lines.append(f"| {name} | `{key}` | {a[:, 0].mean():.1f} ({int(a[:, 0].min())}-{int(a[:, 0].max())}) "
                     f"| {a[:, 1].max():.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(products_table())


def test_issue26_item4_pyhessian_drop_in_takes_pytree_batches():
    """A packed-sequence batch (data=) and a loader of namedtuple batches with dict inputs holding a
    string (dataloader=): products equal a double-backward float64 reference."""
    from collections import namedtuple

    from torch.nn.utils.rnn import pack_padded_sequence

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = torch.nn.GRU(3, 4, batch_first=True), torch.nn.Linear(4, 2)

        def forward(self, packed, mode="last"):
            assert mode == "last"
            return self.head(self.rnn(packed)[1][0])

    torch.manual_seed(0)
    model = Net().double()
    seq, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    packed = pack_padded_sequence(seq, torch.tensor([5, 4, 2]), batch_first=True)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def reference(batches):
        n = sum(len(b[1]) for b in batches)
        loss = sum(torch.nn.functional.cross_entropy(model(**b[0]) if isinstance(b[0], dict) else model(b[0]), b[1])
                   * len(b[1]) for b in batches) / n
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    _, got = hessian(model, torch.nn.CrossEntropyLoss(), data=(packed, y), cuda=False).dataloader_hv_product(v)
    for g, e in zip(got, reference([(packed, y)])):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    Batch = namedtuple("Batch", "inputs targets")
    loader = [Batch({"packed": packed, "mode": "last"}, y), Batch({"packed": packed, "mode": "last"}, y)]
    _, got = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False).dataloader_hv_product(v)
    for g, e in zip(got, reference(loader)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# --- issue 26: the native API on hc.operator never changes what the operator computes ---------------
@pytest.mark.parametrize("loader", [False, True])
def test_issue26_native_calls_on_hc_operator_of_a_train_mode_model_keep_the_eval_hessian(setup, loader):
    # docs/pyhessian.md's pattern: curvop.eigenvalues(hc.operator, ...) on a BatchNorm + dropout model in
    # training mode. The products ran the model in its own (training) mode and wrote the operator's copies
    # of the BatchNorm statistics, so hc.eigenvalues() afterwards gave 2.197 instead of 1.365.
    model, x, y, dense = setup
    m = copy.deepcopy(model)
    m.insert(3, torch.nn.Dropout(0.3))  # Flatten, Linear, BatchNorm, Dropout, Tanh, Linear
    m.train()
    stats = {k: b.clone() for k, b in m.named_buffers()}
    data = dict(dataloader=[(x[:100], y[:100]), (x[100:], y[100:])]) if loader else dict(data=(x, y))
    hc = hessian(m, torch.nn.CrossEntropyLoss(), cuda=False, seed=0, **data)
    before, _ = hc.eigenvalues(tol=1e-6)
    exact = np.linalg.eigvalsh(dense)  # the eval-mode Hessian (dropout off, running statistics)
    assert before[0] == pytest.approx(exact[np.argmax(np.abs(exact))], rel=1e-4)
    native = curvop.eigenvalues(hc.operator, k=2, which="LM", seed=0)  # the model is in training mode here
    assert native.converged and native.eigenvalues[0] == pytest.approx(before[0], rel=1e-4)
    curvop.trace(hc.operator, num_matvecs=10, seed=0)
    after, _ = hc.eigenvalues(tol=1e-6)
    assert after[0] == pytest.approx(before[0], rel=1e-5)
    v = torch.randn(hc.operator.shape[0])
    np.testing.assert_allclose((hc.operator @ v).double().numpy(), dense @ v.double().numpy(), rtol=1e-3, atol=1e-4)
    assert all(mod.training for mod in m.modules())  # the model's own mode was never changed
    assert all(torch.equal(b, stats[k]) for k, b in m.named_buffers())


def test_issue22_ggn_option_analyses_the_gauss_newton_matrix(setup):
    from curvature_reference import dense_ggn

    model, x, y, _ = setup
    model = copy.deepcopy(model).double()
    hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x.double(), y), cuda=False, curvature="ggn")
    top, _ = hc.eigenvalues(top_n=1, tol=1e-8)
    dense = dense_ggn(model, torch.nn.CrossEntropyLoss(), [(x.double(), y)])
    assert top[0] == pytest.approx(np.linalg.eigvalsh(dense)[-1], rel=1e-6)
    assert hc.operator.is_psd
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False, curvature="fisher")
