"""``curvop spectrum MODULE:FACTORY``: measure the Hessian of a user's own PyTorch model.

The factory (a function in an importable module or in a ``.py`` file) takes no arguments and
returns ``(model, loss_fn, data)``, exactly what :func:`curvop.hessian` takes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pathlib
import pkgutil
import random
import re
import sys
import time
from typing import Any, Callable, Iterator, Mapping

__all__ = ["InputError", "UserCodeError", "as_script", "load_factory", "call_factory", "resolve_device",
           "seed_everything", "run"]


class InputError(Exception):
    """Bad input from the user (module, factory, device); reported as one line, no traceback."""


class UserCodeError(InputError):
    """The user's module or factory raised or called ``sys.exit``; the original error is the cause."""


def _is_path(module: str) -> bool:
    return module.endswith(".py") or os.sep in module or "/" in module


@contextlib.contextmanager
def as_script(module: str) -> Iterator[None]:
    """``sys.path`` and ``sys.argv`` as ``python FILE`` (or ``python -m MODULE``) sets them.

    For a file, its folder goes first on ``sys.path`` (so it imports its siblings) and
    ``sys.argv == [FILE]``; for a module name, the working directory goes first and
    ``sys.argv == [MODULE]``. A module that parses its command line at import therefore sees an
    empty one, not curvop's. Both are restored on exit.

    >>> import sys
    >>> with as_script("exp/model.py"):
    ...     sys.argv == ["exp/model.py"] and sys.path[0].endswith("exp")
    True
    >>> "exp/model.py" in sys.argv
    False
    """
    path, argv = list(sys.path), sys.argv
    folder = str(pathlib.Path(module).resolve().parent) if _is_path(module) else os.getcwd()
    sys.path.insert(0, folder)
    sys.argv = [module]
    try:
        yield
    finally:
        sys.path[:] = path
        sys.argv = argv


def _user(fn: Callable[[], Any], what: str, failed: str) -> Any:
    """Run the user's code; anything it raises (``SystemExit`` too) becomes a :class:`UserCodeError`."""
    try:
        return fn()
    except InputError:
        raise
    except SystemExit as err:
        raise UserCodeError(f"{what} called sys.exit({err.code!r}); code that parses its command line belongs "
                            "under `if __name__ == '__main__':`") from err
    except Exception as err:  # noqa: BLE001 - any error raised by the user's code
        raise UserCodeError(f"{what} {failed} {type(err).__name__}: {' '.join(str(err).split())}") from err


def _import_file(module: str) -> str:
    """Import a ``.py`` file as a module registered in ``sys.modules``; return its name there.

    The standard library's module import (``importlib.util.spec_from_file_location``), not
    ``runpy.run_path``: run_path executes the file in a temporary module ``<run_path>`` that it
    removes from ``sys.modules`` afterwards, so the classes the file defines cannot be pickled
    (a ``DataLoader`` with worker processes under the ``spawn`` start method, ``torch.save`` of a
    model, multiprocessing). ``FACTORY`` itself is resolved with :func:`pkgutil.resolve_name`.
    """
    path = pathlib.Path(module)
    if not path.is_file():
        raise InputError(f"no such file: {module}")
    name = "_curvop_user_" + re.sub(r"\W", "_", path.stem)  # a valid module name, whatever the file's
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise InputError(f"cannot import {module}: not a Python source file (expected a .py file)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        _user(lambda: spec.loader.exec_module(mod), f"importing {module!r}", "failed:")
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return name


def _import_module(module: str) -> str:
    def imp() -> None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (module == err.name or module.startswith(err.name + ".")):
                raise InputError(f"cannot import module {module!r}: no module named {err.name!r}") from None
            raise

    _user(imp, f"importing {module!r}", "failed:")
    return module


def load_factory(target: str) -> Callable[[], Any]:
    """The function named by ``"MODULE:FACTORY"`` (``MODULE`` a module name or a ``.py`` path).

    The module is imported under :func:`as_script`; ``FACTORY`` may be dotted
    (``pkg.mod:Builder.make``), resolved with :func:`pkgutil.resolve_name`.
    """
    module, sep, name = target.rpartition(":")
    if not sep or not module or not name:
        raise InputError(f"expected MODULE:FACTORY (e.g. mymodels:make or ./exp.py:make), got {target!r}")
    with as_script(module):
        registered = _import_file(module) if _is_path(module) else _import_module(module)
    try:
        factory = pkgutil.resolve_name(f"{registered}:{name}")
    except (AttributeError, ValueError):
        raise InputError(f"module {module!r} has no attribute {name!r}") from None
    if not callable(factory):
        raise InputError(f"{target} is a {type(factory).__name__}, not a function")
    return factory


def call_factory(factory: Callable[[], Any], target: str) -> tuple[Any, Any, Any]:
    """Call the factory and check that it returned ``(torch.nn.Module, loss, data)``; the loss is a
    callable, or ``None`` when the model computes its own (as :func:`curvop.hessian` takes it)."""
    import torch

    with as_script(target.rpartition(":")[0]):
        out = _user(factory, f"{target}()", "raised")
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise InputError(f"{target}() must return (model, loss_fn, data), got {got}")
    model, loss_fn, data = out
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{target}() returned a {type(model).__name__} as model; expected a torch.nn.Module")
    if loss_fn is not None and not callable(loss_fn):
        raise InputError(f"{target}() returned a {type(loss_fn).__name__} as loss_fn; expected a callable, or None "
                         "when the model computes its own loss (a batch dict with labels)")
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


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's and torch's global generators (what a factory may draw from)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(target: str, *, out: str = "curvop-spectrum", device: str = "cpu", k: int = 5, seed: int = 0,
        steps: int = 80, probes: int = 2, trace_matvecs: int = 99, quiet: bool = False,
        say: Callable[[str], None] = print, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load the factory, measure the Hessian, write ``density.png`` and ``results.json`` to ``out``.

    ``out`` is checked (and created) before the module is imported. ``random``, numpy and torch
    are seeded with ``seed`` just before, so the factory's weights and data are reproducible.
    ``options`` (default: this call's arguments) are recorded in ``results.json``.
    """
    import curvop
    from curvop import plot
    from curvop.studies.measure import measure

    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out} is a file; pass a directory (it is created if missing)")
    dev = resolve_device(device)
    path.mkdir(parents=True, exist_ok=True)
    if options is None:
        options = dict(target=target, out=out, device=device, k=k, seed=seed, steps=steps, probes=probes,
                       trace_matvecs=trace_matvecs, quiet=quiet)
    seed_everything(seed)
    model, loss_fn, data = call_factory(load_factory(target), target)
    model = model.to(dev).eval()
    H = curvop.hessian(model, loss_fn, data)
    say(f"curvop spectrum {target}: {H.shape[0]:,} parameters ({H.backend.describe()})\n")
    t = time.perf_counter()
    m = measure(H, k=k, trace_matvecs=trace_matvecs, steps=steps, probes=probes, seed=seed,
                progress=not quiet)
    say(m.table())
    plot.plot_density(m.density, top=list(m.eigenvalues), path=str(path / "density.png"))
    command = (f"curvop spectrum {target} -k {k} --seed {seed} --device {device} --steps {steps} "
               f"--probes {probes} --trace-matvecs {trace_matvecs}")
    if options.get("threads") is not None:
        command += f" --threads {options['threads']}"
    results = {"command": command, "options": dict(options), "hessian": H.backend.describe(), **m.as_dict(),
               "total_seconds": round(time.perf_counter() - t, 3)}
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nwrote {path / 'density.png'} and {path / 'results.json'}")
    return results
