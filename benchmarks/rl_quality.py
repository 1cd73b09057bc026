"""Reinforcement fine-tuning (method=grpo) at a fixed budget: does GRPO with a grader raise a
held-out score, and does tunery's GRPO match a plain TRL script?

    python benchmarks/rl_quality.py                 # 3 seeds × (SFT, tunery GRPO, plain GRPO)
    python benchmarks/rl_quality.py --seeds 1       # a quick look
    python benchmarks/rl_quality.py --seeds 3 --label avx2 && \
        python benchmarks/rl_quality.py --summarize --label avx2   # seeds run apart, combined

The task is verifiable and made here (`rft_rows(seed)`): a customer's short message holds an
order, ticket, invoice or booking number, and the user asks for it: "... What is the ticket
number? Reply with just the number." Each row carries its `answer`. The grader is OpenAI's grader
JSON, a multi grader of a string_check (`like`: the answer holds the number) and a python grader
(shortness, `1 - characters / 80`, in tunery's sandbox), `found * (0.5 + 0.5 * short)`: about
0.97 for "60494", 0.8 for "The ticket number is 60494.", 0 without the number. SmolLM2-135M-
Instruct's base apologises, greets and explains, and its answers hold the number only about
half the time when sampled; held-out rows use other names, words and messages.

Arms, each on the same 64 prompts, one epoch, 4 prompts a step, with the same learning rate
(3e-4) and seed (so the same 16 optimizer steps):

- base: SmolLM2 as it is;
- sft: tunery's supervised tuning on the same prompts with the answer (the number) as the
  assistant's reply: what a user with the answers would do instead;
- tunery: `tunery.train.recipe.train` with `method=grpo`, the grader JSON above, 6 answers a
  prompt, answers of up to 32 tokens sampled at temperature 0.7, tunery's defaults otherwise;
- plain: `plain_grpo.py`, transformers + peft + TRL's GRPOTrainer with the same LoRA config,
  batch, answers, length, temperature and learning rate, the same score as a Python function,
  TRL's defaults otherwise.

Every adapter is loaded onto a fresh fp32 base and scored by tunery's evaluator on the held-out
rows (`tunery.eval.evaluate.evaluate_model`, format "rft", 32 new tokens) with the same grader,
twice: sampled as the model is served by default (T=0.75, top_p 0.9, top_k 50; 4 answers a
prompt, fixed seeds), which is the policy GRPO optimizes and the headline score; and greedy. The
base's greedy answer ("The claim number is 36966.") already scores about 0.82, so greedy has
little room; its sampled answers ramble, which is what the grader teaches away. Prints each arm's held-out score (mean ± standard deviation over seeds) and its parts, the
paired difference against plain, and time per optimizer step (tunery against plain, same
machine, same run); appends the record to results.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, summary, versions  # noqa: E402
from plain_grpo import PlainGRPOSettings, train_plain_grpo  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAIN_NAMES = ["Sam", "Mia", "Leo", "Ava", "Max", "Zoe", "Ben", "Ivy"]
TEST_NAMES = ["Kim", "Ray", "Liz", "Joe", "Ann", "Ted"]
TRAIN_THINGS = ["order", "ticket", "invoice", "booking"]
TEST_THINGS = ["parcel", "account", "claim"]
TRAIN_MESSAGES = [
    "Hi, this is {n}. My {t} number is {x} and it still has not arrived.",
    "{n} here: {t} {x} was charged twice, please check.",
    "Could you look into {t} {x}? Thanks, {n}.",
    "Hello, {t} {x} shows the wrong address. Regards, {n}",
]
TEST_MESSAGES = [
    "Good morning. {n} writing about {t} {x}, which I cannot find in my emails.",
    "Please cancel {t} number {x}. - {n}",
]

GRADER = {
    "type": "multi", "name": "extract", "calculate_output": "found * (0.5 + 0.5 * short)",
    "graders": {
        "found": {"type": "string_check", "name": "found", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.answer }}", "operation": "like"},
        "short": {"type": "python", "name": "short",
                  "source": "def grade(sample, item):\n"
                            "    return max(0.0, 1.0 - len(sample['output_text'].strip()) / 80)\n"},
    },
}


def plain_reward(answer: str, row: dict) -> float:
    """GRADER as a Python function, for the plain script."""
    return (row["answer"] in answer) * (0.5 + 0.5 * max(0.0, 1.0 - len(answer.strip()) / 80))


def rft_rows(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out RFT rows; held-out rows use other names, words and messages."""
    rng = random.Random(seed)

    def row(names: list[str], things: list[str], messages: list[str]) -> dict:
        number, thing = str(rng.randint(10000, 99999)), rng.choice(things)
        text = rng.choice(messages).format(n=rng.choice(names), t=thing, x=number)
        question = f"{text} What is the {thing} number? Reply with just the number."
        return {"messages": [{"role": "user", "content": question}], "answer": number}

    return ([row(TRAIN_NAMES, TRAIN_THINGS, TRAIN_MESSAGES) for _ in range(n_train)],
            [row(TEST_NAMES, TEST_THINGS, TEST_MESSAGES) for _ in range(n_test)])


