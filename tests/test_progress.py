"""Progress bars: they end at the products used and keep their count when interrupted (issue 12 item 17)."""

from __future__ import annotations

import numpy as np
import pytest

import curvop



def test_issue12_item17_progress_bar_ends_at_products_used(capsys):
    pytest.importorskip("tqdm")
    r = curvop.eigenvalues(np.diag(np.arange(1.0, 101.0)), k=1, progress=True, seed=0)
    err = capsys.readouterr().err
    assert r.num_matvecs < 200
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{r.num_matvecs}/{r.num_matvecs}" in last and "100%" in last, last


def test_issue12_item17_progress_bar_keeps_its_count_when_interrupted(capsys):
    pytest.importorskip("tqdm")
    from curvop._progress import progress_bar

    with pytest.raises(KeyboardInterrupt):
        bar = progress_bar(True, 200, "test")
        try:
            bar.update(21)
            raise KeyboardInterrupt
        finally:
            bar.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "21/200" in last, last
