"""The BatchNorm / residual study with seeds, matched loss and error bars (issue 16, item 2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from curvop.studies import bn_residual
from curvop.studies.bn_residual import compare, mean_se, verdict


def test_issue16_item2_compare_is_welch_t_on_the_combined_standard_error():
    from scipy import stats

    flat, sharp = [1.0, 1.3, 0.8, 1.1, 0.9], [1.6, 2.4, 1.2, 2.0, 1.9]
    c = compare(flat, sharp)
    ref = stats.ttest_ind(sharp, flat, equal_var=False)
    assert c["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    se = math.hypot(np.std(flat, ddof=1) / math.sqrt(5), np.std(sharp, ddof=1) / math.sqrt(5))
    assert c["t"] == pytest.approx((np.mean(sharp) - np.mean(flat)) / se)
    assert c["ratio"] == pytest.approx(np.mean(sharp) / np.mean(flat))
    assert c["support"] == "supports"
    assert compare(sharp, flat)["support"] == "opposes"
    # a difference smaller than its combined standard error is noise, whichever its sign
    assert compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])["support"] == "within noise"
    assert mean_se([2.0, 4.0]) == (3.0, 1.0)


def test_issue16_item2_verdict_needs_every_metric_beyond_its_standard_error():
    s, n, o = ({"support": k} for k in ("supports", "within noise", "opposes"))
    assert verdict([s, s]) == "reproduced"
    assert verdict([s, n]) == verdict([s, o]) == "mixed"
    assert verdict([n, n]) == verdict([o, o]) == verdict([n, o]) == "not reproduced"


@pytest.mark.slow
def test_issue16_item2_quick_study_is_seeded_matched_and_has_error_bars(tmp_path):
    out = tmp_path / "study"
    res = bn_residual.run(str(out), quick=True, quiet=True, command="curvop study bn-residual --quick --seed 0",
                          say=lambda s: None)
    scale = bn_residual.QUICK
    assert res["seeds"] == list(range(scale.seeds)) and scale.seeds >= 2
    assert [n["name"] for n in res["networks"]] == [c.name for c in bn_residual.configs(scale)]
    for net in res["networks"]:
        runs = net["runs"]
        assert [r["seed"] for r in runs] == res["seeds"]
        # matched loss: every run stopped at the target, within the few steps between checks
        assert net["all_reached_target"]
        assert all(0.75 * scale.target_loss <= r["train_loss"] <= scale.target_loss for r in runs)
        for key in ("top_eigenvalue", "trace"):
            m, se = mean_se([r[key] for r in runs])
            assert net[key] == pytest.approx(m) and net[key + "_se"] == pytest.approx(se) and se > 0
        # the seeds are different networks, not copies
        assert len({r["top_eigenvalue"] for r in runs}) == len(runs)
    report = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(res["claims"]))
    for claim in res["claims"]:
        assert claim["verdict"] == verdict(list(claim["tests"].values()))
        assert f"**{claim['verdict']}**" in report
    assert "Welch" in report and " ± " in report
    assert (out / "densities.png").stat().st_size > 20_000
