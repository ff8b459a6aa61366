import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow C++ logs
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, not two each on two cores
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_var, "1")

import _torchvision_cpu  # noqa: E402

_torchvision_cpu.install()  # torchvision's CUDA wheel next to CPU torch: see tests/_torchvision_cpu.py

# --- Longest files first --------------------------------------------------------------------------
# `pytest -n 2 --dist loadfile` hands whole files to the two workers in collection order, and xdist's
# default order is "most tests first". Files with few but slow tests (the docs samples, the benchmark
# smoke runs, the sharded-JAX worker) then started last, and one worker ran on for minutes after the
# other had finished. Files go out longest first instead (LPT scheduling), by the seconds each took
# in a recorded run (tests/durations.json); refresh it with `--store-durations`. The order changes
# which worker runs a file, never what a test checks.
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402

_DURATIONS = pathlib.Path(__file__).with_name("durations.json")
_measured: dict[str, float] = {}


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test file's seconds to tests/durations.json (the run order)")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    seconds = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    unknown = statistics.median(seconds.values()) if seconds else 0.0
    items.sort(key=lambda item: -seconds.get(_file_of(item.nodeid), unknown))  # stable within a file


def pytest_runtest_logreport(report):
    _measured[_file_of(report.nodeid)] = _measured.get(_file_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        old = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
        merged = {**old, **{name: round(t, 1) for name, t in _measured.items()}}
        _DURATIONS.write_text(json.dumps(dict(sorted(merged.items(), key=lambda kv: -kv[1])), indent=1) + "\n")
