"""Issue 26, defences: the products check themselves (curvop.backends.selfcheck), on small numpy backends
built on the template with explicit matrices: an asymmetric "Hessian" is refused at build naming its
blocks, the cached path is used more than once, the check costs no extra product, and verify compares
with central differences of an explicit gradient."""

from __future__ import annotations

import numpy as np
import pytest

import curvop
from curvop.backends.base import NondeterministicProductError
from curvop.backends.dataset import Dataset
from curvop.backends.selfcheck import (AsymmetricHessianError, Verification, VerificationError, locate_asymmetry,
                                       relative_asymmetry, symmetry_tolerance)
from curvop.backends.template import AutodiffBackend, ParamInfo
from _matrices import NumpyArrays

BLOCKS = [("layer1.weight", 3), ("layer1.bias", 2), ("layer2.weight", 4)]


class Quadratic(NumpyArrays, AutodiffBackend):
    """loss(w) = w·A w / 2 + b·w on every batch, with a product that multiplies by ``M`` (``M = A`` is
    right; anything else is an op with a wrong second derivative). ``_linearize`` caches ``M``; its map
    drifts by ``drift`` per use (like torch.func.linearize's in-place writes)."""

    name = "quadratic"

    def __init__(self, M, A=None, data=((np.zeros(1),),), drift=0.0, dtype=np.float64, **options):
        self.M, self.A, self.drift, self.products, self.uses = np.asarray(M, dtype), A, drift, 0, 0
        self._begin(Dataset(list(data)), [ParamInfo("w", np.dtype(dtype).name, "cpu")], **options)
        self.size, self.dtype, self.device = len(self.M), np.dtype(dtype), "cpu"
        self._complete()

    def _blocks(self):
        return BLOCKS if self.size == 9 else super()._blocks()

    def _product(self, v, batch, batched):
        self.products += 1
        return self.M @ v

    def _linearize(self, batch):
        M, state = self.M.copy(), {"uses": 0}

        def apply(v, batched):
            state["uses"] += 1
            self.uses += 1
            return (M * (1 + self.drift * (state["uses"] - 1))) @ v

        return apply

    def _batch_gradient(self, batch, v, t):
        A = self.M if self.A is None else self.A
        return A @ (t * v) + 1.0  # the gradient at w = 0 + t v of w·A w / 2 + sum(w)


class Uncached(Quadratic):
    _linearize = None


