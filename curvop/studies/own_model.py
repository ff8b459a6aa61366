"""``curvop spectrum MODULE:FACTORY``: measure the Hessian of a user's own PyTorch model.

The factory (a function in an importable module or in a ``.py`` file) takes no arguments and
returns ``(model, loss_fn, data)``, exactly what :func:`curvop.hessian` takes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

__all__ = ["InputError", "load_factory", "call_factory", "resolve_device", "run"]


class InputError(Exception):
    """Bad input from the user (module, factory, device); reported as one line, no traceback."""


def _import(module: str) -> Any:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = pathlib.Path(module)
        if not path.is_file():
            raise InputError(f"no such file: {module}")
        spec = importlib.util.spec_from_file_location(f"_curvop_user_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        _exec(lambda: spec.loader.exec_module(mod), module)
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: the cwd is importable
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise InputError(f"cannot import module {module!r}: no module named {err.name!r}") from None
        raise InputError(f"importing {module!r} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - any error raised by the user's module
        raise InputError(f"importing {module!r} failed: {type(err).__name__}: {err}") from None


def _exec(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - any error raised by the user's code
        raise InputError(f"importing {what!r} failed: {type(err).__name__}: {err}") from None


def load_factory(target: str) -> Callable[[], Any]:
    """The function named by ``"MODULE:FACTORY"`` (``MODULE`` a module name or a ``.py`` path)."""
    module, sep, name = target.rpartition(":")
    if not sep or not module or not name:
        raise InputError(f"expected MODULE:FACTORY (e.g. mymodels:make or ./exp.py:make), got {target!r}")
    mod = _import(module)
    factory = getattr(mod, name, None)
    if factory is None:
        raise InputError(f"module {module!r} has no attribute {name!r}")
    if not callable(factory):
        raise InputError(f"{target} is a {type(factory).__name__}, not a function")
    return factory


def call_factory(factory: Callable[[], Any], target: str) -> tuple[Any, Any, Any]:
    """Call the factory and check that it returned ``(torch.nn.Module, callable loss, data)``."""
    import torch

    try:
        out = factory()
    except Exception as err:  # noqa: BLE001 - any error raised by the user's factory
        raise InputError(f"{target}() raised {type(err).__name__}: {err}") from None
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise InputError(f"{target}() must return (model, loss_fn, data), got {got}")
    model, loss_fn, data = out
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{target}() returned a {type(model).__name__} as model; expected a torch.nn.Module")
    if not callable(loss_fn):
        raise InputError(f"{target}() returned a {type(loss_fn).__name__} as loss_fn; expected a callable")
    return model, loss_fn, data


def resolve_device(name: str) -> Any:
    """``torch.device(name)``, checked to exist on this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r} (try 'cpu', 'cuda' or 'cuda:0')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested, but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name!r} requested, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} requested, but MPS is not available on this machine")
    return device


def run(target: str, *, out: str = "curvop-spectrum", device: str = "cpu", k: int = 5, seed: int = 0,
        steps: int = 80, probes: int = 2, trace_matvecs: int = 99, quiet: bool = False,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the factory, measure the Hessian, write ``density.png`` and ``results.json`` to ``out``."""
    import torch

    import curvop
    from curvop import plot
    from curvop.studies.measure import measure

    dev = resolve_device(device)
    model, loss_fn, data = call_factory(load_factory(target), target)
    torch.manual_seed(seed)
    model = model.to(dev).eval()
    H = curvop.hessian(model, loss_fn, data)
    say(f"curvop spectrum {target}: {H.shape[0]:,} parameters ({H.backend.describe()})\n")
    t = time.perf_counter()
    m = measure(H, k=k, trace_matvecs=trace_matvecs, steps=steps, probes=probes, seed=seed,
                progress=not quiet)
    say(m.table())
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    plot.plot_density(m.density, top=list(m.eigenvalues), path=str(path / "density.png"))
    results = {"command": f"curvop spectrum {target}", "hessian": H.backend.describe(), **m.as_dict(),
               "total_seconds": round(time.perf_counter() - t, 3)}
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nwrote {path / 'density.png'} and {path / 'results.json'}")
    return results
