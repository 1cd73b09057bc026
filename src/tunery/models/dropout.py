"""LoRA dropout with cheap masks on CPUs.

peft applies `nn.Dropout(lora_dropout)` to the input of every LoRA layer: seven times per
decoder layer in a Llama with all linear layers adapted. On a CPU torch draws each mask with a
Bernoulli generator at ~3 ns an element (1.5 ms for 512 tokens × 576 features on 2 cores), which
made the masks ~19 % of a bf16 LoRA step on SmolLM2 (benchmarks/NOTES.md). Here the mask comes
from torch's own generator as raw 64-bit integers, read as four 16-bit uniforms each, compared
with a threshold: ~5× cheaper, seeded and reproducible like any torch random draw.

The drop probability is Replicate's `lora_dropout` rounded to 1/65536 (0.05 → 0.050003), and
kept elements are scaled by the exact inverse of the kept fraction, so the expected output
equals the input, as with `nn.Dropout`. On GPUs, and in eval mode, it is `F.dropout`.

Under bf16 autocast on a CPU (a frozen bf16 base), peft's LoRA term casts each layer's bf16 input
to the adapter's fp32, masks and scales it in fp32, lets autocast cast it back to bf16 for the A
product, and scales the full-width output: four passes over activation-sized tensors, forward
and again backward, that change nothing the bf16 product sees. `lean_forward` computes the same
term as `B(A(x ⊙ keep)) · (scaling / kept fraction)` in bf16: the 0/1 mask is exact in bf16 and
both scales go on the r-wide product. Without dropout, sibling projections that read one input
(q/k/v, gate/up) share one A product (`SharedA`). Every other case (eval, fp32, GPUs, DoRA,
mixed adapter batches) is peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_LEVELS = 1 << 16


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask is drawn as 16-bit uniforms (see the module docstring)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self._drop_levels = round(p * _LEVELS)
        kept = _LEVELS - self._drop_levels
        self._scale = _LEVELS / kept if kept else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p >= 1:
            return F.dropout(x, self.p, True)
        return x * self.mask(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU mask shaped like `x`, in its dtype: 0 where dropped, 1 / (kept fraction) where kept."""
        return self.keep(x).mul_(self._scale)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU mask's 0 (dropped) or 1 (kept) shaped like `x`, in its dtype."""
        n = x.numel()
        words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
        uniform = words.view(torch.int16)[:n].view(x.shape)  # each in [-32768, 32767], uniform
        # keep = uniform >= threshold, as 0 or 1 in float arithmetic: integers are exact in fp32,
        # so (uniform - (threshold - 1)) clamped to [0, 1] is exactly the comparison, at a third
        # of the cost of a boolean compare and its conversion on a CPU (the same mask, bit for bit).
        threshold = self._drop_levels - (_LEVELS // 2)
        keep = uniform.to(torch.float32).sub_(threshold - 1).clamp_(0, 1)
        return keep.to(x.dtype)


# Sibling projections that read one input, by their module names in a decoder layer (Llama,
# Mistral, Qwen, Gemma and the other families that name them so): their LoRA A products can be one.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(named: list[tuple[str, Any]]) -> list[tuple[Any, ...]]:
    """The LoRA layers in groups that read one input (SIBLINGS under one parent, in that order);
    every other layer a group of its own."""
    by_name = dict(named)
    grouped: set[int] = set()
    groups: list[tuple[Any, ...]] = []
    for name, _ in named:
        parent, _, leaf = name.rpartition(".")
        for siblings in SIBLINGS:
            if leaf == siblings[0]:
                members = [by_name.get(f"{parent}.{s}" if parent else s) for s in siblings]
                found = tuple(m for m in members if m is not None)
                if len(found) > 1 and len({m.in_features for m in found}) == 1:  # one input: one width
                    groups.append(found)
                    grouped.update(id(m) for m in found)
    groups.extend((layer,) for _, layer in named if id(layer) not in grouped)
    return groups


class SharedA:
    """One A product for sibling LoRA layers that read the same input, in training without
    dropout: `x @ [A_q; A_k; A_v]ᵀ` once, each layer taking its own columns (unsloth's fused
    q/k/v LoRA; the backward then also adds one input gradient per group instead of one per
    layer). Computed by the first sibling that sees `x` and kept until every sibling has taken
    its columns; recomputed for another tensor, the same tensor changed in place, or another
    adapter."""

    def __init__(self, members: tuple[Any, ...]):
        self.members = members
        self._x: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        self._key: tuple = ()
        self._spans: dict[int, tuple[int, int]] = {}
        self._left = 0

    def usable(self, name: str) -> bool:
        return all(name in m.lora_A and isinstance(m.lora_dropout[name], nn.Identity)
                   and m.active_adapters == [name] and not m.disable_adapters and not m.merged
                   and name not in m.lora_variant for m in self.members)

    def columns(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._key != (x._version, name) or self._left == 0:
            weights = [m.lora_A[name].weight for m in self.members]
            self._h = F.linear(x, torch.cat(weights))
            self._x, self._key, self._left = x, (x._version, name), len(self.members)
            begin = 0
            for m, w in zip(self.members, weights, strict=True):
                self._spans[id(m)] = (begin, begin + w.shape[0])
                begin += w.shape[0]
        begin, stop = self._spans[id(layer)]
        h = self._h[..., begin:stop]  # type: ignore[index]
        self._left -= 1
        if self._left == 0:  # every sibling has its columns: hold no activation past the layer
            self._x = self._h = None
        return h


def lean_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft `lora.Linear`'s forward, with its LoRA term kept in bf16 under CPU autocast (see the
    module docstring); peft's own forward in every other case."""
    name = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    if (args or kwargs or not layer.training or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu") or layer.disable_adapters or layer.merged
            or name not in layer.lora_A or name in layer.lora_variant):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    drop = layer.lora_dropout[name]
    scaling = layer.scaling[name]
    shared = getattr(layer, "_lora_shared", None)
    if shared is not None and shared.usable(name):
        h = shared.columns(layer, name, x) * scaling
        return result + F.linear(h, layer.lora_B[name].weight)
    if isinstance(drop, FastDropout) and 0 < drop.p < 1:
        x = x * drop.keep(x)
        scaling = scaling * drop._scale
    else:
        x = drop(x)
    h = F.linear(x, layer.lora_A[name].weight) * scaling
    return result + F.linear(h, layer.lora_B[name].weight)


def install(model) -> int:
    """Swap every peft LoRA dropout module (`lora_dropout[adapter]`, an `nn.Dropout`) of `model`
    for a `FastDropout` of the same probability, and give every plain `lora.Linear` the lean
    forward; returns how many dropouts were swapped."""
    import types

    from peft.tuners.lora import Linear as LoraLinear

    swapped = 0
    named = [(n, m) for n, m in model.named_modules() if type(m) is LoraLinear]
    for group in sibling_groups(named):
        if len(group) > 1:
            shared = SharedA(group)
            for member in group:
                member._lora_shared = shared
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, drop in list(table.items()):
            if type(drop) is nn.Dropout and drop.p > 0:
                table[name] = FastDropout(drop.p)
                swapped += 1
        if type(module) is LoraLinear:
            module.forward = types.MethodType(lean_forward, module)  # type: ignore[method-assign]  # per instance, on purpose
    return swapped