def _spd(n=9, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    return Q @ Q.T / n + np.eye(n)


def test_issue26_symmetric_hessian_passes_with_two_products_like_the_determinism_check():
    B = Uncached(_spd())
    assert B.products == 2  # u and w: as many as the determinism check's two products of one vector
    np.testing.assert_allclose(B.hvp(np.ones(9)), _spd() @ np.ones(9))


@pytest.mark.parametrize("cls", [Uncached, Quadratic])
def test_issue26_asymmetric_hessian_is_refused_naming_its_blocks(cls):
    M = _spd()
    M[0, 7] += 0.5  # layer1.weight (entries 0-2) with layer2.weight (entries 5-8), one side only
    with pytest.raises(AsymmetricHessianError, match=r"not symmetric.*'layer1.weight' with 'layer2.weight'") as info:
        cls(M)
    err = info.value
    assert err.asymmetry > 100 * err.tolerance and err.tolerance == symmetry_tolerance(np.float64)
    assert (err.blocks[0][0], err.blocks[0][1]) == ("layer1.weight", "layer2.weight")
    assert "check_symmetric=False" in str(err) and "H.verify()" in str(err)
    assert isinstance(err, RuntimeError) and curvop.AsymmetricHessianError is AsymmetricHessianError
    B = cls(M, check_symmetric=False)  # accepted when asked for
    np.testing.assert_allclose(B.hvp(np.eye(9)[7]), M[:, 7])


def test_issue26_asymmetry_within_one_block_names_that_block():
    M = _spd()
    M[3, 4] -= 0.3  # inside layer1.bias
    with pytest.raises(AsymmetricHessianError, match="'layer1.bias' with itself"):
        Uncached(M)


def test_issue26_symmetry_check_follows_check_deterministic_unless_asked_for():
    M = _spd()
    M[0, 7] += 0.5
    B = Uncached(M, check_deterministic=False)  # both build checks off: no product at build
    assert B.products == 0
    with pytest.raises(AsymmetricHessianError):
        Uncached(M, check_deterministic=False, check_symmetric=True)
    with pytest.raises(TypeError, match="check_symmetric must be True or False"):
        Uncached(_spd(), check_symmetric="yes")


def test_issue26_rounding_level_asymmetry_is_accepted_in_float32_and_float64():
    for dtype, rel in ((np.float64, 1e-12), (np.float32, 3e-6)):  # 5e4 and 25 eps, above anything measured
        M = _spd()
        M[0, 7] += rel * np.abs(M).max()
        Uncached(M, dtype=dtype)
        M[0, 7] += 100 * symmetry_tolerance(dtype) * np.abs(M).max()
        with pytest.raises(AsymmetricHessianError):
            Uncached(M, dtype=dtype)


def test_issue26_randomness_is_still_told_from_asymmetry():
    class Noisy(Uncached):
        def _product(self, v, batch, batched):
            return super()._product(v, batch, batched) * (1 + 1e-3 * self.rng.standard_normal())

    Noisy.rng = np.random.default_rng(5)
    with pytest.raises(NondeterministicProductError, match="differ"):
        Noisy(_spd())


def test_issue26_cached_maps_are_checked_on_reuse():
    """The cached map is what the products use: a map that changes with each use (torch.func.linearize's
    in-place writes into its constants) is caught at build, though fresh products and its first use agree."""
    with pytest.raises(NondeterministicProductError, match="cached products change from one use to the next"):
        Quadratic(_spd(), cache=True, drift=1e-3)
    B = Quadratic(_spd(), cache=True)
    assert B.products == 1  # one fresh product (build-to-build randomness), then the cached map: 2 uses
    np.testing.assert_allclose(B.hvp(np.ones(9)), _spd() @ np.ones(9))


@pytest.mark.parametrize("det, sym, fresh, uses", [(True, True, 1, 2), (True, False, 1, 2), (False, True, 0, 3),
                                                   (False, False, 0, 0)])
def test_issue26_build_products_with_a_cache_are_shared_by_the_checks(det, sym, fresh, uses):
    # default: the maps' second use on u against u afresh is both the determinism and the reuse check,
    # and the maps' uses on w and u are the symmetry check's: 3 products (was 4: a third use of the maps)
    B = Quadratic(_spd(), cache=True, check_deterministic=det, check_symmetric=sym)
    assert (B.products, B.uses) == (fresh, uses)
    U = Uncached(_spd(), check_deterministic=det, check_symmetric=sym)
    assert U.products == (2 if det or sym else 0)


def test_issue26_cached_maps_wrong_from_the_start_are_told_from_randomness():
    class Off(Quadratic):  # the map is 1e-3 off from its first use on: not random, a wrong cache
        def _linearize(self, batch):
            return lambda v, batched: 1.001 * self.M @ v

    with pytest.raises(NondeterministicProductError, match="cached products change.*pass cache=False"):
        Off(_spd(), cache=True)

    class Random(Quadratic):  # fresh products random: the model, not the cache
        def _product(self, v, batch, batched):
            return super()._product(v, batch, batched) * (1 + 1e-3 * self.rng.standard_normal())

    Random.rng = np.random.default_rng(5)
    with pytest.raises(NondeterministicProductError, match="not a fixed function of the parameters"):
        Random(_spd(), cache=True)


def test_issue26_relative_asymmetry_estimates_the_asymmetric_share():
    rng = np.random.default_rng(0)
    n = 400
    S = _spd(n)
    K = rng.standard_normal((n, n))
    K = (K - K.T) * np.linalg.norm(S) / np.linalg.norm(K - K.T) * 0.1  # ||K||_F = 0.1 ||S||_F
    A = S + K
    share = np.linalg.norm(A - A.T) / (2 * np.linalg.norm(A))
    rs = []
    for seed in range(40):
        g = np.random.default_rng(seed)
        u, w = g.standard_normal(n), g.standard_normal(n)
        rs.append(relative_asymmetry(u, w, A @ u, A @ w))
    assert 0.5 < np.sqrt(np.mean(np.square(rs))) / share < 2  # an rms of |N(0,1)| times the share
    assert relative_asymmetry(u, w, S @ u, S @ w) < 1e-14
    assert relative_asymmetry(u, w, 0 * u, 0 * w) == 0.0


def test_issue26_locate_asymmetry_narrows_many_blocks_down():
    n_blocks = 40
    blocks = [(f"layer{i}.weight", 2) for i in range(n_blocks)]
    M = _spd(2 * n_blocks)
    M[2 * 13, 2 * 31 + 1] += 1.0
    rng = np.random.default_rng(1)
    u, w = rng.standard_normal(len(M)), rng.standard_normal(len(M))
    calls = []
    found = locate_asymmetry(lambda v: calls.append(1) or M @ v, u, w, blocks, np.float64,
                             scale=np.linalg.norm(M))
    assert (found[0][0], found[0][1]) == ("layer13.weight", "layer31.weight")
    assert len(calls) <= 64


def test_issue26_verify_against_central_differences_per_block():
    B = Uncached(_spd())
    res = B.verify()
    assert isinstance(res, Verification) and res.ok and res.error < 1e-7
    assert [b for b, _ in res.blocks] == [b for b, _ in BLOCKS]
    assert repr(res).startswith("Verification(error=") and len(repr(res)) < 120
    A = _spd()
    wrong = A.copy()
    wrong[5:, 5:] *= 1.01  # layer2.weight's block 1% off, symmetric: only verify sees it
    B = Uncached(wrong, A=A)
    res = B.verify()
    assert not res.ok and res.worst()[0] == "layer2.weight"
    assert res.error > 1e-3 and dict(res.blocks)["layer1.weight"] < 1e-3 * res.error + 1e-7
    with pytest.raises(VerificationError, match="central differences") as info:
        Uncached(wrong, A=A, verify=True)
    assert info.value.result.worst()[0] == "layer2.weight"
    Uncached(A, verify=True)


def test_issue26_verify_needs_gradients():
    class NoGradient(Uncached):
        _batch_gradient = AutodiffBackend._batch_gradient

    with pytest.raises(NotImplementedError, match="central differences"):
        NoGradient(_spd()).verify()
    H = curvop.aslinearoperator(np.eye(3))
    with pytest.raises(TypeError, match="verify needs"):
        H.verify()
