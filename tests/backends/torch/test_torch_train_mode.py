"""Issue 14 item 3: Hessians of the training-mode loss (batch statistics, one fixed dropout mask).

The reference is built here, independently of curvop: a deep copy of the model in training mode,
run by ``torch.func.functional_call`` under ``torch.random.fork_rng`` seeded with the documented
per-batch seed, differentiated twice by ``torch.autograd.functional.hessian`` in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.torch import batch_seed  # noqa: E402
from torch_reference import MODES, dense_hessian  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.4),
                         nn.Linear(6, 3)).double().train()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Dropout2d(0.3), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(3 * 3 * 3, 3)).double().train()


def _batches(k: int, n: int = 8, shape: tuple[int, ...] = (4,), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def _reference(model: nn.Module, batches: list, seed: int) -> np.ndarray:
    """Dense Hessian of the size-weighted mean training-mode loss, batch i under batch_seed(seed, i)."""
    ref = copy.deepcopy(model)  # its running statistics may move: they do not enter a train-mode loss
    names = [k for k, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])
    total = sum(len(y) for _, y in batches)

    def f(flat):
        parts = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes))))
        value = 0.0
        for i, (x, y) in enumerate(batches):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(batch_seed(seed, i))
                out = functional_call(ref, parts, (x,))
            value = value + len(y) * nn.functional.cross_entropy(out, y)
        return value / total

    return torch.autograd.functional.hessian(f, flat0).numpy()


def _eval_reference(model: nn.Module, batches: list) -> np.ndarray:
    return dense_hessian(copy.deepcopy(model).eval(), nn.CrossEntropyLoss(), batches)


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def _same_state(model: nn.Module, before) -> None:
    tensors, flags = before
    after = model.state_dict()
    assert after.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert [m.training for m in model.modules()] == flags, "a module's .training flag changed"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch,k", [("mlp", 1), ("mlp", 3), ("cnn", 1), ("cnn", 2)])
def test_issue14_item3_train_mode_matches_dense_reference(mode, arch, k):
    model = _mlp() if arch == "mlp" else _cnn()
    batches = _batches(k, shape=(4,) if arch == "mlp" else (2, 5, 5))
    data = batches[0] if k == 1 else batches
    before = _state(model)
    rng_before = torch.get_rng_state()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), data, train_mode=True, seed=7, **MODES[mode])
    D = H.to_dense()
    R = _reference(model, batches, seed=7)
    np.testing.assert_allclose(D, R, **TOL)
    np.testing.assert_allclose(D, D.T, rtol=0, atol=1e-11)  # symmetric
    # one function in every product: the same vector twice gives the same bits
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(H.shape[0]))
    assert torch.equal(H @ v, H @ v)
    # the training-mode Hessian is not the eval-mode one (the test can tell them apart)
    assert np.abs(D - _eval_reference(model, batches)).max() > 1e-3
    _same_state(model, before)  # running statistics, num_batches_tracked and .training untouched
    assert torch.equal(torch.get_rng_state(), rng_before)  # the user's RNG did not move


@pytest.mark.parametrize("mode", list(MODES))
def test_issue14_item3_batched_products_use_the_same_mask(mode):
    model, batches = _mlp(), _batches(2)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, train_mode=True, seed=3, batched=True, **MODES[mode])
    V = torch.from_numpy(np.random.default_rng(0).standard_normal((H.shape[0], 3)))
    block = H.backend.hvp_batch(V)
    columns = torch.stack([H @ V[:, j] for j in range(3)], 1)
    torch.testing.assert_close(block, columns, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(block.numpy(), _reference(model, batches, 3) @ V.numpy(), **TOL)


def test_issue14_item3_default_still_refuses_training_mode():
    model, batch = _mlp(), _batches(1)[0]
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' is in training mode.*model\.eval\(\).*train_mode=True"):
        curvop.hessian(model, nn.CrossEntropyLoss(), batch)
    drop = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match=r"dropout layer '1' is in training mode.*train_mode=True"):
        curvop.hessian(drop, nn.CrossEntropyLoss(), batch)


def test_issue14_item3_seed_fixes_the_operator_and_different_seeds_differ():
    model, batch = _mlp(), _batches(1)[0]
    a = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=1).to_dense()
    b = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=1).to_dense()
    c = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=2).to_dense()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # another mask
    np.testing.assert_allclose(c, _reference(model, [batch], 2), **TOL)


def test_issue14_item3_seed_none_comes_from_torch_rng_without_advancing_it():
    model, batch = _mlp(), _batches(1)[0]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True)
    a = H.to_dense()
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_allclose(a, _reference(model, [batch], H.backend.train_seed), **TOL)
    torch.manual_seed(123)
    b = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True).to_dense()
    np.testing.assert_array_equal(a, b)  # reproducible under torch.manual_seed
    torch.manual_seed(124)
    c = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True).to_dense()
    assert np.abs(a - c).max() > 1e-3  # a training loop's own draws move it: a new mask per step
    np.testing.assert_allclose(a, a.T, rtol=0, atol=1e-11)


def test_issue14_item3_seed_from_a_generator():
    model, batch = _mlp(), _batches(1)[0]
    g = torch.Generator().manual_seed(5)
    state, g_state = torch.get_rng_state(), g.get_state()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=g)
    D = H.to_dense()
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(g.get_state(), g_state)  # the given generator is drawn from
    np.testing.assert_allclose(D, _reference(model, [batch], H.backend.train_seed), **TOL)
    again = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=torch.Generator().manual_seed(5))
    assert again.backend.train_seed == H.backend.train_seed
    np.testing.assert_array_equal(again.to_dense(), D)
    D2 = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True,
                        seed=np.random.default_rng(0)).to_dense()
    np.testing.assert_allclose(D2, D2.T, rtol=0, atol=1e-11)


def test_issue14_item3_eval_mode_layers_inside_a_training_model_keep_running_statistics():
    model = _mlp()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model[1].eval()  # a frozen BatchNorm in a model that trains: its running statistics are used
    batch = _batches(1)[0]
    before = _state(model)
    D = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=4).to_dense()
    np.testing.assert_allclose(D, _reference(model, [batch], 4), **TOL)
    _same_state(model, before)


def test_issue14_item3_other_buffer_writing_layers_are_still_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(5, 3)).double().train()
    before = _state(model)
    with pytest.raises(ValueError, match=r"updates its buffers.*weight_u"):
        curvop.hessian(model, nn.CrossEntropyLoss(), _batches(1)[0], train_mode=True)
    _same_state(model, before)


def test_issue14_item3_follows_parameter_updates():
    model, batch = _mlp(), _batches(1)[0]
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=0)
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(H.shape[0]))
    H @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    np.testing.assert_allclose((H @ v).numpy(), _reference(model, [batch], 0) @ v.numpy(), **TOL)


@pytest.mark.parametrize("options,error,match", [
    (dict(train_mode="yes"), TypeError, r"train_mode must be True or False"),
    (dict(seed=3), ValueError, r"seed=.*train_mode=True"),
    (dict(train_mode=True, seed=True), TypeError, r"seed must be"),
    (dict(train_mode=True, seed=-1), ValueError, r"seed must be"),
    (dict(train_mode=True, seed="1"), TypeError, r"seed must be"),
    (dict(train_mode=True, sed=1), TypeError, r"unknown option 'sed'.*train_mode.*seed"),
])
def test_issue14_item3_options_are_validated(options, error, match):
    model, batch = _mlp(), _batches(1)[0]
    if not options.get("train_mode"):
        model.eval()
    with pytest.raises(error, match=match):
        curvop.hessian(model, nn.CrossEntropyLoss(), batch, **options)


def test_issue14_item3_top_eigenvalue_and_user_rng():
    model, batch = _mlp(), _batches(1)[0]
    torch.manual_seed(9)
    expected_next = torch.rand(3)
    torch.manual_seed(9)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batch, train_mode=True, seed=0)
    top = curvop.eigenvalues(H, k=1, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # dropout drew nothing from the user's generator
    assert top.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(_reference(model, [batch], 0))[-1], rel=1e-6)


def test_issue14_item3_sync_batch_norm_in_training_mode_is_refused_clearly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.SyncBatchNorm(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    with pytest.raises(ValueError, match=r"SyncBatchNorm layer '1' is in training mode.*train_mode=True.*eval\(\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), _batches(1)[0], train_mode=True)
    model[1].eval()  # frozen: its running statistics are used, as in the default mode
    assert curvop.hessian(model, nn.CrossEntropyLoss(), _batches(1)[0], train_mode=True).shape == (63, 63)


@pytest.mark.parametrize("mode", ["reverse-uncached", "forward-cached", "forward-uncached"])
def test_issue14_item3_products_from_threads_keep_their_masks(mode):
    import threading

    model, batches = _mlp(), _batches(2)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, train_mode=True, seed=5, **MODES[mode])
    R = _reference(model, batches, 5)
    vs = [np.random.default_rng(i).standard_normal(H.shape[0]) for i in range(3)]
    errors, finished, start = [], [], threading.Barrier(3)

    def work(v):
        try:
            start.wait()
            for _ in range(5):
                np.testing.assert_allclose((H @ torch.from_numpy(v)).numpy(), R @ v, **TOL)
            finished.append(True)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(v,)) for v in vs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(finished) == 3  # every thread ran its products
