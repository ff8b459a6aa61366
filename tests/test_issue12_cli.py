"""Issue 12, items 15 (the ``curvop`` command) and 16 (docs and printed output).

Each test is named after the item it covers; each failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from curvop.cli import build_parser, main  # noqa: E402
from curvop.studies.measure import measure  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
FAST = ["-k", "1", "--steps", "5", "--probes", "2", "--trace-matvecs", "6", "--quiet"]

BODY = """
import torch

def make():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, torch.nn.CrossEntropyLoss(), (x, y)

def bad_target():
    model, loss_fn, (x, y) = make()
    return model, loss_fn, (x, torch.full_like(y, 7))

def exits():
    import sys
    sys.exit(4)
"""


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("curvop: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "curvop", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


# ---- item 15: the CLI -------------------------------------------------------------------------


def test_issue12_item15_error_outside_the_caught_types_is_one_line(tmp_path, capsys):
    f = _write(tmp_path / "m.py", BODY)
    code = main(["spectrum", f"{f}:bad_target", *FAST, "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "IndexError", "out of bounds", "--traceback")


def test_issue12_item15_traceback_flag_prints_the_full_traceback(tmp_path, capsys):
    f = _write(tmp_path / "m.py", BODY)
    code = main(["spectrum", f"{f}:bad_target", *FAST, "--out", str(tmp_path / "o"), "--traceback"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "IndexError" in err


def test_issue12_item15_sys_exit_at_import_is_reported_as_the_users(tmp_path, capsys):
    f = _write(tmp_path / "quits.py", "import sys\nsys.exit(3)\n")
    code = main(["spectrum", f"{f}:make", *FAST, "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "quits.py", "sys.exit(3)")


def test_issue12_item15_sys_exit_in_the_factory_is_reported_as_the_users(tmp_path, capsys):
    f = _write(tmp_path / "m.py", BODY)
    code = main(["spectrum", f"{f}:exits", *FAST, "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "exits()", "sys.exit(4)")


def test_issue12_item15_module_parsing_sys_argv_at_import_sees_its_own_argv(tmp_path):
    # run as `python exp/model.py`, this module parses an empty command line and works
    _write(tmp_path / "exp" / "model.py", "import argparse\n"
           "ARGS = argparse.ArgumentParser().parse_args()\n" + BODY)
    done = _cli("spectrum", "exp/model.py:make", *FAST, "--out", "o", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage:" not in done.stderr


def test_issue12_item15_sibling_modules_import_as_with_python_file(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "exp" / "helper.py", BODY)
    _write(tmp_path / "exp" / "model.py", "from helper import make\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    code = main(["spectrum", "exp/model.py:make", *FAST, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert sys.path == path_before


def test_issue12_item15_file_module_is_a_real_module(tmp_path, capsys):
    # a dataclass under `from __future__ import annotations` needs its module in sys.modules
    f = _write(tmp_path / "cfg.py", "from __future__ import annotations\nimport dataclasses\n"
               "@dataclasses.dataclass\nclass Config:\n    width: int = 6\n" + BODY)
    code = main(["spectrum", f"{f}:make", *FAST, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err


def test_issue12_item15_file_with_dots_or_dashes_in_its_name_imports(tmp_path, capsys):
    f = _write(tmp_path / "my-exp.v2.py", BODY)
    code = main(["spectrum", f"{f}:make", *FAST, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err


def test_issue12_item15_spectrum_out_is_a_file_fails_before_any_work(tmp_path, capsys):
    marker = tmp_path / "factory-was-called"
    f = _write(tmp_path / "m.py", BODY + f"\ndef marked():\n    open({str(marker)!r}, 'w').close()\n"
               "    return make()\n")
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    code = main(["spectrum", f"{f}:marked", *FAST, "--out", str(out)])
    _one_line_error(capsys, code, "--out", "is a file")
    assert not marker.exists() and out.read_text() == "keep me"


def test_issue12_item15_study_out_is_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    from curvop.studies import bn_residual

    calls = []
    monkeypatch.setattr(bn_residual, "run", lambda *a, **k: calls.append(a) or {})
    out = tmp_path / "report.md"
    out.write_text("keep me")
    code = main(["study", "bn-residual", "--quick", "--quiet", "--out", str(out)])
    _one_line_error(capsys, code, "--out", "is a file")
    assert calls == [] and out.read_text() == "keep me"


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_issue12_item15_threads_zero_or_negative_is_a_usage_error(tmp_path, capsys, threads):
    f = _write(tmp_path / "m.py", BODY)
    with pytest.raises(SystemExit) as exc:
        main(["spectrum", f"{f}:make", *FAST, "--threads", threads, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_issue12_item15_seed_seeds_the_users_factory(tmp_path, capsys):
    # the factory draws its weights and data from torch's global generator, unseeded
    f = _write(tmp_path / "m.py", BODY)

    states = iter(range(1000, 1003))

    def run(seed: str) -> dict:
        torch.manual_seed(next(states))  # a different state before each run, as in separate processes
        assert main(["spectrum", f"{f}:make", *FAST, "--json", "--seed", seed, "--out", str(tmp_path / "o")]) == 0
        return json.loads(capsys.readouterr().out)

    first, second, other = run("0"), run("0"), run("1")
    assert first["eigenvalues"] == second["eigenvalues"] and first["trace"] == second["trace"]
    assert first["eigenvalues"] != other["eigenvalues"]


def test_issue12_item15_results_json_records_every_option(tmp_path):
    f = _write(tmp_path / "m.py", BODY)
    out = tmp_path / "o"
    argv = ["spectrum", f"{f}:make", "-k", "2", "--steps", "7", "--probes", "3", "--trace-matvecs", "8",
            "--seed", "5", "--threads", "1", "--device", "cpu", "--quiet", "--json", "--out", str(out)]
    assert main(argv) == 0
    recorded = json.loads((out / "results.json").read_text())["options"]
    parsed = vars(build_parser().parse_args(argv))
    for name, value in parsed.items():
        if name not in ("func", "command"):
            assert recorded[name] == value, name


def test_issue12_item15_spectrum_uses_the_thread_policy_of_demo():
    parser = build_parser()
    assert parser.parse_args(["spectrum", "m.py:make"]).threads == parser.parse_args(["demo"]).threads == 1


def test_issue12_item15_main_leaves_torch_threads_as_it_found_them(tmp_path):
    f = _write(tmp_path / "m.py", BODY)
    torch.set_num_threads(2)
    assert main(["spectrum", f"{f}:make", *FAST, "--threads", "1", "--out", str(tmp_path / "o")]) == 0
    assert torch.get_num_threads() == 2


# ---- item 16: what a newcomer reads -----------------------------------------------------------


def test_issue12_item16_slq_trace_is_shown_with_its_standard_error():
    lam = np.concatenate([[50.0, 30.0], np.linspace(0.0, 1.0, 60)])
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((62, 62)))
    A = (Q * lam) @ Q.T
    m = measure(A, k=2, trace_matvecs=20, steps=62, probes=4, seed=0)
    per_probe = np.array([m.n * np.dot(w, x) for x, w in zip(m.density.nodes, m.density.weights)])
    stderr = per_probe.std(ddof=1) / 2
    row = next(line for line in m.table().splitlines() if "SLQ" in line)
    assert "±" in row and f"{m.density.trace():.6g} ± {stderr:.6g}" in row
    assert m.as_dict()["density_trace_stderr"] == pytest.approx(stderr)
    assert abs(m.density.trace() - lam.sum()) <= 4 * stderr  # the error bar covers the truth


def test_issue12_item16_slq_trace_without_an_error_bar_is_not_shown():
    A = np.diag(np.linspace(1.0, 2.0, 30))
    m = measure(A, k=2, trace_matvecs=10, steps=10, probes=1, seed=0)
    assert fmt_in_table(m.density.trace(), m.table()) is False
    assert m.as_dict()["density_trace_stderr"] is None


def fmt_in_table(x: float, table: str) -> bool:
    return any(f"{x:.6g}" in line for line in table.splitlines())


def test_issue12_item16_index_page_prints_no_trace_without_error_bar(capsys):
    page = (DOCS / "index.md").read_text()
    code = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    exec(compile("\n".join(code), "index.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    numbers = re.findall(r"-?\d+\.\d+(?: ± \d+\.\d+)?", printed.split("]")[-1])
    assert numbers and all("±" in n for n in numbers), printed


def test_issue12_item16_choosing_a_backend_tells_the_truth():
    page = (DOCS / "choosing-a-backend.md").read_text()
    assert '| `"numpy"` |' not in page  # curvop.hessian on a matrix or a callable raises
    assert "curvop.aslinearoperator" in page and "HessianOperator.from_hvp" in page
    keras_row = next(line for line in page.splitlines() if line.startswith("| a Keras model"))
    assert "forward-over-reverse" in keras_row
    code = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    ns: dict = {"__name__": "__docs__"}
    exec(compile("\n".join(code), "choosing-a-backend.md", "exec"), ns)  # the calls it shows work


def test_issue12_item16_keras_default_is_forward_over_reverse():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import curvop

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    H = curvop.hessian(model, keras.losses.MeanSquaredError(), (x, y))
    assert H.backend.mode == "forward"


def test_issue12_item16_scipy_page_damps_without_a_dense_identity():
    code = "\n".join(re.findall(r"^```python\n(.*?)^```", (DOCS / "scipy.md").read_text(), flags=re.S | re.M))
    assert "cg(" in code and "np.eye" not in code and "np.identity" not in code
    ns: dict = {"__name__": "__docs__"}
    exec(compile(code, "scipy.md", "exec"), ns)  # the damped solve still converges
    assert not any(isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[0] == ns["n"] == v.shape[1]
                   for v in ns.values())  # no n x n array anywhere in the page's namespace


def test_issue12_item16_own_algorithm_page_does_not_say_backends_are_to_come():
    page = (DOCS / "own-algorithm.md").read_text()
    assert "to come" not in page and "as their backends land" not in page
    assert all(name in page for name in ("TensorFlow", "JAX", "CuPy"))


def test_issue12_item16_own_algorithm_estimator_runs_on_jax_and_tensorflow_arrays():
    page = (DOCS / "own-algorithm.md").read_text()
    ns: dict = {}
    exec(compile(re.findall(r"```python\n(.*?)```", page, flags=re.S)[0], "own-algorithm.md", "exec"), ns)
    f, A = ns["frobenius_norm_squared"], ns["A"]
    A32 = A.astype(np.float32)  # each framework's default precision; no global setting is touched
    expected, _ = f(A32, num_matvecs=100, seed=1)
    ran = 0
    for name in ("jax.numpy", "tensorflow"):
        try:
            mod = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        native = mod.asarray(A32) if name == "jax.numpy" else mod.constant(A32)
        got, _ = f(native, num_matvecs=100, seed=1)
        assert np.isclose(got, expected, rtol=1e-4), name
        ran += 1
    if not ran:
        pytest.skip("neither JAX nor TensorFlow is installed")


def test_issue12_item5_measure_labels_an_exact_trace_as_exact():
    # n = 10 < the 99-product budget: the trace is computed exactly (issue 12 item 5), and the
    # table must not call it an XTrace estimate
    import numpy as np

    import curvop
    from curvop.studies.measure import measure

    A = np.diag(np.arange(1.0, 11.0))
    m = measure(curvop.aslinearoperator(A), k=2, steps=5, probes=2, seed=0)
    assert m.trace_method == "exact" and m.trace == 55.0 and m.trace_stderr == 0.0
    assert "trace (exact)" in m.table() and "trace (XTrace)" not in m.table()
