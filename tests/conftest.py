import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow C++ logs

import _torchvision_cpu  # noqa: E402

_torchvision_cpu.install()  # torchvision's CUDA wheel next to CPU torch: see tests/_torchvision_cpu.py
