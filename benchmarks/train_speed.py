"""Training speed: `tunery train` against the plain transformers Trainer + peft script, one machine, one run.

    python benchmarks/train_speed.py            # SmolLM2-135M on the bundled extraction sample (~6 min)
    python benchmarks/train_speed.py --quick    # a tiny random Llama, a few steps (smoke run)
    python benchmarks/train_speed.py --tunery-inputs '{"lora_dropout": 0}'   # try a lever

Both train the same rows (the extraction sample's 400 training rows), one epoch, batch 8,
learning rate 3e-4, seed 42, LoRA r=8 on all linear layers: (a) the plain script
(`plain_script.py`, fp32, the model's own loss, `DataCollatorForSeq2Seq` padding), timed from its
process's start to its adapter on disk; (b) the `tunery train` command with its defaults, timed
from the command's start to its exit (data check, model load, precision probe, training,
adapter, manifest and archive). Reported for each: whole wall time, training time, real
(non-padding) tokens/s, peak RSS, final loss and exact match on the test split (scored
afterwards, by the same fp32 scorer, outside the timing); then the ratios. The CPU's flags and
its measured fp32 and bf16 matmul peaks come first. Results are appended to results.jsonl.
GPUs: benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    append_result,
    cpu_flags,
    git_commit,
    machine,
    matmul_gflops,
    run_child,
    score,
    versions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = {"num_train_epochs": 1, "train_batch_size": 8, "micro_batch_size": 8, "learning_rate": 3e-4, "seed": 42}


def load_rows(quick: bool) -> tuple[list[dict], list[dict]]:
    from tunery.samples.extraction import splits

    return splits(n_train=80, n_test=16) if quick else splits()


def tiny_base(folder: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, for --quick."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunery.models.registry import smollm2_gguf_path

    if (folder / "config.json").is_file():
        return str(folder)
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


# -- children ---------------------------------------------------------------------------------

def child_plain(args) -> dict:
    from plain_script import PlainSettings, train_plain

    from tunery.models.resolve import resolve_base

    train_rows, test_rows = load_rows(args.quick)
    s = PlainSettings(epochs=SHARED["num_train_epochs"], batch=SHARED["train_batch_size"],
                      micro_batch=SHARED["micro_batch_size"], learning_rate=SHARED["learning_rate"],
                      seed=SHARED["seed"], max_steps=args.max_steps)
    r = train_plain(resolve_base(args.base).path, train_rows, s)
    r.model.save_pretrained(Path(tempfile.mkdtemp()) / "adapter")
    wall = process_age()
    return {"wall_s": wall, "train_runtime_s": r.train_runtime_s, "real_tokens": r.real_tokens,
            "tokens_per_second": r.real_tokens / r.train_runtime_s, "train_loss": r.losses[-1], "steps": r.steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "exact_match": score(r.model, r.tokenizer, test_rows)["exact_match"]}


def child_score(args) -> dict:
    from peft import PeftModel

    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base

    _, test_rows = load_rows(args.quick)
    resolved = resolve_base(args.base)
    model = PeftModel.from_pretrained(load_model(resolved, precision="fp32"), args.adapter).eval()
    return {"exact_match": score(model, load_tokenizer(resolved), test_rows)["exact_match"]}


def run_tunery(args, extra: dict) -> dict:
    """`tunery train` as a user runs it, timed from the outside."""
    train_rows, _ = load_rows(args.quick)
    work = Path(tempfile.mkdtemp())
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    inputs = {**SHARED, "max_steps": args.max_steps, "run_validation": False, **extra}
    flags = []
    for key, value in inputs.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else "--no-" + key.replace("_", "-")] if isinstance(value, bool) else [flag, str(value)]
    command = [sys.executable, "-m", "tunery.cli", "train", "--base", args.base, "--train-data", str(data),
               "-o", str(work / "run"), "--no-progress", *flags]
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"tunery train failed with exit code {proc.returncode}")
    m = json.loads((work / "run" / "manifest.json").read_text())["metrics"]
    events = [json.loads(line) for line in (work / "run" / "events.jsonl").read_text().splitlines()]
    precision = next((e["message"] for e in events if e["type"] == "log" and e["message"].startswith("precision:")), "")
    score = run_child(Path(__file__), ["--child", "score", "--base", args.base, "--adapter", str(work / "run" / "adapter"),
                                       *(["--quick"] if args.quick else [])])
    return {"wall_s": wall, "train_runtime_s": m["train_runtime_s"], "real_tokens": m["real_tokens"],
            "tokens_per_second": m["real_tokens"] / m["train_runtime_s"], "train_loss": m["train_loss"],
            "steps": m["steps"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "exact_match": score["exact_match"], "precision": precision.strip()}


def report(name: str, r: dict) -> None:
    print(f"{name:8} wall {r['wall_s']:6.1f}s  training {r['train_runtime_s']:6.1f}s  "
          f"{r['tokens_per_second']:6.1f} real tok/s  RSS {r['peak_rss_mb']:6.0f} MB  steps {r['steps']}  "
          f"final loss {r['train_loss']:.4f}  exact match {r['exact_match']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap optimizer steps (-1: one epoch)")
    parser.add_argument("--tunery-inputs", default="", help="JSON of extra tunery training inputs")
    parser.add_argument("--label", default="", help="a note stored with the result")
    parser.add_argument("--child", choices=["plain", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.base = tiny_base(Path(tempfile.gettempdir()) / "tunery-bench-tiny")
        if args.max_steps == -1:
            args.max_steps = 4
    if args.child:
        out = child_plain(args) if args.child == "plain" else child_score(args)
        print(json.dumps(out))
        return
    peaks = {"fp32": matmul_gflops("fp32"), "bf16": matmul_gflops("bf16")}
    print(f"machine: {cpu_flags()}")
    print(f"matmul peaks (1024×1024): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"({peaks['bf16'] / peaks['fp32']:.2f}×)", flush=True)
    extra = json.loads(args.tunery_inputs or "{}")
    common = ["--base", args.base, "--max-steps", str(args.max_steps)] + (["--quick"] if args.quick else [])
    plain = run_child(Path(__file__), ["--child", "plain", *common])
    tunery = run_tunery(args, extra)
    report("plain", plain)
    report("tunery", tunery)
    print(f"tunery {tunery['precision']}")
    ratios = {"wall_speedup": plain["wall_s"] / tunery["wall_s"],
              "training_speedup": plain["train_runtime_s"] / tunery["train_runtime_s"],
              "tokens_per_second": tunery["tokens_per_second"] / plain["tokens_per_second"],
              "peak_rss": tunery["peak_rss_mb"] / plain["peak_rss_mb"]}
    print(f"tunery vs plain: {ratios['wall_speedup']:.2f}× faster wall, {ratios['training_speedup']:.2f}× faster "
          f"training, {ratios['tokens_per_second']:.2f}× tokens/s, {ratios['peak_rss']:.2f}× peak RSS; exact match "
          f"{tunery['exact_match']:.3f} vs {plain['exact_match']:.3f}")
    append_result({
        "benchmark": "train_speed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "label": args.label, "quick": args.quick, "base": args.base,
        "max_steps": args.max_steps, "tunery_inputs": extra, "machine": machine(), "versions": versions(),
        "matmul_gflops": peaks, "plain": plain, "tunery": tunery, "ratios": ratios,
    })


if __name__ == "__main__":
    main()
