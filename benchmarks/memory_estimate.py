"""Will it fit? tunery's peak-memory estimate (models/memory.py) against the peak each training
really reached, on the CPU: the growth of the process's peak RSS over what it held before the
training (imports done), for SmolLM2-135M at 4 sequences of 512 tokens a micro batch.

    python benchmarks/memory_estimate.py            # lora, lora + gradient checkpointing, full, qlora
    python benchmarks/memory_estimate.py --quick    # lora and full only

Each configuration runs two optimizer steps in its own process (so its peak is its own). The CPU's
flags come first; the ratio estimate / measured is printed per configuration, and results are
appended to results.jsonl. The RSS includes what the estimate leaves out on purpose (the data,
the tokenizer, the safetensors file's mapped pages while the weights load), so a ratio a little
under 1 is expected; far from 1 in either direction means a part is mis-modelled.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, run_child, versions  # noqa: E402

CONFIGS = {
    "lora": {"peft_method": "lora"},
    "lora+checkpointing": {"peft_method": "lora", "gradient_checkpointing": True},
    "full": {"peft_method": "full"},
    "qlora": {"peft_method": "qlora"},
}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child(name: str, base: str) -> None:
    import peft  # noqa: F401  (imported before the baseline: the estimate leaves the libraries out)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import TrainerCallback

    from tunery.train.events import read_events
    from tunery.train.recipe import train

    loaded: dict[str, int] = {}

    class AtStart(TrainerCallback):
        """The RSS once the model is loaded and adapted, before the first step, and the peak so far."""

        def on_train_begin(self, args, state, control, **kwargs):
            loaded["rss"] = rss()
            loaded["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps({"text": f"row {i}: " + "the quick brown fox jumps over the lazy dog " * 60})
                                + "\n" for i in range(16)))
        spec = {"train_data": str(data), "max_steps": 2, "micro_batch_size": 4, "train_batch_size": 4,
                "max_seq_length": 512, "chunk_size": 512, "run_validation": False, "save_steps": 1000,
                **CONFIGS[name]}
        before = rss()
        train(spec, base=base, output_dir=Path(tmp) / "run", progress=False, callbacks=[AtStart()])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = next(e for e in read_events(Path(tmp) / "run" / "events.jsonl") if e["type"] == "memory")
    print(json.dumps({"config": name, "estimate": {k: memory[k] for k in ("weights", "trainable", "activations",
                      "logits", "total")}, "measured": peak - before, "rss_before": before,
                      "loaded": loaded["rss"] - before, "peak_while_loading": loaded["peak"] - before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base)
        return
    print(f"machine: {cpu_flags()}")
    names = ["lora", "full"] if args.quick else list(CONFIGS)
    rows = []
    for name in names:
        got = run_child(Path(__file__), ["--child", name, "--base", args.base])
        est, measured = got["estimate"], got["measured"]
        rows.append(got)
        print(f"{name:20s} estimate {est['total'] / 2**20:8.0f} MiB (weights {est['weights'] / 2**20:.0f}, "
              f"optimizer {est['trainable'] / 2**20:.0f}, activations {est['activations'] / 2**20:.0f}, "
              f"logits {est['logits'] / 2**20:.0f})   measured peak growth {measured / 2**20:8.0f} MiB   "
              f"estimate / measured {est['total'] / measured:.2f}   (held before the first step "
              f"{got['loaded'] / 2**20:.0f} MiB, peak while loading {got['peak_while_loading'] / 2**20:.0f} MiB)",
              flush=True)
    append_result({"benchmark": "memory_estimate", "base": args.base, "machine": machine(), "versions": versions(),
                   "commit": git_commit(), "results": rows})


if __name__ == "__main__":
    main()
