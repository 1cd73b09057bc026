"""DPO quality at a fixed budget: tunery's DPO defaults against a plain TRL script.

    python benchmarks/dpo_quality.py                          # 3 seeds × (plain, tunery, tunery-plus16), ~20 min on 2 cores
    python benchmarks/dpo_quality.py --seeds 1 --no-plus-arm  # a quick look

The task is a synthetic preference set made by `preference_rows(seed)`: short arithmetic word
problems (items, people and numbers drawn from the seed), each with two answers that carry the
same, correct total and about the same length; the preferred answer is a terse tagged format
("Answer: 12"), the non-preferred one a sentence ("The answer is 12."). SmolLM2's base has no
strong preference between the two (it prefers the tag on about half the held-out rows); the
rule is a format, learnable from the wording, not from the number, and the held-out rows use
other names, items and numbers than the training rows.

Arms, all trained on the same rows with the same epochs, batch size, learning rate, beta,
max_length and seed (so the same number of optimizer steps):

- plain: `plain_dpo.py` — transformers + peft + TRL's DPOTrainer with a LoRA config of the same
  rank / alpha / targets and TRL's defaults otherwise;
- tunery: `tunery.train.recipe.train` with `method=dpo` and tunery's defaults as they are
  (plain LoRA, cosine with warmup, ...);
- tunery-plus16 (unless --no-plus-arm): the same with LoRA+ (`loraplus_lr_ratio=16`).

Every adapter is then loaded onto a fresh fp32 base and scored by the same scorer, tunery's own
evaluator on the held-out rows (`tunery.eval.evaluate.evaluate_model`, format "preference"):
preference_rate (the fraction of rows where the preferred answer has the higher summed
log-probability) and logp_margin (the mean difference). The base's numbers come from the same
scorer. Prints mean ± standard deviation per arm and the paired differences, and appends the
record to results.jsonl.
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
from plain_dpo import PlainDPOSettings, train_plain_dpo  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# -- the synthetic preference task --------------------------------------------------------

TRAIN_NAMES = ["Sam", "Mia", "Leo", "Ava", "Max", "Zoe", "Ben", "Ivy", "Tom", "Amy", "Dan", "Eve"]
TEST_NAMES = ["Kim", "Ray", "Liz", "Joe", "Ann", "Ted", "Sue", "Bob"]
TRAIN_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]
TEST_ITEMS = ["coins", "cards", "buttons", "candles", "plates"]
# The questions; every row's preferred answer is "Answer: <total>" and its non-preferred answer
# "The answer is <total>." — the same, correct number, 4-5 against 5-6 tokens. SmolLM2's base is
# close to indifferent between the two (on the held-out rows of data seed 0 it prefers the tag on
# 13 of 24, mean margin +0.03 nats); with a sentence such as "After that, Sam has 12 apples." against an
# equation it was not (+14 nats for the equation), so those were not used.
QUESTIONS = [
    "{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
    "{n} had {a} {i} and found {b} more. How many {i} are there in total?",
    "A box holds {a} {i}. {n} adds {b}. How many {i} are in the box?",
    "{n} counts {a} {i}, then {b} more. What is the count?",
]
PREFERRED, NON_PREFERRED = "Answer: {s}", "The answer is {s}."


def preference_rows(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out preference rows (OpenAI's DPO format). Held-out rows use other
    names and items than the training rows."""
    rng = random.Random(seed)

    def row(names: list[str], items: list[str]) -> dict:
        q, good, bad = rng.choice(QUESTIONS), PREFERRED, NON_PREFERRED
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        v = {"n": rng.choice(names), "i": rng.choice(items), "a": a, "b": b, "s": a + b}
        return {"input": {"messages": [{"role": "user", "content": q.format(**v)}]},
                "preferred_output": [{"role": "assistant", "content": good.format(**v)}],
                "non_preferred_output": [{"role": "assistant", "content": bad.format(**v)}]}

    return ([row(TRAIN_NAMES, TRAIN_ITEMS) for _ in range(n_train)],
            [row(TEST_NAMES, TEST_ITEMS) for _ in range(n_test)])


# -- the one scorer -----------------------------------------------------------------------

def score_preferences(model, tokenizer, rows: list[dict]) -> dict:
    """tunery's evaluator on preference rows: preference_rate, logp_margin and each answer's mean logp."""
    from tunery.eval.evaluate import evaluate_model

    report = evaluate_model(model, tokenizer, rows, "preference", columns=[("m", contextlib.nullcontext)],
                            batch_size=16, n_examples=0, progress=False)
    return {k: round(v, 4) for k, v in report["metrics"]["m"].items()}


def score_adapter(base: str, adapter_dir: str | Path, rows: list[dict]) -> dict:
    """Load the adapter onto a fresh fp32 base and score it: the same path for every arm."""
    from peft import PeftModel

    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base

    resolved = resolve_base(base)
    model = PeftModel.from_pretrained(load_model(resolved, precision="fp32"), str(adapter_dir)).eval()
    return score_preferences(model, load_tokenizer(resolved), rows)


def score_base(base: str, rows: list[dict]) -> dict:
    from tunery.models.load import load_model, load_tokenizer
    from tunery.models.resolve import resolve_base

    resolved = resolve_base(base)
    return score_preferences(load_model(resolved, precision="fp32").eval(), load_tokenizer(resolved), rows)


# -- the arms ------------------------------------------------------------------------------

