"""The ``curvop`` command: demo and study end to end (short runs), ``spectrum`` and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from curvop.cli import main  # noqa: E402
from curvop.studies.measure import fmt  # noqa: E402

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
