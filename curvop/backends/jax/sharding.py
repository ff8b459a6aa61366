"""Parameters sharded over several devices with ``jax.sharding``: where the flat vectors live.

The JAX backend's operator acts on the parameters flattened in pytree order, as
:func:`jax.flatten_util.ravel_pytree` would (so numpy vectors, probes drawn from a seed and
``H.to_numpy`` mean the same entries as for the unsharded model). ``ravel_pytree`` itself
concatenates the leaves into one *replicated* array: every device would hold all ``n`` entries of
every vector. When the leaves are sharded (a weight matrix split on its rows over a
:class:`jax.sharding.Mesh`, the biases replicated...), :class:`ShardedLayout` is used instead:

* a flat vector is a ``jax.Array`` of shape ``(n,)`` (``(n, k)`` for blocks) in the same order,
  split into contiguous equal chunks over the parameters' devices (``PartitionSpec("curvop_flat")``
  on a 1-D view of their devices), so each device holds ``n / D`` entries;
* a product unflattens the vector inside the jitted function with every leaf constrained to its
  parameter's sharding, and flattens the result with the flat sharding, so XLA moves the chunks
  device to device (no host transfer) and the products never gather a vector on one device;
* JAX refuses uneven shardings (``IndivisibleError``), so when ``D`` does not divide ``n`` the
  vectors are split over ``g = gcd(n, D)`` groups of devices and replicated within a group
  (``g = 1``: every device holds the whole vector); a :class:`ShardingWarning` says so.

The algorithms need nothing special: sums and inner products of sharded arrays are global.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["ShardedLayout", "ShardingWarning", "jax_data_parallel", "layout", "place"]

FLAT, COPIES = "curvop_flat", "curvop_copies"


class ShardingWarning(UserWarning):
    """The flat vectors cannot be split over all the parameters' devices (n not divisible)."""


def _devices(x: jax.Array) -> frozenset:
    return frozenset(x.sharding.device_set)


def _fmt(devices: frozenset) -> str:
    return ", ".join(str(d) for d in sorted(devices, key=lambda d: d.id))


def place(names: Sequence[str], leaves: list) -> list:
    """Check that the parameter leaves share one device set; return them ready for the backend.

    One device, or every leaf on the same several devices (sharded or replicated over a mesh),
    is accepted. Uncommitted leaves (``jnp.asarray`` of numpy, created without a device) follow
    the committed ones: onto their device, or replicated over their devices. Anything else is a ``ValueError`` naming two
    leaves and their devices.
    """
    committed = [(name, x) for name, x in zip(names, leaves) if x.committed]
    if not committed:
        return leaves  # all on the default device, wherever jit runs them
    first_name, first = committed[0]
    for name, x in committed[1:]:
        if _devices(x) != _devices(first):
            raise ValueError(
                f"parameters {first_name} and {name} are on different devices ({_fmt(_devices(first))} vs "
                f"{_fmt(_devices(x))}); curvop needs every leaf on one device (jax.device_put(params, device)) "
                "or every leaf sharded or replicated over the same devices, e.g. one jax.sharding.Mesh: "
                "jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(...)))"
            )
    where = first.sharding if len(_devices(first)) == 1 else _replicated(first)
    return [x if x.committed else jax.device_put(x, where) for x in leaves]


def _replicated(x: jax.Array) -> Any:
    s = x.sharding
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, PartitionSpec())
    return NamedSharding(Mesh(np.array(sorted(s.device_set, key=lambda d: d.id)), ("devices",)), PartitionSpec())


