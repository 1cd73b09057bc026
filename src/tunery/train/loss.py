"""Causal-LM loss computed only where a label exists.

A causal LM's forward computes logits for every position: batch × length × vocabulary floats
(8 × 64 × 49,152 for SmolLM2 — 100 MB in fp32) and a matmul of the same size, although prompt
masking leaves most positions without a label (in the extraction sample, 15 of 58 tokens carry
one). Here the decoder runs to its last hidden state, the positions whose *next* token is
labelled are gathered, and only those rows go through the LM head and the cross-entropy — in
chunks under activation checkpointing when there are many, so the logits tensor is never
materialized whole. The result equals the model's own loss (tested to 1e-5).

Under several processes the model is wrapped in DistributedDataParallel, which must run the
forward itself to synchronise gradients; there `labelled_loss_through_forward` asks the
model's own forward for the logits of the labelled positions only (transformers'
`logits_to_keep` with a boolean mask), at the cost of materializing those rows' logits whole.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_ROWS = 2048  # rows of logits alive at once: 2048 × 49,152 fp32 = 400 MB worst case


def causal_lm(model):
    """The *ForCausalLM module inside a peft wrapper (LoRA layers are injected into it in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_labelled_loss(model) -> bool:
    """Llama-style models: a decoder at `.model`, an `lm_head`, and no logit soft-capping or scaling."""
    lm = causal_lm(model)
    cfg = lm.config
    return (
        hasattr(lm, "model") and hasattr(lm, "lm_head")
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
    )


class TokenCounts:
    """Labelled next tokens that were the model's top choice, and all labelled next tokens, summed
    on the device (no synchronisation per batch) until `take` reads and resets them: the mean
    token accuracy of TRL's SFTTrainer and OpenAI's results file."""

    def __init__(self) -> None:
        self.correct: torch.Tensor | int = 0
        self.total: torch.Tensor | int = 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """`logits` (rows, vocab) and `target` (rows,) of labelled positions only."""
        with torch.no_grad():
            self.count((logits.argmax(-1) == target).sum(), target.numel())

    def count(self, correct: torch.Tensor | int, total: int) -> None:
        self.correct = self.correct + correct
        self.total = self.total + total

    def take(self) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        out = (self.correct, self.total)
        self.correct, self.total = 0, 0
        return out


def _chunk_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).sum()
    return F.cross_entropy(logits, target, reduction="sum"), correct


def labelled_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None,
                  counts: TokenCounts | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled next-token positions (sum / num_items_in_batch when given,
    so gradient accumulation weighs every token equally, as the Trainer's default loss does).
    `counts`, when given, adds the positions whose label was the top logit."""
    lm = causal_lm(model)
    labels = inputs["labels"]
    decoder_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = lm.model(**decoder_inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    rows = hidden[:, :-1][keep]
    tgt = target[keep]
    if rows.shape[0] <= CHUNK_ROWS:
        total, correct = _chunk_loss(lm.lm_head, rows, tgt)
    else:
        total, correct = rows.new_zeros((), dtype=torch.float32), tgt.new_zeros(())
        for h, t in zip(rows.split(CHUNK_ROWS), tgt.split(CHUNK_ROWS), strict=True):
            part, right = checkpoint(_chunk_loss, lm.lm_head, h, t, use_reentrant=False)
            total, correct = total + part, correct + right
    if counts is not None:
        counts.count(correct, tgt.numel())
    denominator = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else keep.sum())
    # A batch without a single label contributes 0, not 0/0.
    return total / denominator.to(total.device).clamp(min=1)


def labelled_loss_through_forward(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None,
                                  counts: TokenCounts | None = None) -> torch.Tensor:
    """The same loss as `labelled_loss`, through `model`'s own forward (a DDP wrapper, say):
    the LM head runs only at positions whose next token is labelled."""
    labels = inputs["labels"]
    target = labels[:, 1:]
    keep = target != IGNORE
    # logits_to_keep as a boolean (batch, length) mask: position t is kept when token t+1 is labelled.
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = keep
    decoder_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**decoder_inputs, use_cache=False, logits_to_keep=mask).logits  # (labelled rows, vocab)
    logits = logits.float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(logits, target[keep], reduction="sum")
    if counts is not None:
        counts.add(logits, target[keep])
    denominator = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else keep.sum())
    return total / denominator.to(total.device).clamp(min=1)
