"""LoRA / QLoRA steps on a Llama-7B-shaped model with random weights: tokens/s and MFU on one GPU.

    python benchmarks/gpu_check.py --variant lora-sdpa           # one variant per process
    python benchmarks/gpu_check.py --config tiny --device cpu --steps 2 --variant lora-sdpa   # smoke run

Variants (`--variant`, each run in its own process by scripts/gpu-check.sh, since Liger patches
transformers' Llama classes for the whole process):

    {lora,qlora}-{sdpa,flash,flex}[-liger]

* sdpa: PyTorch's scaled-dot-product attention; packed rows get transformers' block-diagonal
  mask built from the position ids (no cross-example attention, but the masked blocks still
  cost).
* flash: flash-attention 2's variable-length kernel, which transformers drives from the same
  position ids (each example its own sequence, no wasted blocks). Needs the flash_attn package.
* flex: PyTorch's FlexAttention, with a block-sparse document mask made from the same position
  ids (masked blocks skipped, no extra package; compiled on first use).
* liger: Liger's Triton kernels for RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy
  (the LM head and the loss in chunks, logits never materialised). Needs liger-kernel.

Every step trains one micro batch of `--tokens` tokens: random-token examples of 128–1024
tokens bin-packed by tunery's packer into rows of `--seq` tokens (tunery's Collator: position
ids restart per example). The base is built in bf16 and saved once, then loaded through
tunery's own `load_model` (4-bit NF4 for QLoRA) and `adapt` (LoRA r=16 on every linear layer),
and trained under bf16 autocast with AdamW. MFU counts the model FLOPs of a LoRA step: 4·N per
token for the frozen weights' forward and input-gradient matmuls (no weight gradients) plus
the causal attention of each example (6·Σl²·d per layer), against the GPU's dense bf16 peak.
Each variant also records tunery's peak-memory estimate for the same step (models/memory.py,
what training creation checks against a worker's GPU) beside CUDA's measured peak. One JSON line
per variant goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "tiny": (64, 128, 2, 4, 2, 512),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_base(name: str, folder: Path, device: str) -> Path:
    """A random-weight Llama of `name`'s shape, saved in bf16 (once; reused by later variants)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    hidden, inter, layers, heads, kv, vocab = CONFIGS[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    # A word-level tokenizer of the model's vocabulary: a base needs one to load; steps use random ids.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(folder)
    return folder


def batch_of(tokens: int, seq: int, vocab: int, seed: int):
    """Packed rows of random-token examples (tunery's packer and collator), and each example's length."""
    from tunery.data import Collator, pack
    from tunery.data.tokenize import Example

    rng = random.Random(seed)
    examples, total = [], 0
    while total < tokens:
        n = min(rng.randint(128, 1024), seq, tokens - total)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        examples.append(Example(ids, list(ids)))
        total += n
    rows = pack(examples, seq, seed=seed)
    return Collator(0, packed=True)(rows), [len(e.input_ids) for e in examples]


def run(args) -> dict:
    import torch

    method, attn, *rest = args.variant.split("-")
    liger = "liger" in rest
    attn_impl = {"sdpa": "sdpa", "flash": "flash_attention_2", "flex": "flex_attention"}[attn]
    device = args.device
    record: dict = {"variant": args.variant, "config": args.config, "tokens_per_step": args.tokens, "seq": args.seq}
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    from tunery.models.load import adapt, load_model
    from tunery.models.resolve import resolve_base

    folder = build_base(args.config, Path(args.work) / args.config, device)
    started = time.time()
    model = load_model(resolve_base(str(folder)), precision="bf16", quantize_4bit=method == "qlora",
                       attn_implementation=attn_impl, device=device)
    model.config.use_cache = False
    model = adapt(model, method=method, rank=16, alpha=32, dropout=0.05, target_modules="all-linear",
                  gradient_checkpointing=args.gradient_checkpointing)
    record["load_s"] = round(time.time() - started, 1)
    params = sum(p.numel() for p in model.parameters())
    hidden, _, layers, *_ = CONFIGS[args.config]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device != "cpu")
    vocab = model.config.vocab_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(seed: int) -> tuple[int, int]:
        batch, lengths = batch_of(args.tokens, args.seq, vocab, seed)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(lengths), sum(n * n for n in lengths)

    for i in range(args.warmup):
        step(i)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tokens = squares = 0
    start = time.perf_counter()
    for i in range(args.steps):
        t, s = step(1000 + i)
        tokens, squares = tokens + t, squares + s
    sync()
    elapsed = time.perf_counter() - start
    flops = 4 * params * tokens + 6 * squares * hidden * layers
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    record.update({
        "device": name, "params": params, "tokens_per_s": round(tokens / elapsed, 1),
        "step_s": round(elapsed / args.steps, 3), "model_tflops": round(flops / elapsed / 1e12, 1),
        "mfu": round(flops / elapsed / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None,
    })
    # tunery's own estimate (models/memory.py, what training creation checks against a worker's
    # GPU) for the same step, without the CUDA context that max_memory_allocated does not count.
    from tunery.models.memory import GIB, estimate_training

    padded = int(batch_of(args.tokens, args.seq, vocab, 1000)[0]["input_ids"].numel())
    estimate = estimate_training(folder, method=method, tokens_per_micro_batch=padded,
                                 gradient_checkpointing=args.gradient_checkpointing, weight_bytes=2, compute_bytes=2,
                                 lora_rank=16, lora_dropout=0.05, device=device)
    record["estimate_gb"] = round((estimate.total - estimate.overhead) / GIB, 1)
    record["estimate_parts_gb"] = {k: round(v / GIB, 2) for k, v in estimate.parts().items()}
    if record["peak_memory_gb"]:
        record["measured_over_estimate"] = round(torch.cuda.max_memory_allocated() / (estimate.total - estimate.overhead), 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, help="{lora,qlora}-{sdpa,flash,flex}[-liger]")
    parser.add_argument("--config", default="llama-7b", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per optimizer step")
    parser.add_argument("--seq", type=int, default=4096, help="packed row length")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--work", default="/tmp/tunery-gpu-check")
    parser.add_argument("--out", default="-")
    args = parser.parse_args()
    try:
        record = run(args)
    except Exception as exc:  # one variant failing (a missing package, say) must not hide the others
        record = {"variant": args.variant, "error": f"{type(exc).__name__}: {exc}"[:500]}
    line = json.dumps(record)
    print(line, flush=True)
    if args.out != "-":
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    sys.exit(1 if "error" in record else 0)


if __name__ == "__main__":
    main()
