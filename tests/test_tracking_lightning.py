"""Issue 14 item 2: the PyTorch Lightning callback; measuring never changes a Trainer's training."""

import random

import numpy as np
import pytest

import curvop

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(tmp_path, track: bool, accumulate: int = 1):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    module = _Module()
    tracker = curvop.SharpnessTracker(module, module.loss_fn, (x[:48], y[:48]), k=2)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         accumulate_grad_batches=accumulate,
                         callbacks=[tracker.lightning_callback(every=3)] if track else [])
    trainer.fit(module, loader)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    opt = trainer.optimizers[0].state_dict()["state"]
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return state, opt, rngs, [m.training for m in module.modules()], tracker, trainer


def test_issue14_item2_lightning_callback_does_not_change_training(tmp_path):
    a, b = _fit(tmp_path, False), _fit(tmp_path, True)
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k  # parameters and BatchNorm buffers
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(a[1][k][n], b[1][k][n])  # momentum buffers
    assert torch.equal(a[2][0], b[2][0]) and np.array_equal(a[2][1], b[2][1]) and a[2][2] == b[2][2]
    assert a[3] == b[3]  # train/eval flags as Lightning left them
    tracker, trainer = b[4], b[5]
    assert [m.step for m in tracker.history] == [0, 3, 6, 9]
    assert all(m.converged and len(m.eigenvalues) == 2 and m.value > 0 for m in tracker.history)
    assert float(trainer.callback_metrics["sharpness"]) == pytest.approx(tracker.history[-1].value, rel=1e-6)


def test_issue14_item2_lightning_callback_measures_each_optimizer_step_once(tmp_path):
    # with gradient accumulation a global step spans two batches: one measurement per step
    tracker = _fit(tmp_path, True, accumulate=2)[4]
    assert [m.step for m in tracker.history] == [0, 3, 6, 9]


def test_issue14_item2_lightning_callback_value_matches_a_direct_measurement(tmp_path):
    module = _Module()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    tracker = curvop.SharpnessTracker(module, module.loss_fn, (x, y), tol=1e-6, tol_on="residual")
    cb = tracker.lightning_callback(every=2, log=False)

    class _Trainer:  # the two attributes the hook reads
        global_step = 4

    cb.on_train_batch_start(_Trainer(), module, None, 0)
    ref = curvop.eigenvalues(curvop.hessian(module.eval(), module.loss_fn, (x, y)), tol=1e-6, seed=0)
    assert tracker.history[-1].value == pytest.approx(float(ref.eigenvalues[0]), rel=1e-5)
    with pytest.raises(ValueError, match="every must be >= 1"):
        tracker.lightning_callback(every=0)
