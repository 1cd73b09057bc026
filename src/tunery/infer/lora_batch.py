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

A decoding step's LoRA products (a few rows) run in fp32 on weights stored transposed and
contiguous: on a CPU a bf16 product this small (8 × 576 by 576 × 16) costs ~18 µs against ~5 µs
in fp32 (oneDNN's bf16 path has a fixed cost), and the layer's few output rows are cheap to
convert. A prefill's (hundreds of rows) run in the base's dtype, adding into the base layer's
output in place: there the conversions would cost more than the products. The masks are built
once per forward for each distinct layout of columns (every layer usually has the same one).
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
    masks: dict | None = None  # per column layout (its owners tensor, shared by layers alike) and dtype: [batch, 1.., R] 0/1

    def mask(self, owners: torch.Tensor, dtype: torch.dtype, dims: int) -> torch.Tensor:
        """1 where a row's adapter owns the column; computed once per layout of columns per forward."""
        if self.masks is None:
            self.masks = {}
        key = (id(owners), dtype, dims)
        found = self.masks.get(key)
        if found is None:
            found = self.masks[key] = (self.rows.view(-1, *([1] * (dims - 1))) == owners).to(dtype)
        return found


FEW_ROWS = 64  # LoRA products over at most this many rows (tokens) run in fp32
class BatchedLora:
    def __init__(self, model, max_cached: int = 16):
        from peft.tuners.lora.layer import Linear

        self.model = model
        self.plan: Plan | None = None
        self.max_cached = max_cached
        self._layers = [m for m in model.modules() if isinstance(m, Linear)]
        self._cache: OrderedDict[tuple[str, ...], dict[int, tuple]] = OrderedDict()
        self._supports: dict[str, bool] = {}
        for layer in self._layers:
            layer.forward = types.MethodType(  # type: ignore[method-assign]  # per instance, on purpose
                _forward_with(self, type(layer).forward), layer)

    def supports(self, adapter: str) -> bool:
        """Whether `adapter` is plain LoRA everywhere (no DoRA or other variant, no LoRA bias);
        asked every step, answered once per adapter (its layers do not change once loaded)."""
        known = self._supports.get(adapter)
        if known is None:
            known = self._supports[adapter] = all(
                adapter not in layer.lora_variant and not layer.lora_bias.get(adapter, False)
                for layer in self._layers if adapter in layer.lora_A)
        return known

    def forget(self, adapter: str) -> None:
        """An adapter was unloaded or replaced: drop every cached concatenation that has it."""
        self._supports.pop(adapter, None)
        for key in [k for k in self._cache if adapter in k]:
            del self._cache[key]

    def weights(self, adapters: tuple[str, ...]) -> dict[int, tuple]:
        """Per layer (by id): A_catᵀ [in, R] and B_catᵀ [R, out] (scaling folded in), contiguous, in
        fp32 and in the base layer's dtype, and the column → adapter index [R] (layers with the
        same layout share one tensor)."""
        cached = self._cache.get(adapters)
        if cached is not None:
            self._cache.move_to_end(adapters)
            return cached
        out: dict[int, tuple] = {}
        layouts: dict[tuple, torch.Tensor] = {}
        for layer in self._layers:
            a_parts, b_parts, owners = [], [], []
            for index, name in enumerate(adapters):
                if name not in layer.lora_A:
                    continue
                a = cast(torch.Tensor, layer.lora_A[name].weight)
                b = cast(torch.Tensor, layer.lora_B[name].weight) * layer.scaling[name]
                a_parts.append(a.float())
                b_parts.append(b.float())
                owners.append(torch.full((a.shape[0],), index, dtype=torch.long, device=a.device))
            if a_parts:
                owner = torch.cat(owners)
                owner = layouts.setdefault((str(owner.device), tuple(owner.tolist())), owner)
                a32 = torch.cat(a_parts).t().contiguous()
                b32 = torch.cat(b_parts, dim=1).t().contiguous()
                base_dtype = cast(torch.Tensor, layer.get_base_layer().weight).dtype
                # A quantized base (uint8 storage) computes the products in fp32 here.
                dtype = base_dtype if base_dtype.is_floating_point else a32.dtype
                out[id(layer)] = (a32, b32, a32.to(dtype), b32.to(dtype), owner)
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
        a32, b32, a, b, owners = entry
        if x.numel() <= FEW_ROWS * x.shape[-1]:  # a decoding step: fp32 products, then back
            out = result.float()  # the tensor itself when the base is fp32
            h = torch.matmul(x.float(), a32)  # [batch, length, R]
            h.mul_(plan.mask(owners, h.dtype, h.dim()))  # zero the columns of other rows' adapters
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b32)
            return out.to(result.dtype)
        h = torch.matmul(x.to(a.dtype), a)
        h.mul_(plan.mask(owners, h.dtype, h.dim()))
        if result.dtype == b.dtype and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b)
            return result
        return result + torch.matmul(h, b).to(result.dtype)

    return forward
