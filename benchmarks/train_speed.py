"""Training speed: tunery against a plain transformers Trainer + peft script, same machine, same run.

    python benchmarks/train_speed.py            # SmolLM2-135M on the bundled extraction sample
    python benchmarks/train_speed.py --quick    # a tiny random Llama, a few steps (smoke run)
    python benchmarks/train_speed.py --tunery-inputs '{"lora_dropout": 0}'   # try a lever

Each configuration runs in its own process (so peak RSS is its own): (a) the baseline — Trainer +
peft LoRA r=8, alpha=16, all linear layers, fp32, prompt masked, no packing, padded to the longest
in each micro batch; (b) tunery with its defaults. Same data, learning rate, batch, epochs, seed.
Reported for each: real (non-padding) tokens/s, padding fraction, peak RSS, wall time, final train
and validation loss, exact match on the test split, achieved model FLOP/s (4N per token for LoRA,
6N for full) as a fraction of this machine's measured fp32 and bf16 matmul throughput; then the
ratios (b)/(a). Results are appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, git_commit, machine, matmul_gflops, peak_rss_mb, run_child, versions  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = {"num_train_epochs": 1, "train_batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3,
          "seed": 42, "num_validation_samples": 20}


# -- data -------------------------------------------------------------------------------------

def load_rows(quick: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """train, validation (the tail of train, as tunery takes it), test."""
    from tunery.samples.extraction import splits

    train, test = splits(n_train=80, n_test=16) if quick else splits()
    n_val = SHARED["num_validation_samples"]
    return train[:-n_val], train[-n_val:], test


def tiny_base(folder: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, for --quick."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunery.models.registry import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


RANDOM_CONFIGS = {
    # name: (hidden, intermediate, layers, heads, kv heads) — Llama shapes with random weights, for
    # machines (a GPU box) that have the compute but not the real weights.
    "llama-1b": (2048, 8192, 16, 32, 8),
    "llama-7b": (4096, 11008, 32, 32, 32),
}


def random_llama(name: str, folder: Path) -> str:
    """A Llama-shaped model with random weights and SmolLM2's tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunery.models.registry import smollm2_gguf_path

    hidden, inter, layers, heads, kv = RANDOM_CONFIGS[name]
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def exact_match(model, tokenizer, test_rows) -> float:
    from tunery.eval.evaluate import evaluate_model

    report = evaluate_model(model, tokenizer, test_rows, "prompt_completion",
                            columns=[("tuned", contextlib.nullcontext)], progress=False, n_examples=0)
    return report["metrics"]["tuned"]["exact_match"]


# -- (a) the baseline: what a user writes by hand --------------------------------------------

def run_baseline(base_dir: str, quick: bool, max_steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    train_rows, val_rows, test_rows = load_rows(quick)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token

    def encode(row):
        p = tok(row["prompt"]).input_ids
        c = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        return {"input_ids": p + c, "labels": [-100] * len(p) + c}

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    counts = {"real": 0, "padded": 0}
    pad_collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(features):
        batch = pad_collator(features)
        if model.training:
            counts["real"] += int(batch["attention_mask"].sum())
            counts["padded"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=SHARED["micro_batch_size"],
        gradient_accumulation_steps=SHARED["train_batch_size"] // SHARED["micro_batch_size"],
        num_train_epochs=SHARED["num_train_epochs"], max_steps=max_steps, learning_rate=SHARED["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=0.03, seed=SHARED["seed"], logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[encode(r) for r in train_rows],
                      eval_dataset=[encode(r) for r in val_rows], data_collator=collate)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    val = trainer.evaluate()["eval_loss"]
    runtime = out.metrics["train_runtime"]
    return {
        "real_tokens": counts["real"], "train_runtime_s": runtime,
        "tokens_per_second": counts["real"] / runtime,
        "padding_fraction": 1 - counts["real"] / max(1, counts["padded"]),
        "train_loss": losses[-1], "val_loss": val, "exact_match": exact_match(model, tok, test_rows),
        "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "steps": trainer.state.global_step,
    }


# -- (b) tunery -------------------------------------------------------------------------------

def run_tunery(base: str, quick: bool, max_steps: int, extra: dict) -> dict:
    from peft import PeftModel

    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base
    from tunery.train.recipe import train

    train_rows, val_rows, test_rows = load_rows(quick)
    work = Path(tempfile.mkdtemp())
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows + val_rows))
    inputs = {"train_data": str(data), **SHARED, "max_steps": max_steps, "save_steps": 10**6, **extra}
    result = train(inputs, base=base, output_dir=work / "run", progress=False)
    m = result.manifest["metrics"]
    resolved = resolve_base(base)
    tok = load_tokenizer(resolved)
    base_model = load_model(resolved, precision="fp32")
    params = sum(p.numel() for p in base_model.parameters())
    model = PeftModel.from_pretrained(base_model, str(result.run_dir / "adapter"))
    return {
        "real_tokens": m["real_tokens"], "train_runtime_s": m["train_runtime_s"],
        "tokens_per_second": m["real_tokens"] / m["train_runtime_s"],
        "padding_fraction": m["padding_fraction"], "train_loss": m["train_loss"], "val_loss": m["val_loss"],
        "exact_match": exact_match(model, tok, test_rows), "params": params, "steps": m["steps"],
        "inputs": result.manifest["resolved_inputs"],
    }


