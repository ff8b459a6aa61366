"""Issue 13, user-facing side: one option style for the commands, the demo under studies/, the
digits training on curvop's progress bar, and a factory that names no framework's model convention."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest

import curvop

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


def test_issue13_item3_factory_finds_the_framework_of_a_bare_apply_fn_from_params():
    # the factory no longer knows JAX's (apply_fn, params) tuple: it finds the framework from the
    # arrays a model (or params=) holds, and the JAX backend alone knows what the pair means
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.standard_normal(2))}
    x, y = jnp.asarray(rng.standard_normal((5, 3))), jnp.asarray(rng.standard_normal((5, 2)))

    def apply_fn(p, inputs):
        return jnp.tanh(inputs @ p["w"] + p["b"])

    def mse(out, t):
        return jnp.mean((out - t) ** 2)

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda q: mse(apply_fn(unravel(q), x), y))(flat))
    bare = curvop.hessian(apply_fn, mse, (x, y), params=params)  # was: "cannot tell which framework"
    pair = curvop.hessian((apply_fn, params), mse, (x, y))
    jitted = curvop.hessian((jax.jit(apply_fn), params), mse, (x, y))
    for H in (bare, pair, jitted):
        assert H.backend.name == "jax"
        np.testing.assert_allclose(H.to_dense(), dense, rtol=1e-10, atol=1e-12)


def test_issue13_item3_factory_still_refuses_a_model_of_no_framework():
    with pytest.raises(TypeError, match="cannot tell which framework"):
        curvop.hessian((lambda p, x: x, {"w": np.ones(3)}), None, (np.ones(2), np.ones(2)))
    with pytest.raises(TypeError, match="cannot tell which framework a function"):
        curvop.hessian(lambda p, x: x, None, (np.ones(2), np.ones(2)), params=[1.0, None])



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
