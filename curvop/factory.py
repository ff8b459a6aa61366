"""``curvop.hessian`` and ``curvop.hessian_of``: build a HessianOperator, picking the backend."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from curvop import backends
from curvop.operator import HessianOperator

__all__ = ["hessian", "hessian_of"]


def _wrap(out: Any) -> HessianOperator:
    return out if isinstance(out, HessianOperator) else HessianOperator(out)


def hessian(model: Any, loss_fn: Any, data: Any, *, params: Any = None, backend: str | None = None,
            **options: Any) -> HessianOperator:
    """The Hessian of the loss of ``model`` over ``data``, as a :class:`HessianOperator`.

    The loss is ``loss_fn(model(inputs), targets)`` for torch, and ``loss_fn(targets,
    model(inputs))`` for Keras (its own convention, so ``keras.losses`` objects work unchanged).
    With torch, ``loss_fn=None`` means the model computes its own loss (Hugging Face style): a
    dict batch is passed as ``model(**batch)`` and the loss is the output's ``.loss``.

    The backend is chosen from the model's type (``torch.nn.Module`` -> ``"torch"``, a Keras model
    -> ``"tensorflow"``) unless ``backend=`` names one; a model that belongs to no framework (a
    plain function, or a tuple such as JAX's ``(apply_fn, params)``) goes to the framework of the
    first framework object (an array, a module) in it, else in ``params``. ``options`` go to the backend; see
    :func:`curvop.backends.torch.hessian` for the torch options (``hvp``, ``cache``, ``batched``,
    ``reduction``, ``batch_weight``, ``check_deterministic``, ...); an unknown option is a
    ``TypeError`` listing the valid ones.

    **Dataset loss.** ``data`` is one batch ``(inputs, targets)`` or a re-iterable of batches. With
    several batches the operator is the Hessian of the loss over the whole data set: for a
    mean-reduced loss, ``sum_b (n_b / N) H_b`` (each batch weighted by its size ``n_b``, ``N`` the
    total), which equals the Hessian of the mean over all samples even when the last batch is
    smaller; for a sum-reduced loss, ``sum_b H_b``.

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    >>> H = curvop.hessian(model, torch.nn.MSELoss(), (x, y))
    >>> H.shape
    (4, 4)
    """
    name = backend or _framework(model, params)
    return _wrap(backends.get(name)(model, loss_fn, data, params=params, **options))


def hessian_of(f: Any, params: Any, data: Any = None, *, backend: str | None = None,
               **options: Any) -> HessianOperator:
    """The Hessian of a scalar function ``f(params)`` (or ``f(params, batch)`` over ``data``).

    ``params`` is a tensor or a list/tuple/dict of tensors (torch tensors, ``tf.Variable``s, a JAX
    pytree); ``f`` receives the same structure and must compute with what it receives. The operator
    acts on all of them flattened in order. With ``data``, batches are combined as in :func:`hessian`.

    Examples
    --------
    >>> import torch, curvop
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> H = curvop.hessian_of(lambda w: (w ** 3).sum(), w)
    >>> H.to_dense()
    array([[ 6.,  0.],
           [ 0., 12.]])
    """
    if backend is None:
        leaf = _first_leaf(params)
        if isinstance(leaf, np.ndarray):
            raise TypeError(
                "params are numpy arrays, which could belong to any framework (numpy has no autodiff); "
                "pass backend='jax' to differentiate f with JAX (numpy leaves are converted to jax arrays), "
                "or use HessianOperator.from_hvp / from_grad if you have products or gradients"
            )
        backend = backends.detect(leaf)
    name = backend
    return _wrap(backends.get(name, "hessian_of")(f, params, data, **options))


def _framework(model: Any, params: Any) -> str:
    """The backend of ``model``: by its type, else by the first framework object in it or in ``params``.

    What a model made of functions and arrays means (JAX's ``(apply_fn, params)``, say) is the
    chosen backend's business: the factory only finds the framework, with the registry's
    :func:`curvop.backends.detect`, and holds no rule about any framework's conventions.
    """
    try:
        return backends.detect(model)
    except TypeError as err:
        for leaf in _leaves([model, params]):
            try:
                return backends.detect(leaf)
            except TypeError:
                continue  # a function, a number, None: not an array of any framework
        raise err


def _leaves(tree: Any) -> Iterator[Any]:
    """The leaves of nested lists, tuples and mappings, depth first, lazily (the first one is enough)."""
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif isinstance(tree, Mapping):
        for item in tree.values():
            yield from _leaves(item)
    else:
        yield tree


def _first_leaf(tree: Any) -> Any:
    while isinstance(tree, (list, tuple, dict)):
        if len(tree) == 0:
            raise ValueError("params is empty: pass the tensors to differentiate with respect to")
        tree = next(iter(tree.values())) if isinstance(tree, dict) else tree[0]
    return tree
