"""A product mode that can differentiate the model: fall back, or say which mode works (framework-free).

A mode is a pair ``(hvp, cache)``. Some models cannot be differentiated in some modes: forward-mode
AD is missing for an op, ``torch.func.linearize`` cannot trace a data-dependent branch, TensorFlow's
``ForwardAccumulator`` fails inside a ``while`` loop. The framework recognises such errors
(``backend._mode_failure(err)`` gives a short reason, ``None`` for any other error, which is raised
as it is: a shape bug must surface). :func:`settle` runs the first work that needs a product
(the build's checks and cache, or the first product) and, on such a failure:

* with the option left at ``"auto"``, runs it again in the next mode that works and records why
  in ``backend.fallback`` (shown by ``describe()``);
* with a mode the user named, raises :class:`~curvop._errors.ModeError`, one line naming the mode
  that works;
* when no mode works, raises ``backend._underivable(failures)`` (the framework names the op and a
  workaround).
"""

from __future__ import annotations

from typing import Any, Callable

from curvop._errors import ModeError

__all__ = ["ModeError", "label", "settle"]


def label(mode: str, cache: bool) -> str:
    """``"hvp='forward', cache=True"``: a mode as the user writes it."""
    return f"hvp={mode!r}, cache={bool(cache)}"


def _allowed(backend: Any, mode: str, cache: bool, auto_cache: bool) -> bool:
    hvp, want = backend._options["hvp"], backend._options["cache"]
    return hvp in ("auto", mode) and (cache in (False, auto_cache) if want == "auto" else bool(want) == cache)


def settle(backend: Any, run: Callable[[], Any]) -> Any:
    """``run()`` in the backend's mode, or in the first other mode that can differentiate the model."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - classified below; anything else is raised as it is
        reason = backend._mode_failure(err)
        if reason is None:
            raise
        first, failures, cause = (backend.mode, backend.cache), {(backend.mode, backend.cache): err}, err
    auto_cache = first[1]
    others = [m for m in backend._modes() if m != first]
    # the options the user left to curvop first, then the fewest changes, then the same hvp
    others.sort(key=lambda m: (not _allowed(backend, *m, auto_cache), (m[0] != first[0]) + (m[1] != first[1]),
                               m[0] != first[0]))
    for mode, cache in others:
        backend._switch(mode, cache)
        try:
            out = run()
        except Exception as e:  # noqa: BLE001
            if backend._mode_failure(e) is None:
                raise
            failures[(mode, cache)] = e
            continue
        if _allowed(backend, mode, cache, auto_cache):
            backend.fallback = f"{label(*first)} failed: {reason}; using {label(mode, cache)}"
            return out
        backend._switch(*first)
        raise ModeError(
            f"{label(*first)} cannot differentiate this model ({reason}); {label(mode, cache)} works: pass "
            f"that, or leave hvp and cache at 'auto'", mode=mode, cache=cache) from cause
    backend._switch(*first)
    raise backend._underivable(failures)
