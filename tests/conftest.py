import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow C++ logs
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, not two each on two cores
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_var, "1")

import _torchvision_cpu  # noqa: E402

_torchvision_cpu.install()  # torchvision's CUDA wheel next to CPU torch: see tests/_torchvision_cpu.py