def run_tunery(base: str, train_rows: list[dict], test_rows: list[dict], args, seed: int, extra: dict) -> dict:
    from tunery.train.recipe import train

    work = Path(tempfile.mkdtemp())
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    inputs = {"train_data": str(data), "method": "dpo", "num_train_epochs": args.epochs,
              "train_batch_size": args.batch, "micro_batch_size": args.batch, "learning_rate": args.lr,
              "dpo_beta": args.beta, "max_seq_length": args.max_length, "seed": seed,
              # The plain script validates nothing (and would otherwise lose 50 rows to validation).
              "run_validation": False, "save_steps": 10**6, **extra}
    started = time.time()
    result = train(inputs, base=base, output_dir=work / "run", progress=False)
    wall = time.time() - started
    m = result.manifest["metrics"]
    out = score_adapter(base, result.run_dir / "adapter", test_rows)
    out.update({"train_runtime_s": round(m["train_runtime_s"], 1), "wall_s": round(wall, 1), "steps": m["steps"],
                "final_loss": m.get("train_loss"),
                "train_reward_accuracy": m.get("rewards_accuracy", m.get("reward_accuracy"))})
    return out


def run_plain(base: str, base_dir: str, train_rows: list[dict], test_rows: list[dict], args, seed: int) -> dict:
    r = train_plain_dpo(base_dir, train_rows, PlainDPOSettings(
        epochs=args.epochs, batch=args.batch, learning_rate=args.lr, beta=args.beta, max_length=args.max_length,
        seed=seed))
    out = score_adapter(base, r.adapter_dir, test_rows)
    last = r.history[-1] if r.history else {}
    out.update({"train_runtime_s": round(r.train_runtime_s, 1), "wall_s": round(r.wall_s, 1), "steps": r.steps,
                "final_loss": r.losses[-1] if r.losses else None,
                "train_reward_accuracy": last.get("rewards/accuracies")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=48, help="training preference pairs")
    parser.add_argument("--n-test", type=int, default=24, help="held-out preference pairs")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic rows (same for all arms)")
    # tunery's defaults for everything the two scripts must share
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-plus-arm", action="store_true", help="skip the loraplus_lr_ratio=16 arm")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms: dict[str, dict | None] = {"plain": None, "tunery": {}}
    if not args.no_plus_arm:
        arms["tunery-plus16"] = {"loraplus_lr_ratio": 16}
    from tunery.models.resolve import resolve_base

    base_dir = str(resolve_base(args.base).path)
    train_rows, test_rows = preference_rows(args.data_seed, args.n_train, args.n_test)
    started = time.time()
    print(f"machine: {cpu_flags()}; {args.base}, {len(train_rows)} train / {len(test_rows)} held-out pairs, "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, beta {args.beta}, seeds {seeds}", flush=True)
    base_scores = score_base(args.base, test_rows)
    print(f"base           preference_rate {base_scores['preference_rate']:.3f}  "
          f"logp_margin {base_scores['logp_margin']:+.3f}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        for name, extra in arms.items():
            r = (run_plain(args.base, base_dir, train_rows, test_rows, args, seed) if extra is None
                 else run_tunery(args.base, train_rows, test_rows, args, seed, extra))
            r["seed"] = seed
            runs[name].append(r)
            print(f"seed {seed}  {name:12} preference_rate {r['preference_rate']:.3f}  "
                  f"logp_margin {r['logp_margin']:+.3f}  logp preferred {r['logp_preferred']:+.2f}  "
                  f"non-preferred {r['logp_non_preferred']:+.2f}  {r['steps']} steps  "
                  f"train {r['train_runtime_s']:.1f}s  wall {r['wall_s']:.1f}s", flush=True)

    print("\nheld-out (mean ± standard deviation over seeds; difference = arm − plain, paired by seed)")
    print(f"{'base':12} preference_rate {base_scores['preference_rate']:.3f}  logp_margin "
          f"{base_scores['logp_margin']:+.3f}  logp preferred {base_scores['logp_preferred']:+.2f}")
    table: dict[str, dict] = {"base": base_scores}
    for name in arms:
        rate = [r["preference_rate"] for r in runs[name]]
        margin = [r["logp_margin"] for r in runs[name]]
        pref = [r["logp_preferred"] for r in runs[name]]
        table[name] = {"preference_rate": rate, "logp_margin": margin, "logp_preferred": pref}
        line = (f"{name:12} preference_rate {summary(rate, '+')}  logp_margin {summary(margin, '+')}  "
                f"logp preferred {summary(pref, '+')}")
        if name != "plain":
            d_rate = [a - b for a, b in zip(rate, table["plain"]["preference_rate"], strict=True)]
            d_margin = [a - b for a, b in zip(margin, table["plain"]["logp_margin"], strict=True)]
            ratio = statistics.mean(margin) / statistics.mean(table["plain"]["logp_margin"]) \
                if statistics.mean(table["plain"]["logp_margin"]) else float("nan")
            line += (f"\n{'':12} difference: preference_rate {summary(d_rate, '+')}  logp_margin {summary(d_margin, '+')}  "
                     f"margin {ratio:.2f}× plain's")
        print(line)
    total = time.time() - started
    print(f"\ntotal {total / 60:.1f} min")
    append_result({
        "benchmark": "dpo_quality", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "label": args.label, "base": args.base, "settings": vars(args),
        "arms": arms, "machine": machine(), "versions": {**versions(), "trl": _trl_version()},
        "table": table, "runs": runs, "total_s": round(total, 1),
    })


def _trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    main()