# -- the one scorer -----------------------------------------------------------------------

#: Held-out answers are scored twice: sampled as the model is served by default (Replicate's
#: defaults: T=0.75, top_p 0.9, top_k 50), SAMPLED_PASSES answers a prompt with fixed seeds, which
#: is the policy GRPO optimizes; and greedy (one answer a prompt).
SAMPLED_PASSES = 4


def score(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    from tunery.eval.evaluate import evaluate_model
    from tunery.graders import load_grader
    from tunery.infer.generation import SamplingParams

    def one(params) -> dict:
        report = evaluate_model(model, tokenizer, rows, "rft", columns=[("m", contextlib.nullcontext)],
                                batch_size=16, n_examples=0, progress=False, grader=load_grader(GRADER),
                                max_new_tokens=max_new_tokens, params=params)
        return report["metrics"]["m"]

    passes = [one(SamplingParams(seed=1000 + i)) for i in range(SAMPLED_PASSES)]
    out = {k: round(statistics.mean(p[k] for p in passes), 4) for k in passes[0]}
    out.update({f"greedy_{k}": round(v, 4) for k, v in one(SamplingParams(temperature=0)).items()})
    return out


def score_weights(base: str, adapter_dir: str | Path | None, rows: list[dict], max_new_tokens: int) -> dict:
    """Load the adapter (or nothing: the base) onto a fresh fp32 base and score it."""
    from peft import PeftModel

    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base

    resolved = resolve_base(base)
    model = load_model(resolved, precision="fp32")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return score(model.eval(), load_tokenizer(resolved), rows, max_new_tokens)


# -- the arms ------------------------------------------------------------------------------

def common_inputs(args, seed: int) -> dict:
    return {"num_train_epochs": args.epochs, "train_batch_size": args.prompts, "learning_rate": args.lr,
            "seed": seed, "run_validation": False, "save_steps": 10**6}


def run_tunery_grpo(base: str, train_rows: list[dict], test_rows: list[dict], args, seed: int,
                    extra: dict | None = None) -> dict:
    from tunery.train.recipe import train

    work = Path(tempfile.mkdtemp())
    data = work / "rft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    inputs = {"train_data": str(data), "method": "grpo", "grader": GRADER, "num_generations": args.generations,
              "micro_batch_size": args.micro_batch, "max_completion_length": args.length,
              "generation_temperature": args.temperature, **common_inputs(args, seed), **(extra or {})}
    started = time.time()
    result = train(inputs, base=base, output_dir=work / "run", progress=False)
    wall = time.time() - started
    m = result.manifest["metrics"]
    out = score_weights(base, result.run_dir / "adapter", test_rows, args.length)
    rewards = [h["reward_mean"] for h in m["history"] if "reward_mean" in h]
    out.update({"train_runtime_s": round(m["train_runtime_s"], 1), "wall_s": round(wall, 1), "steps": m["steps"],
                "train_reward_first": rewards[0] if rewards else None, "train_reward_last": rewards[-1] if rewards else None})
    return out


