"""``torch.func.linearize`` that stays correct when its map is used again.

``torch.func.linearize(f, x)`` traces ``v -> jvp(f, x, v)`` with ``make_fx`` and folds everything
that does not depend on ``v`` into constants computed once. The traced graph keeps torch's in-place
ops, and some of them write into a folded constant: the C++ ``binary_cross_entropy_with_logits``
(``exp_``, ``log_``, ``add_`` on its intermediates), the LSTM/GRU/RNN layers, ... Each call then
changes the constants that the next call reads: in torch 2.13 the same product, repeated, is
off by 0, 5e-3, 0.1, 0.8, inf (BCE with logits), 0.02 on a one-layer LSTM. The first call is always
right, so a check that uses the map once cannot see it.

:func:`linearize` traces and folds the same way, then finds every in-place op of the graph whose
written tensor is (a view of) a constant, and gives that op a fresh copy of the constant on each
call: the constants never change, and a product costs one copy of the written tensors more (an
activation-sized tensor per such op; none for models without them). A graph in which a written
constant shares memory with another constant it would have to stay in step with is refused with
:class:`UnsafeLinearization`, and the backend then computes forward-mode products afresh.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch.fx.experimental.const_fold import FoldedGraphModule, split_const_subgraphs
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["UnsafeLinearization", "linearize", "written_constants"]

_clone = torch.ops.aten.clone.default


class UnsafeLinearization(RuntimeError):
    """The traced map writes into a constant that cannot be given its own copy."""


def linearize(fn: Callable[[Any], Any], primals: Any) -> Callable[[Any], Any]:
    """``v -> jvp(fn, (primals,), (v,))[1]`` with what does not depend on ``v`` computed once.

    ``primals`` and ``v`` are the same pytree of tensors (a dict name -> tensor). The caller holds
    the forward-AD lock. Raises :class:`UnsafeLinearization` (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    >>> lin = linearize(lambda p: {"w": torch.tanh(p["w"]) * x}, {"w": x.clone()})
    >>> lin({"w": torch.ones(2, dtype=torch.float64)})["w"]
    tensor([ 0.3932, -0.4200], dtype=torch.float64)
    """
    flat, spec = tree_flatten(primals)
    out_spec: list[Any] = []

    def tangent_map(*tangents: torch.Tensor) -> list[torch.Tensor]:
        with fwAD.dual_level():
            out = fn(tree_unflatten([fwAD.make_dual(p, t) for p, t in zip(flat, tangents)], spec))
            leaves, ospec = tree_flatten(out)
            out_spec.append(ospec)
            result = []
            for o in leaves:
                t = fwAD.unpack_dual(o).tangent
                result.append(torch.zeros_like(o) if t is None else t)
            return result

    with warnings.catch_warnings():  # torch.fx const-folding chatter, harmless
        warnings.simplefilter("ignore", UserWarning)
        graph = make_fx(tangent_map)(*[p.new_empty(()).expand_as(p) for p in flat])
        folded = split_const_subgraphs(graph)
    _protect(folded)

    def apply(tangents: Any) -> Any:
        return tree_unflatten(folded(*tree_flatten(tangents)[0]), out_spec[0])

    return apply


def _written(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The arguments an in-place op node writes into (none for a functional op)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, torch.fx.Node):
            out.append(value)
    return out


def _root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor ``node`` is a view of, following ops whose output aliases their first input."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if (schema is None or not schema.returns or schema.returns[0].alias_info is None or not node.args
                or not isinstance(node.args[0], torch.fx.Node)):
            break
        node = node.args[0]
    return node


def _is_constant(node: torch.fx.Node) -> bool:
    """A constant of the graph: an attribute, or an item of one (the folded constants are a list)."""
    if node.op == "get_attr":
        return True
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].op == "get_attr")


def written_constants(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The constants and inputs (``placeholder``) that an in-place op of ``gm`` writes into."""
    roots: dict[torch.fx.Node, None] = {}
    for node in gm.graph.nodes:
        for target in _written(node):
            root = _root(target)
            if root.op == "placeholder" or _is_constant(root):
                roots[root] = None
    return list(roots)


def _value(gm: torch.nn.Module, node: torch.fx.Node) -> Any:
    """The tensor a constant node stands for."""
    if node.op == "get_attr":
        return _attr(gm, node.target)
    return _attr(gm, node.args[0].target)[node.args[1]]


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _protect(gm: torch.fx.GraphModule) -> None:
    """Give every written constant or input a copy of its own on each call (see the module docstring)."""
    written = written_constants(gm)
    if not written:
        return
    if isinstance(gm, FoldedGraphModule) and not gm.has_folding_been_run:
        gm.run_folding()  # what the first call does: the folded constants exist from here on
    constants = {n: _value(gm, n) for n in gm.graph.nodes if _is_constant(n) and n.op != "get_attr"
                 or n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.Tensor)}
    for node in written:
        if node.op == "placeholder":
            continue
        mine = constants.get(node)
        if not isinstance(mine, torch.Tensor):
            raise UnsafeLinearization(f"an in-place op writes into {node.name}, which is not a tensor")
        storage = mine.untyped_storage().data_ptr()
        for other_node, other in constants.items():
            if (other_node is not node and isinstance(other, torch.Tensor) and other.numel() and mine.numel()
                    and other.untyped_storage().data_ptr() == storage):
                raise UnsafeLinearization(f"an in-place op writes into {node.name}, which shares memory with "
                                          f"{other_node.name}")
    for node in written:
        with gm.graph.inserting_after(node):
            copy = gm.graph.call_function(_clone, (node,))
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    gm.graph.lint()
    gm.recompile()
