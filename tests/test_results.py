"""Result dataclasses of every algorithm have short reprs (issue 12 item 17)."""

from __future__ import annotations

import numpy as np
import pytest

import curvop
from _matrices import KINDS, operator, with_spectrum


pytest.importorskip("torch")


# --- item 17: short reprs, a progress bar closed at the products used, py.typed -----------------
@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item17_results_have_short_reprs(kind):
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 500)), seed=0)
    H = operator(A, kind)
    ev = curvop.eigenvalues(np.diag(np.arange(1.0, 501.0)), k=3, seed=0)
    dg = curvop.diagonal(H, num_matvecs=10, seed=0)
    sd = curvop.spectral_density(H, num_steps=97, num_probes=2, seed=0)
    tr = curvop.trace(H, num_matvecs=10, seed=0)
    for obj in (ev, dg, sd, tr):
        text = repr(obj)
        assert "\n" not in text and len(text) < 250, text
        assert str(obj) == text
    assert "eigenvalues=[500, 499, 498]" in repr(ev) and "(500, 3) float64" in repr(ev)
    assert "(500,)" in repr(dg) and "num_matvecs=10" in repr(dg)
    assert "n=500, num_probes=2, nodes per probe=97" in repr(sd)
    big = curvop.eigenvalues(np.diag(np.arange(1.0, 501.0)), k=30, seed=0)
    assert "..." in repr(big) and len(repr(big)) < 250
