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

Layers that read the same input share one A product: a Llama's q/k/v projections all read the
attention's normed input, its gate/up projections the MLP's. Their A matrices (every adapter's,
layer after layer) are concatenated once, the first of them to run computes and masks
`x @ A_groupᵀ` for all, and each adds its own columns' slice times its B: per decoder layer 4 A
products and 4 masks instead of 7 (S-LoRA and vLLM's punica kernels fuse the same way, on
q/k/v and gate/up packed into one weight). Whether a layer's input is the one its group's
product was computed from is checked on the tensor itself (the same object, unchanged since),
so a model that feeds them different inputs gets its own products, only slower (under
`torch.inference_mode`, which keeps no version counters, on the object alone).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch

from tunery.models.dropout import sibling_groups


@dataclass
class Plan:
    """One forward's rows: `adapters` in column order, `rows` the index in it of each row's
    adapter (-1: the bare base)."""

    adapters: tuple[str, ...]
    rows: torch.Tensor  # [batch] int64
    masks: dict | None = None  # per column layout (its owners tensor, shared by layers alike) and dtype: [batch, 1.., R] 0/1
    shared: dict | None = None  # per group of layers (its Group): (the input, its version, the masked x @ A_groupᵀ rows)

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

@dataclass(eq=False)
class Group:
    """The concatenated A matrices of layers that read one input, for one set of adapters:
    A_groupᵀ [in, R_group] in fp32 and in the base's dtype, and the column → adapter index."""

    a32: torch.Tensor
    a: torch.Tensor
    owners: torch.Tensor


@dataclass(eq=False)
class Entry:
    """One layer's part of a set of adapters: its group, its columns [start, stop) there, and
    its B_catᵀ [R, out] (scaling folded in) in fp32 and in the base's dtype."""

    group: Group
    start: int
    stop: int
    b32: torch.Tensor
    b: torch.Tensor


class BatchedLora:
    def __init__(self, model, max_cached: int = 16):
        from peft.tuners.lora.layer import Linear

        self.model = model
        self.plan: Plan | None = None
        self.max_cached = max_cached
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
        self._layers = [m for _, m in named]
        self._groups = sibling_groups(named)
        self._cache: OrderedDict[tuple[str, ...], dict[int, Entry]] = OrderedDict()
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

    def weights(self, adapters: tuple[str, ...]) -> dict[int, Entry]:
        """Per layer (by id) that any of `adapters` adapts: its Entry. Groups whose columns are
        laid out alike share one owners tensor (so one mask per forward serves them all)."""
        cached = self._cache.get(adapters)
        if cached is not None:
            self._cache.move_to_end(adapters)
            return cached
        out: dict[int, Entry] = {}
        layouts: dict[tuple, torch.Tensor] = {}
        for layers in self._groups:
            a_parts, b_parts, owners, spans = [], [], [], []
            width = 0
            for layer in layers:
                begin = width
                layer_b = []
                for index, name in enumerate(adapters):
                    if name not in layer.lora_A:
                        continue
                    a = cast(torch.Tensor, layer.lora_A[name].weight)
                    a_parts.append(a.float())
                    layer_b.append((cast(torch.Tensor, layer.lora_B[name].weight) * layer.scaling[name]).float())
                    owners.append(torch.full((a.shape[0],), index, dtype=torch.long, device=a.device))
                    width += a.shape[0]
                if layer_b:
                    spans.append((layer, begin, width))
                    b_parts.append(torch.cat(layer_b, dim=1).t().contiguous())
            if not a_parts:
                continue
            owner = torch.cat(owners)
            owner = layouts.setdefault((str(owner.device), tuple(owner.tolist())), owner)
            a32 = torch.cat(a_parts).t().contiguous()
            base_dtype = cast(torch.Tensor, layers[0].get_base_layer().weight).dtype
            # A quantized base (uint8 storage) computes the products in fp32 here.
            dtype = base_dtype if base_dtype.is_floating_point else a32.dtype
            group = Group(a32, a32.to(dtype), owner)
            for (layer, begin, stop), b32 in zip(spans, b_parts, strict=True):
                out[id(layer)] = Entry(group, begin, stop, b32, b32.to(dtype))
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
        if x.numel() <= FEW_ROWS * x.shape[-1]:  # a decoding step: fp32 products, then back
            out = result.float()  # the tensor itself when the base is fp32
            h = _group_product(plan, entry.group, x, fp32=True)[:, entry.start:entry.stop]
            out.view(-1, out.shape[-1]).addmm_(h, entry.b32)
            return out.to(result.dtype)
        h = _group_product(plan, entry.group, x, fp32=False)[:, entry.start:entry.stop]
        if result.dtype == entry.b.dtype and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(h, entry.b)
            return result
        return result + torch.matmul(h, entry.b).view(*result.shape[:-1], -1).to(result.dtype)

    return forward


def _group_product(plan: Plan, group: Group, x: torch.Tensor, *, fp32: bool) -> torch.Tensor:
    """`x @ A_groupᵀ` over x's rows flattened ([rows, R_group]), the columns of other rows'
    adapters zeroed: computed by the group's first layer to run, reused by the others while
    their input is the same tensor, unchanged."""
    if plan.shared is None:
        plan.shared = {}
    # Inference tensors keep no version counter: there the same object is taken as unchanged
    # (no model of the `models.dropout.SIBLINGS` families writes into a projection's input).
    version = -1 if x.is_inference() else x._version
    found = plan.shared.get(group)
    if found is not None and found[0] is x and found[1] == version:
        return found[2]
    rows = x.reshape(-1, x.shape[-1])
    h = torch.matmul(rows.float(), group.a32) if fp32 else torch.matmul(rows.to(group.a.dtype), group.a)
    # zero the columns of other rows' adapters (x is [batch, length.., in]: a row's tokens share its mask)
    h.view(x.shape[0], -1, h.shape[-1]).mul_(plan.mask(group.owners, h.dtype, 3))
    plan.shared[group] = (x, version, h)
    return h
