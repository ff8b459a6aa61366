"""The ``curvop`` command: demo and study end to end (short runs), ``spectrum`` and its errors."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from curvop.cli import build_parser, main  # noqa: E402
from curvop.studies.measure import fmt, measure  # noqa: E402

FACTORY = """
import torch

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return model, torch.nn.CrossEntropyLoss(), (x, y)

def two():
    return 1, 2

def not_a_model():
    return "model", torch.nn.CrossEntropyLoss(), None

def boom():
    raise RuntimeError("no data here")

NOT_CALLABLE = 3
"""


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


@pytest.mark.slow
def test_demo_quick_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "density.png").stat().st_size > 10_000
    assert len(results["eigenvalues"]) == 5
    assert results["eigenvalues"] == sorted(results["eigenvalues"], reverse=True)
    for value in [*results["eigenvalues"], results["trace"], results["trace_stderr"]]:
        assert fmt(value) in printed
    assert results["density_trace_stderr"] is None  # --quick: one SLQ probe, so its trace is not printed
    assert fmt(results["density_trace"]) not in printed
    for step, n in results["num_matvecs"].items():
        assert n > 0, step


@pytest.mark.slow
def test_study_quick_writes_report(tmp_path):
    out = tmp_path / "study"
    assert main(["study", "bn-residual", "--quick", "--quiet", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "densities.png").exists()
    assert "curvop study bn-residual --quick --seed 0" in report
    assert len(results["networks"]) == 6 and len(results["claims"]) == 5
    for claim in results["claims"]:
        assert claim["verdict"] in ("reproduced", "not reproduced", "mixed")
        assert f"**{claim['verdict']}**" in report


def test_spectrum_on_a_py_file(factory, tmp_path, capsys):
    out = tmp_path / "spec"
    code = main(["spectrum", f"{factory}:make", "-k", "2", "--steps", "10", "--trace-matvecs", "12",
                 "--quiet", "--json", "--out", str(out)])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert results["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert len(results["eigenvalues"]) == 2
    assert (out / "density.png").exists() and (out / "results.json").exists()


def test_spectrum_on_an_importable_module(factory, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(factory.parent)
    code = main(["spectrum", "mymodels:make", "-k", "1", "--steps", "5", "--trace-matvecs", "6", "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    assert "eigenvalue 1" in capsys.readouterr().out


@pytest.mark.parametrize("target, device, message", [
    ("no_such_module_xyz:make", "cpu", "cannot import module 'no_such_module_xyz'"),
    ("{path}:missing", "cpu", "has no attribute 'missing'"),
    ("{path}:NOT_CALLABLE", "cpu", "not a function"),
    ("{path}:two", "cpu", "must return (model, loss_fn, data), got a 2-tuple"),
    ("{path}:not_a_model", "cpu", "expected a torch.nn.Module"),
    ("{path}:boom", "cpu", "raised RuntimeError: no data here"),
    ("/no/such/file.py:make", "cpu", "no such file"),
    ("nocolon", "cpu", "expected MODULE:FACTORY"),
    ("{path}:make", "warp-drive", "unknown device 'warp-drive'"),
])
def test_spectrum_bad_input_is_one_line(factory, capsys, target, device, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (curvop-spectrum/) goes here, not into the checkout
    code = main(["spectrum", target.format(path=factory), "--device", device, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("curvop: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_spectrum_cuda_without_cuda(factory, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["spectrum", f"{factory}:make", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_command_line_help_and_usage_errors(factory):
    run = lambda *a: subprocess.run([sys.executable, "-m", "curvop", *a], capture_output=True, text=True)  # noqa: E731
    helped = run("--help")
    assert helped.returncode == 0 and "demo" in helped.stdout and "spectrum" in helped.stdout
    assert run("spectrum", "--help").returncode == 0
    usage = run("frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    bad = run("spectrum", f"{factory}:two")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


# --- the command's errors, options and output (issue 12 items 5, 15 and 16) --------------------------
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


# --- every command on plain keyword arguments, the demo under studies/, the training bar, factory files (issue 13 items 6 and 7) ---
COMMANDS = ["curvop.studies.demo", "curvop.studies.bn_residual", "curvop.studies.edge_of_stability",
            "curvop.studies.own_model"]


@pytest.mark.parametrize("module", COMMANDS)
def test_issue13_item6_every_command_runs_on_plain_keyword_arguments(module):
    pytest.importorskip("torch")
    run = importlib.import_module(module).run
    params = list(inspect.signature(run).parameters.values())
    first, rest = params[0], params[1:]
    assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and first.name in ("out", "target")
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), [p.name for p in rest]
    names = {p.name for p in params}
    assert {"out", "seed", "quiet", "say"} <= names, names
    for p in params:  # no options object: every option is a keyword of its own
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        assert "Options" not in annotation, (p.name, annotation)


def test_issue13_item6_demo_lives_under_studies_and_records_the_quick_options(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from curvop.studies import demo

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("curvop.demo")
    lines: list[str] = []
    res = demo.run(str(tmp_path / "d"), quick=True, epochs=7, k=2, quiet=True, width=2, say=lines.append)
    # --quick overrides the epochs and budgets, and results.json records what was used
    assert res["options"] == dict(epochs=1, k=2, trace_matvecs=30, steps=30, probes=1, seed=0, width=2)
    assert res["training"]["epochs"] == 1 and len(res["training"]["losses"]) == 1
    assert len(res["eigenvalues"]) == 2 and any("eigenvalue 2" in line for line in lines)
    assert (tmp_path / "d" / "results.json").exists() and (tmp_path / "d" / "density.png").exists()


def test_issue13_item6_training_bar_is_curvops_and_ends_at_the_steps_used(capsys):
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    from curvop.studies import digits

    data = digits.load(0, max_train=128)
    torch.manual_seed(0)
    model = digits.cnn(4)
    r = digits.train_to_loss(model, data, 2.1, probe=data.train, max_epochs=50, check_every=1, progress=True)
    assert r.reached and r.steps < 50 * 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # curvop's bar (curvop._progress.progress_bar): an early stop ends at the steps taken, "9/9 100%",
    # not "9/100 9%"; the count is labelled in steps, not in Hessian-vector products
    assert f"{r.steps}/{r.steps}" in last and "100%" in last and "step" in last and "HVP" not in last, last
    assert not hasattr(digits, "_bar")


def test_issue13_item7_classes_of_a_factory_file_pickle(tmp_path):
    # why own_model imports a FILE with importlib instead of runpy.run_path (issue 13 item 7): its
    # classes must pickle (DataLoader workers under spawn, torch.save); run_path's would not
    import pickle
    import sys

    from curvop.studies import own_model

    f = tmp_path / "my-exp.py"
    f.write_text("from __future__ import annotations\nimport dataclasses\n\n@dataclasses.dataclass\n"
                 "class Batches:\n    n: int = 3\n\ndef make():\n    return Batches()\n")
    try:
        made = own_model.load_factory(f"{f}:make")()
        again = pickle.loads(pickle.dumps(made))
        assert type(again) is type(made) and again.n == 3
    finally:
        sys.modules.pop("_curvop_user_my_exp", None)


# --- issue 26: a factory returning loss_fn=None with a dict batch; saying what is being built ------
OWN_LOSS = """
import time
from types import SimpleNamespace
import torch

class OwnLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, labels, note):
        assert note == "kept"  # a string in the batch reaches the model
        logits = self.lin(x)
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)

def make():
    print("factory runs", flush=True)
    time.sleep(0.2)
    torch.manual_seed(0)
    return OwnLoss().double(), None, {"x": torch.randn(8, 4, dtype=torch.float64),
                                      "labels": torch.randint(0, 3, (8,)), "note": "kept"}
"""


def test_issue26_section4_factory_with_loss_fn_none_and_a_dict_batch(tmp_path, capsys):
    f = _write(tmp_path / "own.py", OWN_LOSS)
    code = main(["spectrum", f"{f}:make", "-k", "1", "--steps", "5", "--trace-matvecs", "6", "--quiet",
                 "--out", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.splitlines()
    # said first, before torch, the module and the factory load (a factory that takes seconds)
    assert lines[0] == f"curvop spectrum: importing {f} and calling make() for (model, loss_fn, data) ..."
    assert lines[1] == "factory runs" and "15 parameters" in printed.out


def test_issue26_section4_factory_loss_fn_neither_callable_nor_none(tmp_path, capsys):
    f = _write(tmp_path / "bad.py", "import torch\ndef make():\n    return torch.nn.Linear(2, 1), 'mse', None\n")
    code = main(["spectrum", f"{f}:make", "--quiet", "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "returned a str as loss_fn; expected a callable, or None")
