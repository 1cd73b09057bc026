"""Inference speed: tunery's Predictor against plain `model.generate` on the same model.

    python benchmarks/predict_speed.py           # SmolLM2-135M
    python benchmarks/predict_speed.py --quick   # a tiny random Llama

Measures tokens/s of greedy generation and time to first token for both, and the cost of
switching between two LoRA adapters with the base kept loaded (tunery) against loading the
adapter onto the base for each request (what a plain script does). Appends to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402
from train_speed import tiny_base  # noqa: E402

PROMPT = ("Extract the booking as name | party size | day | time.\n"
          "Message: Hi, this is Maria Lopez. Could I book a table for four on Friday at 7pm?\nBooking:")


def make_adapters(base_path: str, folder: Path, n: int = 2) -> list[Path]:
    """n random (non-identity) LoRA adapters for the base, saved as run-like adapter folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base_path)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False))
        path = folder / f"adapter{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="the Predictor's precision (plain generate: fp32)")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.infer.predict import Predictor, SamplingParams
    from tunery.models.resolve import resolve_base

    work = Path(tempfile.mkdtemp())
    base = tiny_base(work / "tiny") if args.quick else args.base
    base_path = resolve_base(base).path
    adapters = make_adapters(base_path, work)
    n = args.new_tokens

    # -- plain transformers ------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    ids = tok(PROMPT, return_tensors="pt")
    gen = {"do_sample": False, "pad_token_id": tok.eos_token_id, "eos_token_id": None}

    def plain(k):
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=k, min_new_tokens=k, **gen)

    plain(2)  # warm-up
    plain_ttft = statistics.median(timed(lambda: plain(1), args.repeat))
    plain_total = statistics.median(timed(lambda: plain(n), args.repeat))

    def plain_switch(path):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(path))
        with torch.no_grad():
            peft_model.generate(**ids, max_new_tokens=1, **gen)

    plain_switch_s = statistics.median(timed(lambda: plain_switch(adapters[0]), args.repeat))

    # -- tunery ------------------------------------------------------------------------------
    from tunery.models.precision import resolve_precision

    predictor = Predictor(base, precision=args.precision)
    chosen = resolve_precision(args.precision, predictor.device)
    print(f"machine: {cpu_flags()}; tunery predicts in {chosen.name} ({chosen.reason})")
    params = SamplingParams(temperature=0, max_new_tokens=n)

    def first_piece(weights=None):
        start = time.perf_counter()
        stream = predictor.stream(PROMPT, weights=weights, params=SamplingParams(temperature=0, max_new_tokens=2))
        next(iter(stream))
        elapsed = time.perf_counter() - start
        for _ in stream:
            pass
        return elapsed

    first_piece()  # warm-up
    ttft = statistics.median(first_piece() for _ in range(args.repeat))
    rates = []
    for _ in range(args.repeat):
        metrics: dict = {}
        predictor.generate(PROMPT, params=params, metrics=metrics)
        rates.append(metrics.get("tokens_per_second") or 0.0)
    for a in adapters:  # load both once
        first_piece(str(a))
    switches = [first_piece(str(adapters[i % 2])) for i in range(2 * args.repeat)]
    switch_s = statistics.median(switches) - ttft

    result = {
        "plain": {"tokens_per_second": n / plain_total, "time_to_first_token_s": plain_ttft,
                  "adapter_load_per_request_s": plain_switch_s},
        "tunery": {"tokens_per_second": statistics.median(rates), "time_to_first_token_s": ttft,
                   "adapter_switch_s": max(0.0, switch_s), "base_loads": predictor.base_loads,
                   "adapter_loads": predictor.adapter_loads},
    }
    p, t = result["plain"], result["tunery"]
    print(f"plain generate: {p['tokens_per_second']:.1f} tok/s, first token {p['time_to_first_token_s'] * 1000:.0f} ms, "
          f"load adapter per request {p['adapter_load_per_request_s'] * 1000:.0f} ms")
    print(f"tunery        : {t['tokens_per_second']:.1f} tok/s, first token {t['time_to_first_token_s'] * 1000:.0f} ms, "
          f"adapter switch {t['adapter_switch_s'] * 1000:.1f} ms (base loaded {t['base_loads']}x, "
          f"adapters loaded {t['adapter_loads']}x for {2 * args.repeat + 2} adapter requests)")
    print(f"ratio tunery/plain: {t['tokens_per_second'] / p['tokens_per_second']:.2f}x tokens/s, "
          f"{t['time_to_first_token_s'] / p['time_to_first_token_s']:.2f}x first-token latency")
    append_result({"benchmark": "predict_speed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "commit": git_commit(), "quick": args.quick, "base": args.base, "new_tokens": n,
                   "precision": chosen.name,
                   "machine": machine(), "versions": versions(), **result})
    json.dumps(result)


if __name__ == "__main__":
    main()
