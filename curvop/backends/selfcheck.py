"""The products check themselves: symmetry and determinism at build, central differences on demand.

A Hessian is symmetric: ``u·(Hw) = w·(Hu)`` for any ``u``, ``w``. An op whose second derivative is
wrong breaks it (torch 2.13's ``_weight_norm``: 0.55 relative; a forward-mode rule that ignores an
embedding's ``padding_idx``: 0.48), and so do products that change from call to call. At build,
:func:`check_products` multiplies two random vectors along the path the products will take (the
cached maps, used more than once, when there is a cache) and compares:

* the symmetry statistic :func:`relative_asymmetry`, about ``||H - Hᵀ||_F / (2 ||H||_F)``, against
  :func:`symmetry_tolerance` (``sqrt(eps)`` of the dtype: 3.5e-4 in float32, 1.5e-8 in float64;
  rounding measured at most 1.1e-6 and 1e-14 on a CNN, an MLP, ResNet-18, a ViT, an LSTM and GPT-2,
  loaders that reorder their batches included);
* with a cache, the cached maps' second use on a vector against a fresh product of it, to
  ``1000 eps``: one comparison checks that the products do not change from call to call and that
  the maps do not change with use (two fresh products without a cache).

The default costs no product more than the determinism check did: without a cache it multiplies
``u`` and ``w`` instead of ``u`` twice; with one, it applies the maps to ``w`` then ``u`` and
multiplies ``u`` afresh (three products; a third use of the maps is spent only with
``check_deterministic=False``). Only when a check fails does it multiply again, to name the cause:
when ``u`` and ``w`` are not symmetric, it multiplies ``u`` again
to tell randomness (:class:`~curvop.backends.base.NondeterministicProductError`) from a wrong
derivative (:class:`AsymmetricHessianError`, which names the parameter blocks holding the asymmetry,
found with products of the vectors restricted to groups of blocks: :func:`locate_asymmetry`).

:func:`verify` compares ``H v`` with central differences of gradients, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from curvop.backends.base import NondeterministicProductError, nondeterminism_message

__all__ = ["AsymmetricHessianError", "Verification", "VerificationError", "check_products", "locate_asymmetry",
           "relative_asymmetry", "symmetry_tolerance", "verify"]

Array = Any
#: groups of parameter blocks compared per round by :func:`locate_asymmetry` (two products each)
GROUPS = 8
#: the most products :func:`locate_asymmetry` spends narrowing the asymmetry down
LOCATE_BUDGET = 64


class AsymmetricHessianError(RuntimeError):
    """The Hessian-vector products are not symmetric: an op of the model has a wrong second derivative.

    Attributes
    ----------
    asymmetry : float
        :func:`relative_asymmetry` of the products at build (about ``||H - Hᵀ||_F / (2 ||H||_F)``).
    tolerance : float
        What rounding may reach in the dtype (:func:`symmetry_tolerance`).
    blocks : tuple of (str, str, float)
        Pairs of parameter blocks ``(a, b, share)`` holding the asymmetry, largest first: ``share``
        is about ``||H_ab - H_baᵀ||_F / ||H||_F`` (``a == b``: within one block).
    """

    def __init__(self, message: str, asymmetry: float, tolerance: float,
                 blocks: tuple[tuple[str, str, float], ...] = ()):
        super().__init__(message)
        self.asymmetry, self.tolerance, self.blocks = asymmetry, tolerance, blocks


class VerificationError(RuntimeError):
    """``verify=True`` at build: the products disagree with central differences of the gradient
    (``result``: the :class:`Verification`)."""

    def __init__(self, message: str, result: "Verification"):
        super().__init__(message)
        self.result = result


def symmetry_tolerance(dtype: Any) -> float:
    """The largest :func:`relative_asymmetry` that rounding may explain: ``sqrt(eps)`` of ``dtype``.

    ``dtype`` may also be ``"bfloat16"`` (numpy has none): a model whose parts compute in it.

    >>> symmetry_tolerance(np.float64) < 2e-8 < symmetry_tolerance(np.float32)
    True
    """
    eps = 2.0 ** -8 if str(dtype) == "bfloat16" else np.finfo(dtype).eps
    return float(np.sqrt(eps))


def relative_asymmetry(u: np.ndarray, w: np.ndarray, hu: np.ndarray, hw: np.ndarray) -> float:
    """``|u·Hw - w·Hu| sqrt(n) / (|u| |Hw| + |w| |Hu|)``, in float64.

    For Gaussian ``u``, ``w`` it is about ``||H - Hᵀ||_F / (2 ||H||_F)`` times ``|N(0, 1)|``, and
    rounding contributes the products' relative error (times ``|N(0, 1)|``), whatever ``n``. A zero
    Hessian gives 0.

    >>> A = np.array([[2.0, 1.0], [0.0, 3.0]])
    >>> u, w = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    >>> relative_asymmetry(u, w, A @ u, A @ w) > 0.1, relative_asymmetry(u, w, A.T @ A @ u, A.T @ A @ w)
    (True, 0.0)
    """
    u, w, hu, hw = (np.asarray(a, dtype=np.float64) for a in (u, w, hu, hw))
    scale = np.linalg.norm(u) * np.linalg.norm(hw) + np.linalg.norm(w) * np.linalg.norm(hu)
    if scale == 0.0:
        return 0.0
    return float(abs(u @ hw - w @ hu) * np.sqrt(u.size) / scale)


def _differ(a: np.ndarray, b: np.ndarray, dtype: Any) -> float | None:
    """The relative difference of two products of one vector if it is above ``1000 eps``, else None."""
    scale, diff = np.linalg.norm(a), np.linalg.norm(a - b)
    if not np.isfinite(scale):
        raise FloatingPointError("the Hessian-vector product contains NaN or Inf: check the loss on your data "
                                 "(log of zero, overflow in float32, NaN inputs)")
    rel = diff / max(scale, np.finfo(dtype).tiny)
    return float(rel) if diff > 1000 * np.finfo(dtype).eps * scale else None


def check_products(backend: Any, *, deterministic: bool, symmetric: bool) -> None:
    """The build-time check of a :class:`~curvop.backends.template.AutodiffBackend` (see the module
    docstring): raises :class:`NondeterministicProductError` or :class:`AsymmetricHessianError`.

    Products (default, both checks on): two without a cache (``u``, ``w``); with one, three: each
    cached map applied to ``w`` then ``u`` (the second use, what later products take), and ``u``
    afresh, which checks the determinism and the reuse in one comparison."""
    b = backend
    rng = np.random.default_rng(0)
    u, w = b.random(b.size, "gaussian", rng), b.random(b.size, "gaussian", rng)
    path = lambda v: b.to_numpy(b._finite(b._reduce(v, False), v, False))  # noqa: E731
    cached = b._cached is not None
    un, wn = b.to_numpy(u).astype(np.float64), b.to_numpy(w).astype(np.float64)
    if not cached:
        hu = path(u).astype(np.float64)
        if not symmetric:
            if deterministic and (rel := _differ(hu, path(u), b.dtype)) is not None:
                raise NondeterministicProductError(nondeterminism_message(rel, 1000 * np.finfo(b.dtype).eps))
            return
        hw = path(w).astype(np.float64)
    else:
        first = path(w if symmetric else u)  # every cached map's first use ...
        hu = path(u).astype(np.float64)  # ... and its second: a map that changes with use differs here
        if deterministic:
            _check_cached(b, lambda: b.to_numpy(b._finite(b._reduce(u, False, fresh=True), u, False, fresh=True)),
                          hu)
        elif (rel := _differ(hu, path(u), b.dtype)) is not None:  # no fresh product to compare: a third use
            raise NondeterministicProductError(_cache_message(b, rel, "the second and the third use of the cached maps"))
        if not symmetric:
            return
        hw = first.astype(np.float64)
    rounding = b._rounding_dtype()
    tol = symmetry_tolerance(rounding)
    r = relative_asymmetry(un, wn, hu, hw)
    if r <= tol:
        return
    again = path(u)  # the asymmetry is randomness, or a wrong derivative
    rel = _differ(hu, again, b.dtype)
    if rel is not None and deterministic:
        raise NondeterministicProductError(nondeterminism_message(rel, 1000 * np.finfo(b.dtype).eps))
    blocks = locate_asymmetry(lambda v: path(b.from_numpy(v)), un, wn, list(b._blocks()), rounding,
                              scale=np.linalg.norm(hu) * np.sqrt(un.size) / np.linalg.norm(un))
    raise AsymmetricHessianError(_asymmetry_message(b, r, tol, blocks, cached, rel), r, tol, tuple(blocks))


def _check_cached(b: Any, fresh: Callable[[], np.ndarray], second: np.ndarray) -> None:
    """A fresh product of ``u`` against the cached maps' second use on ``u``. When they differ, a
    second fresh product tells a model whose products are random from cached maps that are wrong or
    change with use."""
    once = fresh()
    rel = _differ(once, second, b.dtype)
    if rel is None:
        return
    if _differ(once, fresh(), b.dtype) is not None:
        raise NondeterministicProductError(nondeterminism_message(rel, 1000 * np.finfo(b.dtype).eps))
    raise NondeterministicProductError(_cache_message(b, rel, "the cached maps' second use and a fresh product"))


def _cache_message(b: Any, rel: float, between: str) -> str:
    return (f"the cached products change from one use to the next (relative difference {rel:.2e} between "
            f"{between} of the same vector), so they cannot be trusted; this is a bug of the {b.name} backend's "
            "cached mode: pass cache=False (or another hvp= mode)")


def _label(dtype: Any) -> str:
    """A dtype's name; ``"bfloat16"`` (numpy has none) as it is."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _asymmetry_message(b: Any, r: float, tol: float, blocks: list[tuple[str, str, float]], cached: bool,
                       random: float | None) -> str:
    where = ", ".join(f"{a!r} with {'itself' if a == c else repr(c)} ({s:.1e})" for a, c, s in blocks[:4])
    mode = getattr(b, "mode", None)
    other = {"forward": "reverse", "reverse": "forward"}.get(mode)
    return (
        f"the Hessian-vector products are not symmetric: u·(Hw) and w·(Hu) differ by {r:.1e} relative "
        f"(rounding stays below {tol:.1e} in {_label(b._rounding_dtype())}), so an op of the model has a wrong second "
        f"derivative in {b.name}'s {mode or ''} mode{' (cached)' if cached else ''}"
        + (f"; the asymmetry is in {where}" if where else "")
        + (f"; the products also change from call to call ({random:.1e}, check_deterministic=False)" if random else "")
        + ". " + (f"Try hvp='{other}', c" if other else "C")
        + "heck the products against central differences with H.verify(), and report the op; "
        "pass check_symmetric=False to accept the products as they are."
    )