def layout(params: Any, batch: Any = None) -> "ShardedLayout | None":
    """The layout for ``params`` if some leaf is sharded over several devices, else ``None``.

    ``None`` (the plain ``ravel_pytree`` path) covers one device and data parallelism (every leaf
    replicated). ``batch`` (the first batch) is checked in every case: its committed arrays must be
    on the parameters' devices, else jit would fail with "incompatible devices".
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    devices = _devices(leaves[0])
    for x in jax.tree_util.tree_leaves(batch):
        if isinstance(x, jax.Array) and x.committed and _devices(x) != devices:
            raise ValueError(
                f"a batch array is on {_fmt(_devices(x))}, but the parameters are on {_fmt(devices)}; put "
                "the data on the parameters' devices (jax.device_put(batch, device), or for a mesh "
                "jax.device_put(batch, NamedSharding(mesh, PartitionSpec()))) or leave it uncommitted"
            )
    if len(devices) == 1 or all(x.sharding.is_fully_replicated for x in leaves):
        return None
    return ShardedLayout(leaves, treedef)


@dataclass(frozen=True)
class FlatSpec:
    """Shape, dtype and sharding of the flat vector, without building it (no gathered copy)."""

    shape: tuple
    dtype: Any
    sharding: NamedSharding

    def devices(self) -> set:
        return set(self.sharding.device_set)


class ShardedLayout:
    """Flatten and unflatten sharded parameter pytrees to flat vectors sharded over their devices.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from curvop.backends.jax.sharding import layout
    >>> layout({"w": jnp.ones((2, 2))}) is None      # one device: the plain ravel_pytree path
    True
    """

    def __init__(self, leaves: list, treedef: Any, groups: int | None = None):
        self._treedef = treedef
        self._shapes = [tuple(x.shape) for x in leaves]
        self._shardings = [x.sharding for x in leaves]
        self._offsets = [0, *np.cumsum([math.prod(s) for s in self._shapes]).tolist()]
        self.size = int(self._offsets[-1])
        self.dtype = leaves[0].dtype
        devices = _ordered_devices(leaves)
        # groups: how many parts the vectors are split into (gcd(n, D) unless given, for measurements)
        self.devices, self.groups = len(devices), groups or math.gcd(self.size, len(devices))
        mesh = Mesh(np.array(devices, dtype=object).reshape(self.groups, -1), (FLAT, COPIES))
        self.sharding = NamedSharding(mesh, PartitionSpec(FLAT))  # (n,) and (n, k): rows split
        self.replicated = NamedSharding(mesh, PartitionSpec())
        if groups is None and self.groups < self.devices:
            warnings.warn(
                f"the {self.size} parameters cannot be split evenly over {self.devices} devices (JAX shards "
                f"only evenly), so curvop's vectors are split over {self.groups} group(s) of devices and each "
                f"device holds {self.size // self.groups} entries of every vector instead of "
                f"{-(-self.size // self.devices)}; products and results are unaffected",
                ShardingWarning, stacklevel=4)

    def spec(self) -> tuple[FlatSpec, Callable[[jax.Array], Any]]:
        """What ``ravel_pytree(params)`` returns, without building the vector: ``(spec, unravel)``."""
        return FlatSpec((self.size,), self.dtype, self.sharding), self.unravel

    def ravel(self, tree: Any) -> jax.Array:
        """The leaves of ``tree`` (shaped like the parameters) as one flat sharded vector; traceable."""
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
        return jax.lax.with_sharding_constraint(flat, self.sharding)

    def unravel(self, v: jax.Array) -> Any:
        """A flat vector as a pytree shaped and sharded like the parameters; traceable."""
        o = self._offsets
        leaves = [jax.lax.with_sharding_constraint(v[o[i]:o[i + 1]].reshape(shape), sharding)
                  for i, (shape, sharding) in enumerate(zip(self._shapes, self._shardings))]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def sharding_for(self, shape: tuple) -> NamedSharding:
        """The flat sharding for ``(n,)``/``(n, k)`` arrays; replicated for anything else (coefficients)."""
        return self.sharding if len(shape) in (1, 2) and shape[0] == self.size else self.replicated

    def describe(self) -> str:
        return f"{self.devices} devices, vectors split {self.groups} ways"


def _ordered_devices(leaves: list) -> list:
    """The parameters' devices in the order of the first mesh found (else by id)."""
    for x in leaves:
        if isinstance(x.sharding, NamedSharding):
            return list(x.sharding.mesh.devices.flat)
    return sorted(leaves[0].sharding.device_set, key=lambda d: d.id)


# --- data parallelism: replicated parameters, batches split over the devices -----------------------
def jax_data_parallel(params: Any, data: Any, devices: Any = None, axis: str = "data") -> tuple[Any, Any]:
    """Replicate ``params`` and shard every batch of ``data`` along its first axis over ``devices``.

    Returns ``(params, data)`` to pass to :func:`curvop.hessian` / :func:`curvop.hessian_of` with
    the JAX backend: each product then runs on all devices, each on its slice of every batch, and
    XLA inserts the all-reduce (sums over the sample axis become cross-device reductions). A batch's
    size must be divisible by the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), (axis,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(axis))

    def put_batch(batch: Any) -> Any:
        def put(x: Any) -> Any:
            if not hasattr(x, "shape") or len(x.shape) == 0:
                return x
            if x.shape[0] % len(devices):
                raise ValueError(
                    f"a batch of {x.shape[0]} samples cannot be split evenly over {len(devices)} devices; "
                    "use batch sizes divisible by the device count (drop or pad the last batch)"
                )
            return jax.device_put(x, sharded)

        return jax.tree_util.tree_map(put, batch)

    params = jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), params)
    if data is None:
        return params, None
    if isinstance(data, (tuple, list)) and len(data) >= 1 and hasattr(data[0], "shape"):
        return params, put_batch(data)
    return params, [put_batch(b) for b in data]
