"""GRPO rollouts alone: tunery's embedded engine (tunery.train.grpo.engine_rollouts) against
transformers' `generate` called as TRL's GRPOTrainer calls it (left-padded, model in train mode,
TRL's generation config), on one loaded SmolLM2 + LoRA, the two calls alternated in one process
(ABBA, 3 rounds) at ≤ 32 and ≤ 128 answer tokens. Prints medians, the ratio and the CPU's flags.

    python benchmarks/rollout_sampling.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from rl_quality import rft_rows  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from tunery.infer.embedded import eos_ids  # noqa: E402
from tunery.models.load import load_model, load_tokenizer  # noqa: E402
from tunery.models.resolve import resolve_base  # noqa: E402
from tunery.train.grpo import engine_rollouts  # noqa: E402

print(f"machine: {cpu_flags()}", flush=True)

r = resolve_base("smollm2-135m")
tok = load_tokenizer(r)
m = load_model(r, precision="bf16")
m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
for p in m.parameters():
    if p.requires_grad:
        p.data = p.data.float()
rows, _ = rft_rows(0, 4, 1)
ids = [list(tok.apply_chat_template(x["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) for x in rows]
prompts = [i for i in ids for _ in range(6)]
eos = sorted(eos_ids(m, tok))  # what ends an answer, as the engine and TRL both take it


def hf(length):
    m.train()
    width = max(map(len, prompts))
    x = torch.tensor([[tok.pad_token_id or 0] * (width - len(p)) + p for p in prompts])
    a = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cfg = GenerationConfig(max_new_tokens=length, do_sample=True, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                           temperature=0.7, top_p=1.0, top_k=0, disable_compile=True)
    with torch.no_grad():
        out = m.generate(input_ids=x, attention_mask=a, generation_config=cfg)[:, width:]
    n = 0
    for row in out.tolist():
        k = len(row)
        for j, t in enumerate(row):
            if t in eos:
                k = j + 1
                break
        n += k
    return n


def ours(length):
    m.train()
    return sum(map(len, engine_rollouts(m, tok, prompts, max_new_tokens=length, temperature=0.7, top_p=1.0, top_k=0)))


torch.manual_seed(0)
hf(4)
ours(4)
table = {}
for length in (32, 128):
    t = {"tunery": [], "transformers": []}
    toks = {"tunery": [], "transformers": []}
    for _ in range(3):
        for name, f in (("tunery", ours), ("transformers", hf), ("transformers", hf), ("tunery", ours)):
            s = time.perf_counter()
            n = f(length)
            t[name].append(time.perf_counter() - s)
            toks[name].append(n)
    a, b = statistics.median(t["tunery"]), statistics.median(t["transformers"])
    print(f"≤{length}: tunery {a:.2f}s ({statistics.mean(toks['tunery']):.0f} tok), transformers {b:.2f}s "
          f"({statistics.mean(toks['transformers']):.0f} tok) → {a / b:.2f}×", flush=True)
    table[str(length)] = {"seconds": t, "tokens": toks, "ratio": a / b}
append_result({"benchmark": "rollout_sampling", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "commit": git_commit(), "machine": machine(), "versions": versions(), "table": table})
