"""Issue 11 item 3: Hugging Face style batches, ``curvop.hessian(model, None, batch)`` (float64 references)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import curvop  # noqa: E402
from torch_reference import params_hessian  # noqa: E402

F64 = torch.float64


@dataclass
class Output:  # what a transformers ModelOutput offers: attributes, .loss among them
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyLM(nn.Module):
    """A model with the Hugging Face interface: ``model(input_ids=..., labels=...)`` -> ``Output``."""

    def __init__(self, vocab=7, dim=4, returns="object"):
        super().__init__()
        self.emb, self.head, self.returns = nn.Embedding(vocab, dim), nn.Linear(dim, vocab), returns

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        if self.returns == "dict":
            return {"loss": loss, "logits": logits}
        if self.returns == "scalar":
            return loss
        return Output(loss, logits)


def _model(returns="object"):
    torch.manual_seed(0)
    return TinyLM(returns=returns).double().eval()


def _batch(n=3, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, t, dtype=F64), "labels": torch.roll(ids, 1, 1)}


def _dense(model, batches):
    """float64 Hessian of the mean over batches (weighted by batch size) of model(**batch).loss."""
    total = sum(b["input_ids"].shape[0] for b in batches)

    def loss(p):
        out = [functional_call(model, p, (), b) for b in batches]
        vals = [o if isinstance(o, torch.Tensor) else (o["loss"] if isinstance(o, dict) else o.loss) for o in out]
        return sum(v * b["input_ids"].shape[0] for v, b in zip(vals, batches)) / total

    return params_hessian(model, loss)


@pytest.mark.parametrize("returns", ["object", "dict", "scalar"])
@pytest.mark.parametrize("hvp", ["reverse", "forward"])
def test_issue11_item3_dict_batch_with_labels_and_loss_from_the_model(returns, hvp):
    model, batch = _model(returns), _batch()
    H = curvop.hessian(model, None, batch, hvp=hvp)
    np.testing.assert_allclose(H.to_dense(), _dense(model, [batch]), rtol=1e-10, atol=1e-12)


def test_issue11_item3_tuple_and_tensor_batches():
    class Pos(nn.Module):  # model(*batch) -> scalar loss
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, y=None):
            out = self.lin(x).squeeze(-1)
            return ((out - (x.sum(1) if y is None else y)) ** 2).mean() + (out ** 4).mean()

    torch.manual_seed(0)
    model = Pos().double().eval()
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, dtype=F64)
    ref = params_hessian(model, lambda p: functional_call(model, p, (x, y)))
    np.testing.assert_allclose(curvop.hessian(model, None, (x, y)).to_dense(), ref, rtol=1e-12, atol=1e-14)
    ref1 = params_hessian(model, lambda p: functional_call(model, p, (x,)))
    np.testing.assert_allclose(curvop.hessian(model, None, x).to_dense(), ref1, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cache", [True, False])
def test_issue11_item3_loader_of_dicts_is_weighted_by_batch_size(cache):
    model = _model()
    batches = [_batch(3, seed=0), _batch(3, seed=1), _batch(2, seed=2)]
    H = curvop.hessian(model, None, batches, cache=cache)
    np.testing.assert_allclose(H.to_dense(), _dense(model, batches), rtol=1e-10, atol=1e-12)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[i % 3] for k, v in _batch(3, seed=i // 3).items()}

    loader = torch.utils.data.DataLoader(Dicts(), batch_size=3)
    H = curvop.hessian(model, None, loader, cache=cache)
    assert H.shape[0] == sum(p.numel() for p in model.parameters())
    np.testing.assert_allclose(H.to_dense(), _dense(model, list(loader)), rtol=1e-10, atol=1e-12)


def test_issue11_item3_output_without_a_loss_is_a_clear_error():
    model, batch = _model(), _batch()
    batch.pop("labels")
    with pytest.raises(ValueError, match=r"loss_fn=None.*no loss.*labels"):
        curvop.hessian(model, None, batch)
    with pytest.raises(ValueError, match=r"loss_fn=None.*no loss"):
        curvop.hessian(nn.Linear(4, 2).double(), None, torch.randn(3, 4, dtype=F64))


def test_issue11_item3_tiny_transformers_models_from_config():
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel  # installed but failing to import: a failure, not a skip

    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 11, (2, 5))
    batch = {"input_ids": ids, "labels": ids}
    # the causal-LM loss upcasts logits with .float(): refused in a float64 model (issue 11 item 4)
    with pytest.raises(curvop.backends.base.LossPrecisionError):
        curvop.hessian(model, None, batch)
    block = "transformer.h.0.mlp.c_proj"
    H = curvop.hessian(model, None, batch, params=block, check_loss_dtype=False)
    # the reference: double backward of model(**batch).loss, one row per parameter of the block
    ps = [p for k, p in model.named_parameters() if k.startswith(block + ".")]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(model(**batch).loss, ps, create_graph=True)])
    D = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(gi, ps, retain_graph=True)]) for gi in g])
    assert H.shape == D.shape == (8 * 32 + 8,) * 2
    dense, D = H.to_dense(), D.detach().numpy()
    scale = np.abs(D).max()
    assert scale > 0
    # the loss is float32 inside transformers, so both sides carry its rounding: measured 1.2e-9 of
    # the largest entry (a margin of 100x below)
    np.testing.assert_allclose(dense, D, rtol=0, atol=1e-7 * scale)
    v = torch.from_numpy(np.random.default_rng(0).standard_normal(H.shape[0]))
    Hv, Dv = (H @ v).numpy(), D @ v.numpy()
    assert np.linalg.norm(Hv - Dv) < 1e-7 * np.linalg.norm(Dv)