def child_main(args) -> None:
    started = time.time()
    base = args.base
    if args.quick:
        base = tiny_base(Path(tempfile.mkdtemp()) / "tiny")
    elif args.random_config:
        base = random_llama(args.random_config, Path(tempfile.mkdtemp()) / args.random_config)
    if args.child == "baseline":
        from tunery.models.resolve import resolve_base

        out = run_baseline(resolve_base(base).path, args.quick, args.max_steps)
    else:
        out = run_tunery(base, args.quick, args.max_steps, json.loads(args.tunery_inputs or "{}"))
    out["wall_s"] = time.time() - started
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def report(name: str, r: dict, peaks: dict, method: str) -> None:
    per_token = (6 if method == "full" else 4) * r["params"]
    flops = per_token * r["tokens_per_second"] / 1e9
    r["model_gflops"] = flops
    r["fraction_of_fp32_peak"] = flops / peaks["fp32"]
    r["fraction_of_bf16_peak"] = flops / peaks["bf16"]
    print(f"{name:9} {r['tokens_per_second']:8.1f} tok/s  padding {r['padding_fraction']:6.1%}  "
          f"RSS {r['peak_rss_mb']:7.0f} MB  wall {r['wall_s']:6.1f}s  train loss {r['train_loss']:.4f}  "
          f"val loss {r['val_loss']:.4f}  EM {r['exact_match']:.3f}  {flops:6.1f} GFLOP/s "
          f"({r['fraction_of_fp32_peak']:.0%} of fp32, {r['fraction_of_bf16_peak']:.0%} of bf16 matmul)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap optimizer steps (-1: one epoch)")
    parser.add_argument("--tunery-inputs", default="", help="JSON of extra tunery training inputs")
    parser.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                        help="a Llama-shaped model with random weights instead of --base (for GPUs)")
    parser.add_argument("--label", default="", help="a note stored with the result")
    parser.add_argument("--child", choices=["baseline", "tunery"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.quick and args.max_steps == -1:
        args.max_steps = 4
    common = ["--base", args.base, "--max-steps", str(args.max_steps)] + (["--quick"] if args.quick else [])
    if args.random_config:
        common += ["--random-config", args.random_config]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    peaks = {"fp32": matmul_gflops("fp32", n=n, device=device), "bf16": matmul_gflops("bf16", n=n, device=device)}
    print(f"machine: fp32 matmul {peaks['fp32']:.0f} GFLOP/s, bf16 matmul {peaks['bf16']:.0f} GFLOP/s")
    script = Path(__file__)
    baseline = run_child(script, ["--child", "baseline", *common])
    tunery = run_child(script, ["--child", "tunery", *common, "--tunery-inputs", args.tunery_inputs or "{}"])
    method = json.loads(args.tunery_inputs or "{}").get("peft_method", "lora")
    report("baseline", baseline, peaks, "lora")
    report("tunery", tunery, peaks, method)
    ratios = {
        "tokens_per_second": tunery["tokens_per_second"] / baseline["tokens_per_second"],
        "peak_rss": tunery["peak_rss_mb"] / baseline["peak_rss_mb"],
        "wall": tunery["wall_s"] / baseline["wall_s"],
        "val_loss": tunery["val_loss"] / baseline["val_loss"],
    }
    print(f"ratio tunery/baseline: {ratios['tokens_per_second']:.2f}x tokens/s, "
          f"{ratios['peak_rss']:.2f}x peak RSS, {ratios['wall']:.2f}x wall, val loss {ratios['val_loss']:.2f}x, "
          f"exact match {tunery['exact_match']:.3f} vs {baseline['exact_match']:.3f}")
    append_result({
        "benchmark": "train_speed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "label": args.label, "quick": args.quick, "base": args.base,
        "max_steps": args.max_steps, "tunery_inputs": json.loads(args.tunery_inputs or "{}"),
        "machine": machine(), "versions": versions(), "matmul_gflops": peaks,
        "baseline": baseline, "tunery": tunery, "ratios": ratios,
    })


if __name__ == "__main__":
    main()
