"""GRPO rollouts: tunery's embedded serving engine against TRL's own call of transformers'
`generate`, inside real GRPO trainings (method=grpo through tunery.train.recipe.train).

    python benchmarks/grpo_rollouts.py                      # SmolLM2, answers ≤ 32 and ≤ 128 tokens
    python benchmarks/grpo_rollouts.py --lengths 32 --steps 2

Each configuration trains `--steps` optimizer steps (4 prompts × 6 answers a step, the RFT task of
rl_quality.py, T=0.7) once with `rollout_engine=tunery` and once with `transformers`, in ABBA
order (tunery, transformers, transformers, tunery) so drift on the machine falls on both alike.
The time spent sampling is measured around the trainer's `_generate_single_turn` (the rollouts
alone: grading and the optimizer step are the same code either way), beside the grader's time
and the whole step's (the first step's includes the trainer's start).
Prints seconds per step of each, the ratio tunery / transformers, answer tokens per second of
sampling, and the CPU's flags; appends the record to results.jsonl.
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
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402
from rl_quality import GRADER, rft_rows  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Timed:
    """While entered, TuneryGRPOTrainer._generate_single_turn and GraderReward.__call__ are timed:
    seconds sampling, answer tokens made, seconds grading. Leaving restores both methods."""

    def __init__(self):
        self.seconds = self.grading = 0.0
        self.tokens = self.calls = 0

    def __enter__(self) -> Timed:
        from tunery.train.grpo import GraderReward, TuneryGRPOTrainer

        self._originals = (GraderReward.__call__, TuneryGRPOTrainer._generate_single_turn)
        grade, sample = self._originals

        def timed_grade(reward, *args, **kwargs):
            started = time.perf_counter()
            try:
                return grade(reward, *args, **kwargs)
            finally:
                self.grading += time.perf_counter() - started

        def timed_sample(trainer, *args, **kwargs):
            started = time.perf_counter()
            completions, logprobs = sample(trainer, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.tokens += sum(len(c) for c in completions)
            self.calls += 1
            return completions, logprobs

        GraderReward.__call__ = timed_grade  # type: ignore[method-assign]
        TuneryGRPOTrainer._generate_single_turn = timed_sample  # type: ignore[method-assign]
        return self

    def __exit__(self, *_) -> None:
        from tunery.train.grpo import GraderReward, TuneryGRPOTrainer

        GraderReward.__call__, TuneryGRPOTrainer._generate_single_turn = self._originals  # type: ignore[method-assign]


def run(engine: str, length: int, args, rows: list[dict]) -> dict:
    from tunery.train.recipe import train

    work = Path(tempfile.mkdtemp())
    data = work / "rft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = {"train_data": str(data), "method": "grpo", "grader": GRADER, "num_generations": args.generations,
              "micro_batch_size": 8, "max_completion_length": length, "generation_temperature": 0.7,
              "train_batch_size": args.prompts, "max_steps": args.steps, "learning_rate": 3e-4, "seed": 1,
              "run_validation": False, "save_steps": 10**6, "rollout_engine": engine}
    with Timed() as timer:
        result = train(inputs, base=args.base, output_dir=work / "run", progress=False)
    m = result.manifest["metrics"]
    return {"engine": engine, "length": length, "steps": m["steps"], "train_s": round(m["train_runtime_s"], 2),
            "rollout_s": round(timer.seconds, 2), "grading_s": round(timer.grading, 2), "rollout_calls": timer.calls,
            "answer_tokens": timer.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--lengths", default="32,128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    rows, _ = rft_rows(0, 64, 1)
    print(f"machine: {cpu_flags()}; {args.base}, {args.steps} steps × {args.prompts} prompts × {args.generations} "
          f"answers, T=0.7", flush=True)
    runs: list[dict] = []
    table: dict[str, dict] = {}
    for length in (int(x) for x in args.lengths.split(",")):
        got: dict[str, list[dict]] = {"tunery": [], "transformers": []}
        for engine in ("tunery", "transformers", "transformers", "tunery"):
            r = run(engine, length, args, rows)
            runs.append(r)
            got[engine].append(r)
            print(f"≤{length:4} tokens  {engine:12} sampling {r['rollout_s'] / r['steps']:6.2f} s/step  "
                  f"({r['answer_tokens'] / max(r['rollout_s'], 1e-9):6.1f} answer tokens/s)  "
                  f"grading {r['grading_s'] / r['steps']:5.2f} s/step  whole step {r['train_s'] / r['steps']:6.2f} s", flush=True)
        per = {e: statistics.mean(r["rollout_s"] / r["steps"] for r in rs) for e, rs in got.items()}
        whole = {e: statistics.mean(r["train_s"] / r["steps"] for r in rs) for e, rs in got.items()}
        table[str(length)] = {"sampling_s_per_step": per, "step_s": whole,
                              "sampling_ratio": per["tunery"] / per["transformers"],
                              "step_ratio": whole["tunery"] / whole["transformers"]}
        print(f"≤{length:4} tokens  sampling: tunery {per['tunery']:.2f} s, transformers {per['transformers']:.2f} s "
              f"per step → {per['tunery'] / per['transformers']:.2f}×; whole step "
              f"{whole['tunery'] / whole['transformers']:.2f}×", flush=True)
    append_result({"benchmark": "grpo_rollouts", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "commit": git_commit(), "label": args.label, "settings": vars(args), "machine": machine(),
                   "versions": versions(), "table": table, "runs": runs})


if __name__ == "__main__":
    main()
