"""Preflight of a training, `tunery data check`: the training's own validation and tokenization of a
JSONL file with a base's tokenizer, without training.

Reports rows, tokens, tokens trained per row (after prompt masking), rows truncated, the
fill of packed sequences at the given chunk_size, padding, and an estimate of the training
time on this machine measured by timing a few real optimizer steps on the real base.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from tunery.errors import TuneryError
from tunery.models.registry import DEFAULT_BASE


def check_data(
    source: str,
    *,
    base: str = DEFAULT_BASE,
    chunk_size: int = 2048,
    max_seq_length: int | None = None,
    micro_batch_size: int = 4,
    train_batch_size: int = 4,
    num_train_epochs: int = 3,
    pack_sequences: bool = False,
    peft_method: str = "lora",
    estimate: bool = True,
    probe_steps: int = 3,
    chat_template: str | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Validate every line of `source` (raises DataError), then tokenize with `base`'s tokenizer and
    return the report as a dict."""
    from tunery.data import fetch, pack, padding_fraction, read_jsonl, tokenize_rows, unpacked
    from tunery.models.load import load_tokenizer
    from tunery.models.resolve import resolve_base
    from tunery.settings import get_settings

    settings = get_settings()
    settings.download_dir.mkdir(parents=True, exist_ok=True)
    ds = read_jsonl(fetch(source, settings.download_dir), name=source)
    resolved = resolve_base(base, settings)
    tokenizer = load_tokenizer(resolved, chat_template)
    max_length = max_seq_length or chunk_size
    if ds.format == "preference":
        # Two sequences per row (the conversation with each answer), labelled on the answers; DPO pads
        # them, never packs them, and this estimate times supervised steps, not DPO's.
        from tunery.data import preference_examples

        pairs = preference_examples(ds.rows, tokenizer, max_length=max_length)
        examples = [e for p in pairs for e in (p.preferred, p.non_preferred)]
        pack_sequences, estimate = False, False
    else:
        examples = tokenize_rows(ds.rows, ds.format, tokenizer, max_length=max_length)
    lengths = [len(e.input_ids) for e in examples]
    trained = [sum(lab != -100 for lab in e.labels) for e in examples]
    # Packing needs every example to fit a chunk; without packing, rows may be longer than chunk_size.
    fits = max_length <= chunk_size
    packed = pack(examples, chunk_size) if fits else []
    packed_fill = sum(len(s.input_ids) for s in packed) / (len(packed) * chunk_size) if packed else None
    if pack_sequences and not fits:
        raise TuneryError(f"max_seq_length ({max_length}) cannot exceed chunk_size ({chunk_size}) when packing")
    sequences = packed if pack_sequences else unpacked(examples)
    report: dict[str, Any] = {
        "file": source,
        "format": ds.format,
        "sha256": ds.sha256,
        "rows": len(ds.rows),
        "base": base,
        "tokens": sum(lengths),
        "tokens_per_row": {"mean": round(statistics.fmean(lengths), 1), "min": min(lengths),
                           "max": max(lengths)},
        "trained_tokens": sum(trained),
        "trained_tokens_per_row": {"mean": round(statistics.fmean(trained), 1), "min": min(trained),
                                   "max": max(trained)},
        "rows_truncated": sum(e.truncated for e in examples),
        "max_length": max_length,
        "chunk_size": chunk_size,
        "packed_sequences": len(packed),
        "packed_fill": round(packed_fill, 4) if packed_fill is not None else None,
        "padding_fraction": round(padding_fraction(unpacked(examples), micro_batch_size), 4),
        "steps_per_epoch": -(-(len(ds.rows) if ds.format == "preference" else len(sequences)) // train_batch_size),
    }
    report["memory"] = _memory(source, resolved, examples if ds.format == "preference" else sequences,
                               chunk_size=chunk_size, max_seq_length=max_seq_length,
                               micro_batch_size=micro_batch_size, train_batch_size=train_batch_size,
                               peft_method=peft_method, gradient_checkpointing=gradient_checkpointing,
                               method="dpo" if ds.format == "preference" else "sft")
    if estimate:
        tps = _probe_tokens_per_second(resolved, sequences, tokenizer, micro_batch_size, peft_method, probe_steps,
                                       packed=pack_sequences)
        total = sum(len(s.input_ids) for s in sequences) * num_train_epochs
        report["estimate"] = {
            "tokens_per_second": round(tps, 1),
            "epochs": num_train_epochs,
            "seconds": round(total / tps, 2) if tps > 0 else None,
            "peft_method": peft_method,
            "pack_sequences": pack_sequences,
        }
    return report


def _probe_tokens_per_second(resolved, sequences, tokenizer, micro_batch_size: int, peft_method: str,
                             steps: int, *, packed: bool) -> float:
    """Real tokens/s of a few LoRA/QLoRA/full optimizer steps on the first micro batches (after a warm-up
    step that is not timed)."""
    import torch

    from tunery.data import Collator
    from tunery.models.load import adapt, load_model
    from tunery.models.precision import resolve_precision
    from tunery.spec import TrainingInputs

    model = load_model(resolved, quantize_4bit=peft_method == "qlora", training=True,
                       trainable_base=peft_method == "full")
    model.config.use_cache = False
    defaults = TrainingInputs.model_construct(train_data="")  # the probe trains as a training on the defaults does
    model = adapt(model, method=peft_method, rank=defaults.lora_rank, alpha=defaults.lora_alpha,
                  dropout=defaults.lora_dropout, target_modules=defaults.target_modules, gradient_checkpointing=False)
    model.train()
    device = next(model.parameters()).device
    # Computed as `precision auto` trains: bf16 autocast where the training would take it.
    bf16 = resolve_precision("auto", str(device), quantized=peft_method == "qlora").name == "bf16"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collate = Collator(tokenizer.pad_token_id, packed=packed)
    feats = [{"input_ids": s.input_ids, "labels": s.labels, "position_ids": s.position_ids} for s in sequences]
    batches = [feats[i:i + micro_batch_size] for i in range(0, len(feats), micro_batch_size)][: steps + 1]
    tokens, elapsed = 0, 0.0
    for i, batch in enumerate(batches):
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i > 0:
            elapsed += time.perf_counter() - t
            tokens += sum(len(f["input_ids"]) for f in batch)
    return tokens / elapsed if elapsed > 0 else 0.0


def _memory(source: str, resolved, sequences: list, **inputs: Any) -> dict[str, Any]:
    """The training's peak memory estimate on this machine's device (models.memory.check_training,
    as the trainer makes it), and whether it fits: {"total", the parts, "capacity", "device",
    "fits", "problem"}."""
    from tunery.models.load import pick_device
    from tunery.models.memory import check_training, local_devices, summary
    from tunery.spec import TrainingInputs

    spec = TrainingInputs.model_validate({"train_data": source, **inputs})
    devices = local_devices(pick_device())
    estimate, problem = check_training(spec, resolved.path, sequences, devices)
    return {**summary(estimate), "capacity": devices.memory, "device": devices.description, "fits": problem is None,
            "problem": problem, "gradient_checkpointing": spec.gradient_checkpointing}


def render_report(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"data check: {r['file']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("format", r["format"])
    t.add_row("rows", str(r["rows"]))
    t.add_row("tokens", f"{r['tokens']:,} ({r['tokens_per_row']['mean']} per row, "
              f"min {r['tokens_per_row']['min']}, max {r['tokens_per_row']['max']})")
    t.add_row("trained tokens", f"{r['trained_tokens']:,} ({r['trained_tokens_per_row']['mean']} per row "
              "after prompt masking)")
    t.add_row("rows truncated", f"{r['rows_truncated']} (at {r['max_length']} tokens)")
    if r["packed_fill"] is not None:
        t.add_row("packed", f"{r['packed_sequences']} sequences of ≤{r['chunk_size']} tokens, "
                  f"fill {r['packed_fill']:.1%}")
    t.add_row("padding (unpacked)", f"{r['padding_fraction']:.1%}")
    t.add_row("steps per epoch", str(r["steps_per_epoch"]))
    if mem := r.get("memory"):
        from tunery.models.memory import gib

        t.add_row("peak memory (estimate)", f"~{gib(mem['total'])} of {mem['device']}: weights "
                  f"{gib(mem['weights'])}, optimizer and gradients {gib(mem['trainable'])}, activations "
                  f"{gib(mem['activations'])}, logits {gib(mem['logits'])}")
        if not mem["fits"]:
            t.add_row("peak memory (estimate)", f"[bold red]does not fit[/]: {mem['problem']}")
    if est := r.get("estimate"):
        secs = est["seconds"]
        if secs is None:
            when = "unknown"
        elif secs < 90:
            when = f"{secs:.1f} s"
        else:
            when = f"{secs / 60:.1f} min"
        t.add_row("estimated training time", f"{when} for {est['epochs']} epochs at {est['tokens_per_second']} "
                  f"tokens/s ({est['peft_method']}, measured here)")
    console.print(t)
