"""The JAX backend: JAX's autodiff, the model adapters (Flax linen and NNX, Equinox) and sharding.

Everything here imports JAX; nothing outside this folder imports it. One module a concern:

* ``backend``: :class:`JaxBackend`, the template plus JAX's jitted products (``hessian``, ``hessian_of``);
* ``model``: parameter pytrees from Flax and Equinox models, and how a model is applied;
* ``sharding``: parameters sharded with ``jax.sharding`` (vectors split over the devices), and
  :func:`jax_data_parallel` (replicated parameters, batches split over the devices).
"""

from curvop.backends.jax.backend import JaxBackend, hessian, hessian_of, prepare_params
from curvop.backends.jax.sharding import ShardingWarning, jax_data_parallel

__all__ = ["JaxBackend", "ShardingWarning", "hessian", "hessian_of", "jax_data_parallel", "prepare_params"]
