"""Which parameters a Hessian is taken with respect to: one selection rule for every backend."""

from __future__ import annotations

from typing import Any, Callable, Iterable

__all__ = ["select"]


def select(
    named: dict[str, Any],
    params: Any,
    *,
    default: Callable[[str, Any], bool],
    is_leaf: Callable[[Any], bool],
    sep: str = ".",
    aliases: Callable[[Any], Iterable[Any]] = lambda v: (v,),
    what: str = "parameter",
) -> dict[str, Any]:
    """Pick entries of ``named`` (name -> parameter) as ``params`` asks.

    ``params`` is ``None`` (the entries ``default(name, value)`` accepts), a predicate on names,
    or a name / parameter / list of them. A name selects that entry or, as a prefix followed by
    ``sep``, every entry of that module or layer (``"fc1"`` -> ``fc1.weight``, ``fc1.bias``).
    ``aliases(value)`` lists the objects that stand for a value (a Keras variable and the
    ``tf.Variable`` behind it). Errors name the problem and what exists.
    """
    if params is None:
        out = {k: v for k, v in named.items() if default(k, v)}
    elif callable(params) and not is_leaf(params):
        out = {k: v for k, v in named.items() if params(k)}
    else:
        items = [params] if isinstance(params, str) or is_leaf(params) else list(params)
        by_id = {id(a): k for k, v in named.items() for a in aliases(v)}
        out = {}
        for item in items:
            if isinstance(item, str):
                hits = [k for k in named if k == item or k.startswith(item + sep)]
                if not hits:
                    raise KeyError(f"no {what} named {item!r}; the model has: {', '.join(named)}")
                out.update((k, named[k]) for k in hits)
            elif id(item) in by_id:
                out[by_id[id(item)]] = named[by_id[id(item)]]
            else:
                raise TypeError(f"params entries must be {what} names or {what}s of this model")
    if not out:
        raise ValueError(f"no {what}s selected: the Hessian would be empty")
    return out
