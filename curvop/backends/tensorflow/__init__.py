"""The TensorFlow backend: TensorFlow's autodiff and the Keras 3 / ``tf.Module`` model adapter.

Everything here imports TensorFlow; nothing outside this folder imports it. One module a concern:

* ``backend``: :class:`TensorFlowBackend`, the template plus TensorFlow's products in a
  ``tf.function`` (``hessian``, ``hessian_of``);
* ``model``: variables of Keras models and ``tf.Module``s, batch signatures, Keras loss objects.
"""

from curvop.backends.tensorflow.backend import LossPrecisionError, TensorFlowBackend, hessian, hessian_of

__all__ = ["TensorFlowBackend", "LossPrecisionError", "hessian", "hessian_of"]