def run_plain_grpo(base: str, base_dir: str, train_rows: list[dict], test_rows: list[dict], args, seed: int) -> dict:
    r = train_plain_grpo(base_dir, train_rows, plain_reward, PlainGRPOSettings(
        epochs=args.epochs, prompts_per_step=args.prompts, generations=args.generations, micro_batch=args.micro_batch,
        max_completion_length=args.length, temperature=args.temperature, learning_rate=args.lr, seed=seed))
    out = score_weights(base, r.adapter_dir, test_rows, args.length)
    rewards = [h.get("reward") for h in r.history if h.get("reward") is not None]
    out.update({"train_runtime_s": round(r.train_runtime_s, 1), "wall_s": round(r.wall_s, 1), "steps": r.steps,
                "train_reward_first": rewards[0] if rewards else None, "train_reward_last": rewards[-1] if rewards else None})
    return out


def run_sft(base: str, train_rows: list[dict], test_rows: list[dict], args, seed: int) -> dict:
    from tunery.train.recipe import train

    work = Path(tempfile.mkdtemp())
    data = work / "sft.jsonl"
    chats = [{"messages": [*r["messages"], {"role": "assistant", "content": r["answer"]}]} for r in train_rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in chats))
    started = time.time()
    result = train({"train_data": str(data), **common_inputs(args, seed)}, base=base, output_dir=work / "run",
                   progress=False)
    m = result.manifest["metrics"]
    out = score_weights(base, result.run_dir / "adapter", test_rows, args.length)
    out.update({"train_runtime_s": round(m["train_runtime_s"], 1), "wall_s": round(time.time() - started, 1),
                "steps": m["steps"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=6, help="answers sampled per prompt")
    parser.add_argument("--micro-batch", type=int, default=8, help="answers per forward pass")
    parser.add_argument("--length", type=int, default=32, help="the longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--arms", default="sft,tunery,plain")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="one more tunery GRPO arm: extra training inputs over its defaults")
    parser.add_argument("--label", default="")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: combine the per-seed records of --label in results.jsonl")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {name: json.loads(spec) for name, spec in (v.split("=", 1) for v in args.variant)}
    arms = [a for a in args.arms.split(",") if a] + list(variants)
    from tunery.models.resolve import resolve_base

    base_dir = str(resolve_base(args.base).path)
    train_rows, test_rows = rft_rows(args.data_seed, args.n_train, args.n_test)
    started = time.time()
    print(f"machine: {cpu_flags()}; {args.base}, {len(train_rows)} train / {len(test_rows)} held-out prompts, "
          f"{args.epochs} epoch(s), {args.prompts} prompts × {args.generations} answers a step, answers ≤ "
          f"{args.length} tokens at T={args.temperature}, lr {args.lr}, seeds {seeds}", flush=True)
    if args.summarize:
        base_scores, runs, arms = from_records(args.label)
        report(args, base_scores, runs, arms, started, combined=True)
        return
    base_scores = score_weights(args.base, None, test_rows, args.length)
    print(f"base    held-out score {base_scores['grader_score']:.3f}  found {base_scores['grader_found']:.3f}  "
          f"short {base_scores['grader_short']:.3f}  greedy {base_scores['greedy_grader_score']:.3f}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        for name in arms:
            if name == "sft":
                r = run_sft(args.base, train_rows, test_rows, args, seed)
            elif name == "tunery" or name in variants:
                r = run_tunery_grpo(args.base, train_rows, test_rows, args, seed, variants.get(name))
            else:
                r = run_plain_grpo(args.base, base_dir, train_rows, test_rows, args, seed)
            r["seed"] = seed
            runs[name].append(r)
            print(f"seed {seed}  {name:7} held-out score {r['grader_score']:.3f}  found {r['grader_found']:.3f}  "
                  f"short {r['grader_short']:.3f}  greedy {r['greedy_grader_score']:.3f}  {r['steps']} steps  train {r['train_runtime_s']:.1f}s "
                  f"({r['train_runtime_s'] / max(1, r['steps']):.1f} s/step)  wall {r['wall_s']:.1f}s"
                  + (f"  train reward {r['train_reward_first']:.3f} → {r['train_reward_last']:.3f}"
                     if r.get("train_reward_first") is not None else ""), flush=True)
        # Each seed is kept as it ends: on a slow CPU the seeds of one label may take several runs
        # (--seeds 1, then --seeds 2,3), which --summarize then combines.
        append_result({"benchmark": "rl_quality_seed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "commit": git_commit(), "label": args.label, "seed": seed, "settings": vars(args),
                       "machine": machine(), "base_scores": base_scores,
                       "runs": {name: runs[name][-1] for name in arms}})
    report(args, base_scores, runs, arms, started)


def from_records(label: str) -> tuple[dict, dict[str, list[dict]], list[str]]:
    """The per-seed records of `label` in results.jsonl (the latest per seed), as one run's."""
    path = Path(__file__).resolve().parent / "results.jsonl"
    records: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("benchmark") == "rl_quality_seed" and rec.get("label") == label:
            records[rec["seed"]] = rec
    if not records:
        raise SystemExit(f"no rl_quality_seed records labelled {label!r} in {path}")
    recs = [records[k] for k in sorted(records)]
    arms = [a for a in recs[0]["runs"] if all(a in r["runs"] for r in recs)]
    print(f"from {len(recs)} seed record(s) labelled {label!r}: seeds {sorted(records)}, machine "
          f"{recs[0]['machine']['cpu']}, commits {sorted({r['commit'] for r in recs})}")
    return recs[0]["base_scores"], {a: [r["runs"][a] for r in recs] for a in arms}, arms


def report(args, base_scores: dict, runs: dict[str, list[dict]], arms: list[str], started: float,
           combined: bool = False) -> None:
    print("\nheld-out score (mean ± standard deviation over seeds; difference = arm − plain, paired by seed)")
    print(f"{'base':8} {base_scores['grader_score']:.3f}  greedy {base_scores['greedy_grader_score']:.3f}")
    table: dict[str, dict] = {"base": base_scores}
    for name in sorted(arms, key=lambda n: n != "plain"):  # plain first: the others are compared to it
        values = [r["grader_score"] for r in runs[name]]
        per_step = [r["train_runtime_s"] / max(1, r["steps"]) for r in runs[name]]
        table[name] = {"grader_score": values, "found": [r["grader_found"] for r in runs[name]],
                       "short": [r["grader_short"] for r in runs[name]], "s_per_step": per_step,
                       "greedy": [r["greedy_grader_score"] for r in runs[name]]}
        line = (f"{name:8} {summary(values)}  found {summary(table[name]['found'])}  short "
                f"{summary(table[name]['short'])}  greedy {summary(table[name]['greedy'])}  "
                f"{statistics.mean(per_step):.1f} s/step")
        if name != "plain" and "plain" in table:
            diff = [a - b for a, b in zip(values, table["plain"]["grader_score"], strict=True)]
            ratio = statistics.mean(per_step) / statistics.mean(table["plain"]["s_per_step"])
            line += f"\n{'':8} difference {summary(diff, '+')}; time per step {ratio:.2f}× plain's"
        print(line)
    for name in arms:
        if name != "sft":
            above = all(r["grader_score"] > base_scores["grader_score"] for r in runs[name])
            greedy = all(r["greedy_grader_score"] > base_scores["greedy_grader_score"] for r in runs[name])
            print(f"{name}: above the base on every seed: sampled {above}, greedy {greedy}")
    total = time.time() - started
    print(f"\ntotal {total / 60:.1f} min")
    append_result({
        "benchmark": "rl_quality", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "label": args.label, "base": args.base, "settings": vars(args), "grader": GRADER,
        "machine": machine(), "versions": {**versions(), "trl": _trl_version()}, "table": table, "runs": runs,
        "total_s": round(total, 1), "combined_from_seed_records": combined,
    })


def _trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    main()
