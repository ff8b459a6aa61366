"""The backend registry: which framework computes the Hessian-vector products.

Built-in backends (``torch``, ``tensorflow``, ``jax``, ``numpy``, ``cupy``) are imported lazily,
the first time they are used. Third-party packages add their own at run time with
:func:`register`, or at install time through the entry-point group ``curvop.backends``
(the entry point names a factory with the signature of :func:`curvop.hessian`).

The package is a tree whose top level names no framework (``docs/architecture.md``):

* the template layer, here: ``base`` (the contract), ``template`` (the autodiff template), ``checks``,
  ``dataset``, ``faults``, ``modes``, ``selection``, and the backends without autodiff ``array`` and ``callables``;
* one folder per framework, reached only through this registry: ``torch/``, ``jax/`` and
  ``tensorflow/`` (each its autodiff, model adapter, op rewrites and distributed or sharded code),
  and the single-file ``cupy``.

>>> import curvop
>>> "numpy" in curvop.backends.available()
True
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points
from typing import Any, Callable

from curvop.backends.base import Backend

__all__ = ["Backend", "available", "register", "get", "detect"]

# name -> (module providing the framework, curvop module holding hessian / hessian_of)
_BUILTIN: dict[str, tuple[str, str]] = {
    "torch": ("torch", "curvop.backends.torch"),
    "tensorflow": ("tensorflow", "curvop.backends.tensorflow"),
    "jax": ("jax", "curvop.backends.jax"),
    "cupy": ("cupy", "curvop.backends.cupy"),
    "numpy": ("numpy", "curvop.backends.callables"),
}
_REGISTERED: dict[str, dict[str, Callable[..., Any]]] = {}


def register(
    name: str,
    factory: Callable[..., Any],
    *,
    hessian_of: Callable[..., Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Register a backend under ``name``.

    ``factory(model, loss_fn, data, *, params=None, **options)`` must return a :class:`Backend`
    (or a :class:`curvop.HessianOperator`); it is then reachable as
    ``curvop.hessian(..., backend=name)``. ``hessian_of(f, params, data, **options)``, if given,
    serves ``curvop.hessian_of(..., backend=name)``.
    """
    for fn in (factory, hessian_of):
        if fn is not None and not callable(fn):
            raise TypeError(f"backend {name!r}: factories must be callable, got {type(fn).__name__}")
    if not overwrite and (name in _REGISTERED or name in _BUILTIN):
        raise ValueError(f"a backend named {name!r} exists already; pass overwrite=True to replace it")
    _REGISTERED[name] = {"hessian": factory}
    if hessian_of is not None:
        _REGISTERED[name]["hessian_of"] = hessian_of


def _entry_points() -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group="curvop.backends")}
    except Exception:  # pragma: no cover - broken metadata must not break import
        return {}


def available() -> list[str]:
    """Names of the backends usable in this environment (framework installed, or registered)."""
    names = [n for n, (mod, _) in _BUILTIN.items() if importlib.util.find_spec(mod) is not None]
    names += [n for n in _REGISTERED if n not in names]
    names += [n for n in _entry_points() if n not in names]
    return names


def get(name: str, kind: str = "hessian") -> Callable[..., Any]:
    """Return backend ``name``'s factory (``kind="hessian"`` or ``"hessian_of"``), importing it lazily."""
    if name in _REGISTERED:
        if kind not in _REGISTERED[name]:
            raise NotImplementedError(f"backend {name!r} provides no {kind}()")
        return _REGISTERED[name][kind]
    if name in _BUILTIN:
        framework, target = _BUILTIN[name]
        if importlib.util.find_spec(framework) is None:
            raise ImportError(
                f"backend {name!r} needs {framework}, which is not installed; "
                f"install it with: pip install 'curvop[{name}]'"
            )
        module = importlib.import_module(target)
        if not hasattr(module, kind):
            raise NotImplementedError(f"backend {name!r} provides no {kind}()")
        return getattr(module, kind)
    eps = _entry_points()
    if name in eps:
        obj = eps[name].load()
        # an entry point names either a factory or a module with hessian / hessian_of
        _REGISTERED[name] = (
            {k: getattr(obj, k) for k in ("hessian", "hessian_of") if hasattr(obj, k)}
            if not callable(obj) or hasattr(obj, "hessian")
            else {"hessian": obj}
        )
        return get(name, kind)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(available())}")


def detect(model: Any) -> str:
    """Guess the backend from the model's type without importing any framework."""
    mro = [f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__]
    roots = {m.split(".")[0] for m in mro}
    if "torch" in roots:
        return "torch"
    if "keras" in roots or "tensorflow" in roots or "tf_keras" in roots:
        return "tensorflow"
    if roots & {"jax", "jaxlib", "flax", "equinox"}:
        return "jax"
    if "cupy" in roots:
        return "cupy"
    raise TypeError(
        f"cannot tell which framework a {type(model).__name__} belongs to; "
        f"pass backend= one of {', '.join(available())}"
    )
