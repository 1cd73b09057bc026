"""The CPU training kernels: LoRA dropout's cheap masks and the short-row attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunery.models import attention
from tunery.models.dropout import FastDropout, install


def test_fast_dropout_drops_p_of_the_elements_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    drop = FastDropout(0.05).train()
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    # 10^6 Bernoulli(0.05) draws: standard deviation 2.2e-4; allow 5 of them.
    assert abs(dropped - 0.05) < 1.1e-3
    assert torch.unique(y).tolist() == [0.0, pytest.approx(65536 / (65536 - round(0.05 * 65536)))]
    assert abs(y.mean().item() - 1.0) < 2e-3  # kept elements are scaled up by 1 / (kept fraction)
    # Neighbouring elements are independent: the two halves of each 16-bit pair agree as often as chance says.
    pairs = (y.view(-1, 2) == 0).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - 0.05**2) < 4e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_mask_is_the_comparison_of_the_drawn_uniforms(dtype):
    # The mask is built in float arithmetic; it must be exactly "uniform >= threshold" of the same draws.
    drop = FastDropout(0.05).train()
    x = torch.ones(96, 200, dtype=dtype)
    torch.manual_seed(3)
    mask = drop.mask(x)
    torch.manual_seed(3)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
    uniform = words.view(torch.int16)[: x.numel()].view(x.shape)
    keep = uniform >= (round(0.05 * 65536) - 32768)
    assert mask.dtype == dtype
    assert torch.equal(mask, keep.to(dtype) * torch.tensor(65536 / (65536 - round(0.05 * 65536)), dtype=dtype))


def test_fast_dropout_is_seeded_identity_in_eval_and_passes_gradients_through_the_mask():
    drop = FastDropout(0.3).train()
    torch.manual_seed(1)
    a = drop(torch.ones(64, 64))
    torch.manual_seed(1)
    b = drop(torch.ones(64, 64))
    assert torch.equal(a, b)
    assert not torch.equal(a, drop(torch.ones(64, 64)))
    x = torch.randn(32, 48, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert torch.allclose(x.grad, y.detach() / x.detach())  # d(x * mask)/dx = mask
    drop.eval()
    assert drop(x) is x
    assert torch.bfloat16 == drop.train()(x.detach().bfloat16()).dtype


def test_install_swaps_every_lora_dropout_of_a_peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    assert install(model) == 2 * 7  # 2 layers × q, k, v, o, gate, up, down
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p == 0.1]
    assert drops and all(type(m) is FastDropout for m in drops)
    assert install(model) == 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_forward_is_peft_s_term_in_bf16(tiny_model_dir, dropout, monkeypatch):
    """Under CPU bf16 autocast over a frozen bf16 base, the lean LoRA term (bf16 throughout, both
    scales on the r-wide product) gives peft's loss and adapter gradients, with the same masks.
    Without dropout, q/k/v and gate/up share one A product per input (`SharedA`)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunery.models.dropout import lean_forward

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.05
    lean = copy.deepcopy(model)
    install(model)
    for m in model.modules():  # the reference: peft's own forward, with the same FastDropout masks
        m.__dict__.pop("forward", None)
    install(lean)
    assert all(m.forward.__func__ is lean_forward for m in lean.modules() if "forward" in m.__dict__)
    ids = torch.randint(0, 100, (3, 12))

    def run(m):
        m.train()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    from peft.tuners.lora import Linear as LoraLinear

    peft_calls = []
    peft_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda *a, **k: peft_calls.append(1) or peft_forward(*a, **k))
    loss, grads = run(model)
    assert len(peft_calls) == 2 * 7
    from tunery.models.dropout import SharedA

    taken, computed = [], []
    columns = SharedA.columns

    def counted(self, layer, name, x):
        out = columns(self, layer, name, x)
        taken.append(1)
        if self._left == len(self.members) - 1:  # a fresh product leaves every sibling but this one to take
            computed.append(1)
        return out

    monkeypatch.setattr(SharedA, "columns", counted)
    lean_loss, lean_grads = run(lean)
    assert len(peft_calls) == 2 * 7  # the lean run never fell back to peft's forward
    # Per layer q, k, v and gate, up take their columns: 2 products (one per input) without
    # dropout; with dropout each layer masks its own input and no product is shared.
    assert (len(taken), len(computed)) == ((2 * 5, 2 * 2) if dropout == 0 else (0, 0))
    assert all(s._x is None for m in lean.modules() if (s := getattr(m, "_lora_shared", None)))
    assert torch.allclose(lean_loss, loss, rtol=1e-2), (lean_loss, loss)
    assert grads.keys() == lean_grads.keys() and grads
    for name, g in grads.items():
        rel = (lean_grads[name] - g).norm() / g.norm()
        assert rel < 0.03, (name, rel)
    # Out of autocast (generation inside a training, eval) it is peft's forward, bit for bit.
    lean.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids).logits, model(input_ids=ids).logits)


def _llama(attn: str, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)


@pytest.mark.parametrize("short_keys", [192, 4])  # 4: every row is "long", the sdpa branch is taken
@pytest.mark.parametrize("layout", ["padded", "packed", "plain"])
def test_short_eager_attention_computes_what_sdpa_does(tiny_model_dir, monkeypatch, layout, short_keys):
    monkeypatch.setattr(attention, "SHORT_KEYS", short_keys)
    name = attention.register()
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (3, 24))
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if layout == "padded":
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0
        mask[2, :5] = 0  # left padding: real queries would see padded keys without the mask
        inputs["attention_mask"] = mask
    elif layout == "packed":  # three rows of 10, 8 and 6 tokens packed in one, restarting positions
        inputs = {"input_ids": ids[:1],
                  "position_ids": torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])[None]}
    results = []
    for attn in ("sdpa", name):
        model = _llama(attn, tiny_model_dir).train()
        labels = inputs["input_ids"]
        if layout == "padded":
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
            labels[2, 5] = -100  # predicted from a padded position, whose output neither defines alike
        out = model(**inputs, labels=labels, use_cache=False)  # as in training: a cache hides packing
        out.loss.backward()
        grads = [p.grad.clone() for p in model.model.layers[0].self_attn.parameters()]
        results.append((out.logits.detach(), grads))
    (ref, ref_grads), (got, got_grads) = results
    if layout == "padded":  # padded positions' outputs are not defined the same way by both: compare real ones
        keep = inputs["attention_mask"].bool()
        ref, got = ref[keep], got[keep]
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    for a, b in zip(ref_grads, got_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_training_on_a_cpu_picks_short_eager_attention_and_inference_sdpa():
    from tunery.models.load import pick_attention

    assert pick_attention("auto", "cpu", training=True) == attention.NAME
    assert pick_attention("auto", "cpu") == "sdpa"
    assert pick_attention("eager", "cpu", training=True) == "eager"
