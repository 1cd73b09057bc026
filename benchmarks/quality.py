"""Quality at a fixed budget: tunery's defaults against the plain transformers + peft script.

    python benchmarks/quality.py                       # 3 tasks × 3 seeds, SmolLM2-135M (~40 min on 2 cores)
    python benchmarks/quality.py --tasks extraction --seeds 1 \
        --variant rslora='{"use_rslora": true}' --variant plus='{"loraplus_lr_ratio": 16}'   # try levers

Each task is a bundled prompt/completion sample: `extraction` (booking → name | party | day |
time, exact match), `triage` (support message → category | order number: a category plus an
extracted field, exact match) and `summarization` (chat → one-sentence summary, ROUGE-L). For
every task and seed, the plain script (`plain_script.py`: fp32, linear decay, no warmup, the
model's own loss) and each tunery variant (default: tunery's defaults as they are) train on the
same rows with the same epochs, batch, learning rate and seed; every adapter is then scored by
the same scorer — greedy generation in fp32 on the held-out test rows, `tunery.eval`'s exact
match and ROUGE-L — so precision or loss choices made while training cannot leak into the score.
Prints mean ± standard deviation per task and the difference, and appends the record to
results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, score, summary, versions  # noqa: E402
from plain_script import PlainSettings, train_plain  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# task: (sample module, the metric it is judged by)
TASKS = {"extraction": "exact_match", "triage": "exact_match", "summarization": "rougeL"}


def task_rows(task: str, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    import importlib

    module = importlib.import_module(f"tunery.samples.{task}")
    return module.splits(n_train=n_train, n_test=n_test)


def run_tunery(base: str, train_rows: list[dict], test_rows: list[dict], args, seed: int, extra: dict) -> dict:
    from peft import PeftModel

    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base
    from tunery.train.recipe import train

    work = Path(tempfile.mkdtemp())
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    inputs = {"train_data": str(data), "num_train_epochs": args.epochs, "train_batch_size": args.batch,
              "micro_batch_size": args.batch, "learning_rate": args.lr, "seed": seed,
              # The plain script validates nothing; validation does not change what is learned.
              "run_validation": False, "save_steps": 10**6, **extra}
    started = time.time()
    result = train(inputs, base=base, output_dir=work / "run", progress=False)
    wall = time.time() - started
    m = result.manifest["metrics"]
    resolved = resolve_base(base)
    model = PeftModel.from_pretrained(load_model(resolved, precision="fp32"), str(result.run_dir / "adapter")).eval()
    out = score(model, load_tokenizer(resolved), test_rows)
    out.update({"train_runtime_s": m["train_runtime_s"], "wall_s": round(wall, 1),
                "tokens_per_second": round(m["real_tokens"] / max(m["train_runtime_s"], 1e-9), 1),
                "steps": m["steps"], "final_loss": m["train_loss"]})
    return out


def run_plain(base_dir: str, train_rows: list[dict], test_rows: list[dict], args, seed: int) -> dict:
    r = train_plain(base_dir, train_rows, PlainSettings(epochs=args.epochs, batch=args.batch, micro_batch=args.batch,
                                                        learning_rate=args.lr, seed=seed))
    out = score(r.model, r.tokenizer, test_rows)
    out.update({"train_runtime_s": round(r.train_runtime_s, 2), "wall_s": round(r.wall_s, 1),
                "tokens_per_second": round(r.real_tokens / r.train_runtime_s, 1), "steps": r.steps,
                "final_loss": r.losses[-1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=240, help="training rows per task")
    parser.add_argument("--n-test", type=int, default=50, help="held-out test rows per task")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="a tunery variant: extra training inputs over its defaults (default: tunery={})")
    parser.add_argument("--skip-plain", action="store_true", help="variants only (screening; no differences)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    variants = {"tunery": {}} if not args.variant else {
        name: json.loads(spec) for name, spec in (v.split("=", 1) for v in args.variant)}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    from tunery.models.resolve import resolve_base

    base_dir = resolve_base(args.base).path
    print(f"machine: {cpu_flags()}; {args.base}, {args.n_train} train / {args.n_test} test rows, "
          f"{args.epochs} epoch, batch {args.batch}, lr {args.lr}, seeds {seeds}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {t: {"plain": [], **{v: [] for v in variants}} for t in tasks}
    for task in tasks:
        train_rows, test_rows = task_rows(task, args.n_train, args.n_test)
        for seed in seeds:
            jobs = ([("plain", None)] if not args.skip_plain else []) + list(variants.items())
            for name, extra in jobs:
                r = (run_plain(base_dir, train_rows, test_rows, args, seed) if extra is None
                     else run_tunery(args.base, train_rows, test_rows, args, seed, extra))
                runs[task][name].append(r)
                print(f"{task:13} seed {seed}  {name:12} EM {r['exact_match']:.3f}  ROUGE-L {r['rougeL']:.3f}  "
                      f"loss {r['loss']:.4f}  {r['tokens_per_second']:6.1f} tok/s  train {r['train_runtime_s']:6.1f}s",
                      flush=True)

    print("\nper task (mean ± standard deviation over seeds; difference = variant − plain, paired by seed)")
    table = {}
    for task in tasks:
        metric = TASKS[task]
        plain = [r[metric] for r in runs[task]["plain"]]
        table[task] = {"metric": metric, "plain": plain}
        if plain:
            print(f"{task:13} {metric:11} plain   {summary(plain)}")
        for name in variants:
            vals = [r[metric] for r in runs[task][name]]
            table[task][name] = vals
            if not plain:
                print(f"{task:13} {metric:11} {name:7} {summary(vals)}")
                continue
            diffs = [v - p for v, p in zip(vals, plain, strict=True)]
            speed = statistics.mean(r["tokens_per_second"] for r in runs[task][name]) / statistics.mean(
                r["tokens_per_second"] for r in runs[task]["plain"])
            print(f"{'':13} {'':11} {name:7} {summary(vals)}   difference {summary(diffs)}   "
                  f"tokens/s {speed:.2f}× plain")
    append_result({
        "benchmark": "quality", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
        "label": args.label, "base": args.base, "settings": {k: v for k, v in vars(args).items() if k != "variant"},
        "variants": variants, "machine": machine(), "versions": versions(), "table": table, "runs": runs,
    })


if __name__ == "__main__":
    main()
