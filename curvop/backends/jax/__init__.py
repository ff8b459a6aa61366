"""The JAX backend: JAX's autodiff, the model adapters (Flax linen and NNX, Equinox) and sharding.

Everything here imports JAX; nothing outside this folder imports it. One module a concern:

* ``backend``: :class:`JaxBackend`, the template plus JAX's jitted products (``hessian``, ``hessian_of``);
* ``curvature``: the curvature family (GGN, Fisher, Jacobian) on the backend; ``sampling``: the
  Monte-Carlo Fisher's target draws (:func:`sample_targets`);
* ``model``: parameter pytrees from Flax and Equinox models, and how a model is applied;
* ``sharding``: parameters sharded with ``jax.sharding`` (vectors split over the devices), and
  :func:`jax_data_parallel` (replicated parameters, batches split over the devices).
"""

from curvop.backends.jax.backend import JaxBackend, hessian, hessian_of, prepare_params
from curvop.backends.jax.curvature import JaxCurvature, fisher, ggn, jacobian
from curvop.backends.jax.sampling import sample_targets
from curvop.backends.jax.sharding import ShardingWarning, jax_data_parallel

__all__ = ["JaxBackend", "JaxCurvature", "ShardingWarning", "fisher", "ggn", "hessian", "hessian_of", "jacobian",
           "jax_data_parallel", "prepare_params", "sample_targets"]
