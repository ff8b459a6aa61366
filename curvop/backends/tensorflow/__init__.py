"""The TensorFlow backend: TensorFlow's autodiff and the Keras 3 / ``tf.Module`` model adapter.

Everything here imports TensorFlow; nothing outside this folder imports it. One module a concern:

* ``backend``: :class:`TensorFlowBackend`, the template plus TensorFlow's products in a
  ``tf.function`` (``hessian``, ``hessian_of``);
* ``curvature``: the curvature family (GGN, Fisher, Jacobian) on the backend; ``sampling``: the
  Monte-Carlo Fisher's target draws (:func:`sample_targets`);
* ``model``: variables of Keras models and ``tf.Module``s, batch signatures, Keras loss objects.
"""

from curvop.backends.tensorflow.backend import LossPrecisionError, TensorFlowBackend, hessian, hessian_of
from curvop.backends.tensorflow.curvature import TensorFlowCurvature, fisher, ggn, jacobian
from curvop.backends.tensorflow.sampling import likelihood_of, sample_targets

__all__ = ["TensorFlowBackend", "TensorFlowCurvature", "LossPrecisionError", "fisher", "ggn", "hessian", "hessian_of",
           "jacobian", "likelihood_of", "sample_targets"]