def _groups(blocks: Sequence[int], k: int) -> list[list[int]]:
    """``blocks`` (indices) in at most ``k`` contiguous runs of near-equal length."""
    k = max(1, min(k, len(blocks)))
    cuts = np.linspace(0, len(blocks), k + 1).round().astype(int)
    return [list(blocks[a:c]) for a, c in zip(cuts[:-1], cuts[1:]) if c > a]


def _name(group: list[int], names: list[str]) -> str:
    if len(group) == 1:
        return names[group[0]]
    first, last = names[group[0]], names[group[-1]]
    common = first[:next((i for i, (x, y) in enumerate(zip(first, last)) if x != y), min(len(first), len(last)))]
    common = common[:common.rfind(".") + 1] if "." in common else common
    return f"{common}* ({len(group)} blocks)" if common else f"{first} ... {last} ({len(group)} blocks)"


def locate_asymmetry(product: Callable[[np.ndarray], np.ndarray], u: np.ndarray, w: np.ndarray,
                     blocks: list[tuple[str, int]], dtype: Any, scale: float,
                     budget: int = LOCATE_BUDGET) -> list[tuple[str, str, float]]:
    """The pairs of parameter blocks holding the asymmetry, largest first, as ``(a, b, share)``.

    ``product`` multiplies a numpy vector; ``blocks`` are ``(name, size)`` in the order of the flat
    vector; ``scale`` estimates ``||H||_F``. Each round multiplies ``u`` and ``w`` restricted to each
    of at most :data:`GROUPS` groups of blocks (two products per group), compares
    ``u_a·(H w_b)_a`` with ``w_b·(H u_a)_b`` for every pair of groups, and splits the worst pair's
    groups in the next round, until single blocks or ``budget`` products.

    >>> A = np.diag([1.0, 2.0, 3.0]); A[0, 2] = 1.0  # blocks "a" = [0], "b" = [1, 2]
    >>> rng = np.random.default_rng(0); u, w = rng.standard_normal(3), rng.standard_normal(3)
    >>> [(a, b) for a, b, _ in locate_asymmetry(lambda v: A @ v, u, w, [("a", 1), ("b", 2)], np.float64, 3.9)]
    [('a', 'b')]
    """
    names = [n for n, _ in blocks]
    ends = np.cumsum([s for _, s in blocks])
    starts = ends - np.array([s for _, s in blocks])
    tol = symmetry_tolerance(dtype)
    groups, found, spent = _groups(list(range(len(blocks))), GROUPS), [], 0
    while groups and spent + 2 * len(groups) <= budget:
        slices = [slice(int(starts[g[0]]), int(ends[g[-1]])) for g in groups]
        hu, hw = [], []
        for s in slices:
            for vec, out in ((u, hu), (w, hw)):
                part = np.zeros_like(vec)
                part[s] = vec[s]
                out.append(np.asarray(product(part), dtype=np.float64))
        spent += 2 * len(groups)
        pairs = []
        for i, si in enumerate(slices):
            for j in range(i, len(slices)):
                sj = slices[j]
                a = abs(u[si] @ hw[j][si] - w[sj] @ hu[i][sj])
                c = abs(u[sj] @ hw[i][sj] - w[si] @ hu[j][si])
                pairs.append((max(a, c) / max(scale, np.finfo(np.float64).tiny), i, j))
        pairs.sort(reverse=True)
        above = [(_name(groups[i], names), _name(groups[j], names), float(s)) for s, i, j in pairs if s > tol]
        if not above:
            break
        found = above
        _, i, j = pairs[0]
        if len(groups[i]) == 1 and len(groups[j]) == 1:
            break
        half = max(1, GROUPS // 2)
        groups = _groups(groups[i], half if i != j else GROUPS) + (_groups(groups[j], half) if i != j else [])
    return found


@dataclass(frozen=True)
class Verification:
    """``H v`` against central differences of the gradient (:func:`verify`).

    Attributes
    ----------
    error : float
        ``||H v - d|| / ||d||``, ``d`` the central difference ``(g(θ + h v) - g(θ - h v)) / 2h``.
    noise : float
        The central differences' own error, estimated from a second step ``2h``
        (``||d_h - d_2h|| / ||d_h||``): an ``error`` of a few times ``noise`` is as good as they get.
    step : float
        ``h``.
    blocks : tuple of (str, float)
        Per parameter block, ``||(H v - d)_b|| / ||d||`` (the squares add up to ``error**2``).
    floor : float
        The error :attr:`ok` accepts whatever ``noise`` says.
    """

    error: float
    noise: float
    step: float
    blocks: tuple[tuple[str, float], ...]

    floor: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether ``error`` is within what the central differences can tell: ``10 * noise``, or
        ``floor`` (``eps**(1/3)`` of the dtype: a ReLU that changes sign within the step makes the
        differences err by more than their ``noise`` says, 2.5e-8 measured on a float64 Keras MLP)."""
        return bool(self.error <= max(10 * self.noise, self.floor))

    def worst(self) -> tuple[str, float]:
        """The block with the largest error."""
        return max(self.blocks, key=lambda b: b[1])

    def __repr__(self) -> str:
        name, err = self.worst()
        return (f"Verification(error={self.error:.1e}, noise={self.noise:.1e}, ok={self.ok}, "
                f"worst={name!r}: {err:.1e}, {len(self.blocks)} blocks)")


def verify(backend: Any, v: Array | None = None, *, step: float | None = None, seed: int = 0) -> Verification:
    """``H v`` of ``backend`` against central differences of its gradient (see :class:`Verification`).

    Cost: one product and four gradients over the data (at ``θ ± h v`` and ``θ ± 2h v``). ``v``:
    a native vector (default: Gaussian from ``seed``); ``step``: ``h`` (default ``eps**(1/3)`` of
    the dtype over the vector's root mean square: 6e-6 in float64, 5e-3 in float32).
    """
    b = backend
    if v is None:
        v = b.random(b.size, "gaussian", np.random.default_rng(seed))
    vn = b.to_numpy(v).astype(np.float64)
    rms = float(np.linalg.norm(vn) / np.sqrt(max(vn.size, 1)))
    if rms == 0.0:
        raise ValueError("verify needs a nonzero vector")
    h = float(step) if step is not None else float(np.cbrt(np.finfo(b.dtype).eps)) / rms
    hv = b.to_numpy(b.hvp(v)).astype(np.float64)
    grad = lambda t: b.to_numpy(b._gradient(v, t)).astype(np.float64)  # noqa: E731
    d1 = (grad(h) - grad(-h)) / (2 * h)
    d2 = (grad(2 * h) - grad(-2 * h)) / (4 * h)
    scale = max(float(np.linalg.norm(d1)), np.finfo(np.float64).tiny)
    ends = np.cumsum([s for _, s in b._blocks()])
    diff = hv - d1
    blocks = tuple((name, float(np.linalg.norm(diff[e - s:e]) / scale))
                   for (name, s), e in zip(b._blocks(), ends))
    return Verification(float(np.linalg.norm(diff) / scale), float(np.linalg.norm(d1 - d2) / scale), h, blocks,
                        float(np.cbrt(np.finfo(b.dtype).eps)))
