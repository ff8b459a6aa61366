"""Issue 23 item 5: ``curvop study optimizers`` (the ``--quick`` run, and the verdict rules)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from curvop.cli import main  # noqa: E402
from curvop.studies import optimizers as study  # noqa: E402


def _summary(steps: dict[str, list[float]], reached: dict[str, int] | None = None) -> dict:
    runs = []
    for name, values in steps.items():
        for i, v in enumerate(values):
            hit = reached is None or i < reached.get(name, len(values))
            runs.append({"optimizer": name, "lr": 0.1, "reached": [v, v / 100] if hit else None, "ms_per_step": 1.0})
    return study.summarize(runs)


def test_verdicts_follow_the_stated_rules():
    costs = {"AdamW": 1.0, "AdaHessian": 3.0, "Sophia-H": 1.04, "Sophia-G": 1.2}
    s = _summary({"AdamW": [100, 104, 96, 100, 100], "AdaHessian": [60, 62, 58, 60, 60],
                  "Sophia-H": [50, 52, 48, 50, 50], "Sophia-G": [99, 101, 100, 98, 102]})
    v = {d["claim"]: d for d in study.verdicts(s, costs)}
    assert v["AdaHessian reaches the loss in fewer steps than AdamW (Yao et al.)"]["verdict"] == "reproduces"
    assert v["... and in less wall-clock time than AdamW"]["verdict"] == "reproduces"  # seconds = steps / 100
    assert v["Sophia-H needs half AdamW's steps (Liu et al.: 2x on GPT-2)"]["verdict"].startswith("reproduces")
    assert v["Sophia-G needs half AdamW's steps (Liu et al.: 2x on GPT-2)"]["verdict"] == "does not reproduce"
    assert v["Sophia-H's step costs at most 5% more than AdamW's (every=10)"]["verdict"] == "reproduces"
    assert v["Sophia-G's step costs at most 5% more than AdamW's (every=10)"]["verdict"] == "does not reproduce"
    s = _summary({"AdamW": [100, 104, 96], "Sophia-H": [70, 72, 68]})
    (steps, _) = study.verdicts(s, costs)
    assert steps["verdict"] == "partly: fewer steps, 1.43x not 2x"
    s = _summary({"AdamW": [100, 104, 96], "AdaHessian": [60, 62, 58]}, reached={"AdaHessian": 2})
    assert study.verdicts(s, costs)[0]["verdict"].startswith("not measurable")


def test_summary_is_mean_and_standard_error_of_the_runs_that_reached():
    s = _summary({"AdamW": [10, 20, 30, 40]}, reached={"AdamW": 3})["AdamW"]
    assert s["reached"] == 3 and s["runs"] == 4
    assert s["steps"][0] == pytest.approx(20.0) and s["steps"][1] == pytest.approx(10.0 / math.sqrt(3))


def test_quick_run_writes_results_figure_and_report(tmp_path):
    out = tmp_path / "opt"
    assert main(["study", "optimizers", "--quick", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"cnn", "transformer"}
    for task in res["tasks"].values():
        assert sorted({(r["optimizer"], r["seed"]) for r in task["runs"]}) == sorted(
            (o, s) for o in study.OPTIMIZERS for s in study.QUICK.seeds)
        for r in task["runs"]:
            steps = [c[0] for c in r["curve"]]
            assert steps[0] == 0 and steps == sorted(steps) and all(math.isfinite(c[2]) for c in r["curve"][:1])
            assert r["reached"] is None or r["curve"][-1][2] <= task["target"]
        assert set(task["costs"]) == set(study.OPTIMIZERS) and task["costs"]["AdamW"] == 1.0
        assert len(task["verdicts"]) == 6
    assert (out / "optimizers.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "curvop study optimizers --quick --seed 0" in report and "## transformer" in report
