"""Issue 14 item 5: ``curvop study edge-of-stability``."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from curvop.cli import main  # noqa: E402
from curvop.studies import edge_of_stability as eos  # noqa: E402


def test_issue14_item5_held_is_the_median_of_the_last_third_within_15_percent():
    steps = 300
    settled = [[s, 4.0 if s < 200 else 10.0 + (s - 250) / 100] for s in range(0, 301, 10)]
    ok, med = eos.held(settled, steps, eta=0.2)  # 2/eta = 10
    assert ok and med == pytest.approx(10.0)  # only steps >= 200 count
    assert not eos.held(settled, steps, eta=0.1)[0]  # 2/eta = 20: far below
    assert not eos.held([[s, 11.6] for s in range(0, 301, 10)], steps, eta=0.2)[0]  # +16 %
    assert eos.held([[s, 11.4] for s in range(0, 301, 10)], steps, eta=0.2)[0]  # +14 %


def test_issue14_item5_cli_writes_results_figure_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(eos, "QUICK", eos.Setting(etas=(0.6, 0.5, 0.4), steps=60, every=10, images=200, width=16))
    out = tmp_path / "eos"
    assert main(["study", "edge-of-stability", "--quick", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["eta"] for r in res["runs"]] == [0.6, 0.5, 0.4]
    for r in res["runs"]:
        assert r["threshold"] == pytest.approx(2 / r["eta"])
        steps = [s for s, _ in r["sharpness"]]
        assert steps == list(range(0, 61, 10)) and [s for s, _ in r["loss"]] == steps
        assert all(v > 0 for _, v in r["sharpness"]) and isinstance(r["held"], bool)
    assert (out / "sharpness.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| 0.6 | 3.333 |" in report and "curvop study edge-of-stability --quick --seed 0" in report


def test_issue14_item5_sharpness_is_lambda_max_of_the_dense_hessian():
    x, y = eos._data(50)
    model = eos._model(8, 0)
    m = __import__("curvop").SharpnessTracker(model, eos.squared_loss, (x, y), tol=1e-10)(0)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())

    def f(*ps):
        return eos.squared_loss(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    blocks = torch.autograd.functional.hessian(f, params)
    sizes = [p.numel() for p in params]
    D = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
                   for i in range(len(sizes))], 0).numpy()
    assert m.value == pytest.approx(np.linalg.eigvalsh(D)[-1], rel=1e-8)
