"""Model zoo (issue 11, item 7): Hugging Face transformers built from configs, float64, no download.

The model under test keeps its default attention (SDPA); the reference is a copy with
``attn_implementation="eager"`` differentiated twice by ``torch.autograd`` -- except for Llama,
whose eager attention takes its softmax in float32 (``softmax(..., dtype=torch.float32)``): its
reference is the SDPA model itself on torch's math kernel, which computes in float64.

What transformers computes in which dtype decides each call (transformers 5.24):

* causal LMs (GPT-2, Llama) compute their own loss with ``logits.float()``: a float32 loss of a
  float64 model, which the torch backend refuses (``LossPrecisionError``, helper "torch"). The
  tests pass a float64 loss of ``out.logits``: ``curvop.hessian(model, loss_fn, (batch, labels))``.
* BERT's sequence-classification loss is ``CrossEntropyLoss`` on the float64 logits: the model's
  own loss is float64, so the test uses it, ``curvop.hessian(model, None, batch)``, with the
  labels in the batch dict (helper "torch").
* ``LlamaRMSNorm`` casts its input to float32 whatever the model's dtype, so a float64 Llama is
  float32-accurate inside every norm: two float64 computations of its products that round
  differently anywhere (eager attention against SDPA measured 1.3e-7) disagree far above 1e-10.
  Llama is checked as shipped to 1e-6, and with the norm computing in the model's dtype (the same
  function, patched for that test only) to the zoo's 1e-10.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import curvop  # noqa: E402
from _zoo import check_torch  # noqa: E402

pytestmark = pytest.mark.zoo
VOCAB = 13
SMALL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded sequence
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask}, labels


def causal_lm_loss(out, labels):
    """Next-token cross-entropy in the logits' dtype (float64 here), ignoring -100 labels."""
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)


def _pair(cls, config, eager_reference=True):
    """The model (default attention, float64, eval) and a reference copy with eager attention."""
    torch.manual_seed(0)
    model = cls(config).double().eval()
    ref = copy.deepcopy(model)
    if eager_reference:
        ref.set_attn_implementation("eager")
    return model, ref


def gpt2():
    return _pair(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2, **SMALL))


def llama():
    return _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, **SMALL), eager_reference=False)


def test_issue11_item7_hf_gpt2(tokens):
    model, ref = gpt2()
    batch, labels = tokens
    H = curvop.hessian(model, causal_lm_loss, (batch, labels))
    check_torch(H, ref, lambda: causal_lm_loss(ref(**batch), labels))


def test_issue11_item7_hf_causal_lm_own_loss_is_float32_and_refused(tokens):
    model, _ = gpt2()
    batch, labels = tokens
    assert model(**batch, labels=labels).loss.dtype == torch.float32  # why the tests pass their own loss
    with pytest.raises(Exception) as info:
        curvop.hessian(model, None, {**batch, "labels": labels})
    assert type(info.value).__name__ == "LossPrecisionError", info.value


def test_issue11_item7_hf_bert_own_loss(tokens):
    model, ref = _pair(transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=8, num_labels=3, **SMALL))
    batch = {**tokens[0], "labels": torch.tensor([0, 2])}
    assert model(**batch).loss.dtype == torch.float64
    H = curvop.hessian(model, None, batch)
    check_torch(H, ref, lambda: ref(**batch).loss)


def test_issue11_item7_hf_llama_as_shipped(tokens):
    model, ref = llama()
    batch, labels = tokens
    H = curvop.hessian(model, causal_lm_loss, (batch, labels))
    check_torch(H, ref, lambda: causal_lm_loss(ref(**batch), labels), rtol=1e-6)  # float32 RMSNorm


def test_issue11_item7_hf_llama_rmsnorm_in_model_dtype(tokens, monkeypatch):
    from transformers.models.llama import modeling_llama

    def rms_norm(self, h):  # LlamaRMSNorm.forward without its cast to float32
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model, ref = llama()
    batch, labels = tokens
    H = curvop.hessian(model, causal_lm_loss, (batch, labels))
    check_torch(H, ref, lambda: causal_lm_loss(ref(**batch), labels))


# --- issue 26: modes, precision inside the model, messages ------------------------------------------
def bert():
    return _pair(transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=8, num_labels=3, **SMALL))


def test_issue26_item5_hf_attention_mask_forward_cached_falls_back_or_names_uncached(tokens):
    model, ref = bert()
    batch = {**tokens[0], "labels": torch.tensor([0, 2])}  # with a padded attention_mask
    with pytest.raises(curvop.ModeError, match=r"hvp='forward', cache=True .*data-dependent branch"
                                                             r".*hvp='forward', cache=False works"):
        curvop.hessian(model, None, batch, hvp="forward", cache=True)
    H = curvop.hessian(model, None, batch, hvp="forward")  # the cache left at "auto"
    assert not H.backend.cache and "using hvp='forward', cache=False" in H.backend.describe()
    check_torch(H, ref, lambda: ref(**batch).loss)


@pytest.mark.parametrize("name, norm", [("t5", "T5LayerNorm"), ("mistral", "MistralRMSNorm")])
def test_issue26_section2_hf_float32_norms_inside_a_float64_model_are_named(tokens, name, norm):
    from curvop._errors import PrecisionWarning

    torch.manual_seed(0)
    batch, labels = tokens
    if name == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0,
            **SMALL)).double().eval()
        args = (model, None, {**batch, "labels": batch["input_ids"]})
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=8, **SMALL)).double().eval()
        args = (model, causal_lm_loss, (batch, labels))
    with pytest.warns(PrecisionWarning, match=rf"'[\w.]+' \({norm}, Tensor\.to -> float32\)"):
        curvop.hessian(*args)


def test_issue26_section2_hf_mamba_float64_is_refused_with_advice_that_applies(tokens):
    from curvop.backends.base import LossPrecisionError

    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2,
        **SMALL)).double().eval()
    batch, labels = tokens
    for args in [(None, {"input_ids": batch["input_ids"], "labels": labels}), (causal_lm_loss, (batch, labels))]:
        with pytest.raises(LossPrecisionError, match=r"model itself \(MambaForCausalLM\) returns float32 outputs, "
                                                     r"so no loss_fn can recover") as info:
            curvop.hessian(model, *args)
        assert "out.logits" not in str(info.value)


def test_issue26_section4_hf_return_dict_false_names_the_fix(tokens):
    model, _ = bert()
    batch = {**tokens[0], "labels": torch.tensor([0, 2]), "return_dict": False}
    with pytest.raises(ValueError, match=r"plain tuple .*return_dict=False.*'return_dict': True"):
        curvop.hessian(model, None, batch)
