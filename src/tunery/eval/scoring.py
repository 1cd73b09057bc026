"""What every evaluation is computed from: the loss and log-probabilities of labelled tokens
(masked as in training), and greedy or sampled continuations on the embedded engine. Used by
tunery.eval.evaluate (the task's test rows) and tunery.eval.forgetting (what tuning cost)."""

from __future__ import annotations

from collections.abc import Callable


def _scored_batches(model, tokenizer, examples, batch_size: int):
    """(fp32 logits of each position, the label it predicts) per padded batch of `examples`,
    without gradients: what the loss and the log-probabilities below are computed from."""
    import torch

    from tunery.data import Collator, unpacked

    collate = Collator(tokenizer.pad_token_id, packed=False)
    device = next(model.parameters()).device
    seqs = unpacked(examples)
    for i in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in collate(seqs[i:i + batch_size]).items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[:, :-1].float()
        yield logits, labels[:, 1:]


def completion_loss(model, tokenizer, examples, *, batch_size: int, advance: Callable[[int], None]) -> float:
    """Mean cross-entropy per labelled token (completion tokens only, as in training)."""
    import torch

    total, count = 0.0, 0
    for logits, target in _scored_batches(model, tokenizer, examples, batch_size):
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
        advance(len(target))
    return total / max(1, count)


def sequence_logps(model, tokenizer, examples, *, batch_size: int, advance: Callable[[int], None]) -> list[float]:
    """Each example's summed log-probability of its labelled tokens given the tokens before them."""
    import torch

    out: list[float] = []
    for logits, target in _scored_batches(model, tokenizer, examples, batch_size):
        mask = target != -100
        logps = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (logps * mask).sum(dim=1).tolist()
        advance(len(target))
    return out


def preference_metrics(model, tokenizer, pairs, *, batch_size: int,
                       advance: Callable[[int], None]) -> tuple[dict[str, float], list[float]]:
    """preference_rate, logp_margin (and the mean log-probabilities of each answer) of `pairs`
    (data.PreferencePair), and each row's margin."""
    preferred = sequence_logps(model, tokenizer, [p.preferred for p in pairs], batch_size=batch_size,
                               advance=advance)
    non_preferred = sequence_logps(model, tokenizer, [p.non_preferred for p in pairs], batch_size=batch_size,
                                   advance=advance)
    margins = [a - b for a, b in zip(preferred, non_preferred, strict=True)]
    n = max(1, len(margins))
    return {
        "preference_rate": sum(m > 0 for m in margins) / n,
        "logp_margin": sum(margins) / n,
        "logp_preferred": sum(preferred) / n,
        "logp_non_preferred": sum(non_preferred) / n,
    }, margins


def generate_all(model, tokenizer, prompts: list[list[int]], *, params, max_new_tokens: int,
                 stops: list[str], batch_size: int, advance: Callable[[int], None]) -> list[str]:
    """Every prompt's continuation, generated on the embedded engine over `model` as it is (up to
    `batch_size` rows at once, continuously batched); each cut before its first stop sequence."""
    from dataclasses import replace

    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.generation import Request
    from tunery.models.load import column_major

    if not prompts:
        return []
    engine = EmbeddedEngine("evaluation", model=model, tokenizer=tokenizer, max_batch=batch_size,
                            max_queue=len(prompts))
    # fp32 CPU weights column-major while generating (few-row products: 24 extraction prompts,
    # 8 at a time, 32 tokens on SmolLM2 went 10.7-12.2 -> 8.7-9.6 s on AVX2), laid back after.
    with column_major(model):
        try:
            row_params = replace(params, max_new_tokens=max_new_tokens, stop_sequences=stops)
            generations = engine.submit_many([Request(p, replace(row_params)) for p in prompts])
            outputs = []
            for gen in generations:
                outputs.append(gen.text().strip())
                advance(1)
        finally:
            engine.close()
    return outputs
