"""The mode fallback of the template (issue 26 item 1.5), on a numpy backend whose modes fail on
purpose: ``"auto"`` falls back and says why, a named mode is refused naming the one that works, no
mode at all gives the framework's error, and any other error is raised as it is."""

from __future__ import annotations

import numpy as np
import pytest

from curvop._errors import ModeError
from curvop.backends.dataset import Dataset
from curvop.backends.template import AutodiffBackend, ParamInfo
from _matrices import NumpyArrays

X = np.arange(6.0).reshape(3, 2)
EXACT = X.T @ X / 3


class CannotDifferentiate(RuntimeError):
    pass


class Toy(NumpyArrays, AutodiffBackend):
    """``H = X^T X / n`` computed in modes of which ``broken`` fail with a recognised error."""

    name = "toy"

    def __init__(self, broken=(), bug=False, **options):
        self.broken, self.bug, self.calls = set(broken), bug, []
        self._begin(Dataset((X, X[:, 0])), [ParamInfo("w", "float64", "cpu")], **options)
        self.size, self.dtype, self.device = 2, np.dtype(np.float64), "cpu"
        self._complete()

    def _auto_options(self):
        return {"hvp": "forward", "cache": True, "batched": False}

    def _work(self, cached):
        self.calls.append((self.mode, cached))
        if self.bug:
            raise ValueError("shapes (3,2) and (3,) not aligned")  # a user's bug: never a mode failure
        if (self.mode, cached) in self.broken:
            raise CannotDifferentiate(f"{self.mode} AD not implemented for op")

    def _product(self, v, batch, batched):
        self._work(False)
        return batch[0].T @ (batch[0] @ v) / len(batch[0])

    def _linearize(self, batch):
        self._work(True)
        return lambda v, batched: batch[0].T @ (batch[0] @ v) / len(batch[0])

    def _mode_failure(self, err):
        return "no forward AD for op" if isinstance(err, CannotDifferentiate) else None


def test_issue26_item5_auto_falls_back_and_says_why():
    B = Toy(broken={("forward", True)})  # the cache (a linearisation) fails, uncached forward works
    assert (B.mode, B.cache) == ("forward", False)
    assert "hvp='forward', cache=True failed: no forward AD for op; using hvp='forward', cache=False" in B.describe()
    np.testing.assert_allclose(B.hvp(np.ones(2)), EXACT @ np.ones(2))
    B = Toy(broken={("forward", True), ("forward", False)})
    assert (B.mode, B.cache) == ("reverse", True) and B._cached is not None


def test_issue26_item5_named_mode_is_refused_naming_the_one_that_works():
    with pytest.raises(ModeError, match=r"^hvp='forward', cache=True cannot differentiate this model \(no forward "
                                        r"AD for op\); hvp='forward', cache=False works") as info:
        Toy(broken={("forward", True)}, hvp="forward", cache=True)
    assert (info.value.mode, info.value.cache) == ("forward", False)
    with pytest.raises(ModeError, match="hvp='reverse', cache=False works"):
        Toy(broken={("forward", False)}, hvp="forward", cache=False)
    B = Toy(broken={("forward", True)}, cache=True)  # hvp left at "auto": the other hvp, the cache kept
    assert (B.mode, B.cache) == ("reverse", True)


def test_issue26_item5_no_mode_works_gives_the_frameworks_error():
    every = {(m, c) for m in ("forward", "reverse") for c in (True, False)}
    with pytest.raises(CannotDifferentiate):
        Toy(broken=every)


def test_issue26_item5_other_errors_are_raised_as_they_are():
    B = None
    with pytest.raises(ValueError, match="not aligned"):
        B = Toy(bug=True)
    assert B is None


def test_issue26_item5_first_product_settles_the_mode_when_the_build_ran_none():
    B = Toy(broken={("forward", False)}, check_deterministic=False, cache=False)
    assert B.calls == [] and B.mode == "forward"
    np.testing.assert_allclose(B.hvp(np.ones(2)), EXACT @ np.ones(2))
    assert B.mode == "reverse" and "using hvp='reverse', cache=False" in B.describe()
    B.calls.clear()
    B.hvp_batch(np.eye(2))
    assert B.calls == [("reverse", False)] * 2  # settled: no more attempts
