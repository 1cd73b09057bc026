"""Many LoRA adapters in one batch: two dense products per layer, whatever the mix of adapters.

peft runs a mixed-adapter batch (`adapter_names=`) by splitting it per adapter in every LoRA
layer: Python, indexing and small products per adapter per layer, ~200 layers a step for a
30-layer Llama. On SmolLM2 on a 2-core CPU that made 8 base-model rows in a peft-wrapped model
decode at 103 tokens/s against 153 without peft, and a batch mixing base and two adapters at 68.

Here, for each LoRA layer, the A matrices of the adapters used by the batch are concatenated
(R = sum of their ranks rows) and so are their B matrices (scaling folded in). A step computes
`h = x @ A_catᵀ` (B × R), zeroes the columns that belong to another adapter than the row's own
(a mask from one comparison), and adds `h @ B_catᵀ` to the base layer's output: two products
and a multiply per layer, however the adapters are mixed — the idea of S-LoRA's and Punica's
batched LoRA kernels, written with plain torch products (the LoRA products are ~1 % of a layer's
work per adapter at rank 8). Base rows have no columns of their own: their LoRA term is zero.

`BatchedLora.install(peft_model)` routes every LoRA Linear of the model through this while a
`plan` is set (the engine sets one per forward), and through peft's own forward otherwise.
Adapters with a variant (DoRA) or a LoRA bias are not handled here: `supports` says so, and the
engine then uses peft's path.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch


@dataclass
class Plan:
    """One forward's rows: `adapters` in column order, `rows` the index in it of each row's
    adapter (-1: the bare base)."""

    adapters: tuple[str, ...]
    rows: torch.Tensor  # [batch] int64
    masks: dict | None = None  # per column layout (owners tensor id): [batch, 1, R] 0/1 in the compute dtype

    def mask(self, owners: torch.Tensor, dtype: torch.dtype, dims: int) -> torch.Tensor:
        """1 where a row's adapter owns the column; computed once per layout of columns per forward."""
        if self.masks is None:
            self.masks = {}
        key = (id(owners), dims)
        found = self.masks.get(key)
        if found is None:
            found = self.masks[key] = (self.rows.view(-1, *([1] * (dims - 1))) == owners).to(dtype)
        return found


class BatchedLora:
    def __init__(self, model, dtype: torch.dtype, max_cached: int = 16):
        from peft.tuners.lora.layer import Linear

        self.model = model
        self.dtype = dtype
        self.plan: Plan | None = None
        self.max_cached = max_cached
        self._layers = [m for m in model.modules() if isinstance(m, Linear)]
        self._cache: OrderedDict[tuple[str, ...], dict[int, tuple]] = OrderedDict()
        for layer in self._layers:
            layer.forward = types.MethodType(  # type: ignore[method-assign]  # per instance, on purpose
                _forward_with(self, type(layer).forward), layer)

    def supports(self, adapter: str) -> bool:
        return all(adapter not in layer.lora_variant and not layer.lora_bias.get(adapter, False)
                   for layer in self._layers if adapter in layer.lora_A)

    def forget(self, adapter: str) -> None:
        """An adapter was unloaded or replaced: drop every cached concatenation that has it."""
        for key in [k for k in self._cache if adapter in k]:
            del self._cache[key]

    def weights(self, adapters: tuple[str, ...]) -> dict[int, tuple]:
        """Per layer (by id): (A_cat [R, in], B_cat [out, R] with scaling, column → adapter index [R])."""
        cached = self._cache.get(adapters)
        if cached is not None:
            self._cache.move_to_end(adapters)
            return cached
        out: dict[int, tuple] = {}
        for layer in self._layers:
            a_parts, b_parts, owners = [], [], []
            for index, name in enumerate(adapters):
                if name not in layer.lora_A:
                    continue
                a = cast(torch.Tensor, layer.lora_A[name].weight)
                b = cast(torch.Tensor, layer.lora_B[name].weight) * layer.scaling[name]
                a_parts.append(a.to(self.dtype))
                b_parts.append(b.to(self.dtype))
                owners.append(torch.full((a.shape[0],), index, dtype=torch.long, device=a.device))
            if a_parts:
                out[id(layer)] = (torch.cat(a_parts), torch.cat(b_parts, dim=1), torch.cat(owners))
        self._cache[adapters] = out
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return out


def _forward_with(batched: BatchedLora, peft_forward):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = batched.plan
        if plan is None:
            return peft_forward(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not plan.adapters:
            return result
        entry = batched.weights(plan.adapters).get(id(self))
        if entry is None:
            return result
        a, b, owners = entry
        h = torch.matmul(x.to(a.dtype), a.t())  # [batch, length, R]
        h.mul_(plan.mask(owners, h.dtype, h.dim()))  # zero the columns of other rows' adapters
        if result.dtype == b.dtype and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())
            return result
        return result + torch.matmul(h, b.t()).to(result.dtype)

    return forward
