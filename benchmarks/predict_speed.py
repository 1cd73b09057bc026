"""Serving speed: plain `model.generate` one request at a time against tunery's engines under load.

    python benchmarks/predict_speed.py                       # SmolLM2-135M, embedded engine
    python benchmarks/predict_speed.py --vllm-url URL        # the vLLM engine too (scripts/vllm.sh start)
    python benchmarks/predict_speed.py --quick               # a tiny random Llama, short runs

One run, one machine:
1. the baseline: plain transformers `generate` (greedy, the tunery engine's precision), one
   request at a time: tokens/s of one stream;
2. the embedded engine with 1, 4, 8 and 16 requests sent at once, half on the bare base and half
   on two LoRA adapters: aggregate tokens/s (all output tokens over the wall time from the first
   submit to the last token), time to first token p50 / p95, and the ratio to one request alone;
3. the vLLM engine the same way, when a server is given;
4. the API while 8 predictions generate on the embedded engine: p50 / p99 latency of
   `GET /v1/predictions/{id}` and `GET /v1/trainings`.
Every request generates exactly --new-tokens tokens (eos is not a stop here), so the rates compare
like for like. The CPU's flags come first; results are appended to results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402
from train_speed import tiny_base  # noqa: E402

PROMPTS = [
    "Extract the booking as name | party size | day | time.\nMessage: Hi, this is Maria Lopez. "
    "Could I book a table for four on Friday at 7pm?\nBooking:",
    "Summarize the conversation in one sentence.\nA: Are we still on for lunch?\nB: Yes, noon at the cafe.\nSummary:",
    "Classify the support message and extract the order number.\nMessage: My order 48213 never arrived.\nAnswer:",
]


def make_adapters(base_path: str, folder: Path, n: int = 2) -> list[Path]:
    """n random (non-identity) LoRA adapters for the base, saved as peft saves them."""
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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def burst(engine, n: int, adapters: list, new_tokens: int) -> dict:
    """`n` requests at once (half on the base, half on the adapters); aggregate rate and latencies."""
    from tunery.infer.generation import Request, SamplingParams

    weights = [None if i % 2 == 0 or not adapters else adapters[(i // 2) % len(adapters)] for i in range(n)]
    requests = [Request.make(PROMPTS[i % len(PROMPTS)], weights=w,
                             params=SamplingParams(temperature=0, max_new_tokens=new_tokens)) for i, w in enumerate(weights)]
    start = time.perf_counter()
    gens = [engine.submit(r, block=True) for r in requests]
    for g in gens:
        g.text()
    wall = time.perf_counter() - start
    tokens = sum(g.metrics["output_token_count"] for g in gens)
    ttft = [g.metrics["time_to_first_token"] for g in gens if g.metrics["time_to_first_token"] is not None]
    return {"requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_second": tokens / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "stop_reasons": sorted({g.metrics["stop_reason"] for g in gens})}


def sweep(name: str, engine, adapters, levels, new_tokens, repeat) -> list[dict]:
    burst(engine, 2, adapters, 4)  # warm-up: load the base and the adapters
    rows = []
    for n in levels:
        runs = [burst(engine, n, adapters, new_tokens) for _ in range(repeat)]
        best = max(runs, key=lambda r: r["tokens_per_second"])
        rows.append(best)
        print(f"{name:9s} {n:3d} at once: {best['tokens_per_second']:7.1f} tok/s aggregate "
              f"({best['tokens']} tokens in {best['wall_s']:.1f} s), first token p50 {best['ttft_p50_s'] * 1000:6.0f} ms "
              f"p95 {best['ttft_p95_s'] * 1000:6.0f} ms  {best['stop_reasons']}", flush=True)
    alone = rows[0]["tokens_per_second"]
    for row in rows:
        row["vs_one"] = row["tokens_per_second"] / alone
    print(f"{name:9s} aggregate vs one request alone: "
          + ", ".join(f"{r['requests']}: {r['vs_one']:.2f}x" for r in rows), flush=True)
    return rows


def api_latency(base: str, n: int, new_tokens: int) -> dict:
    """p50/p99 of two GETs while `n` predictions generate on the embedded engine behind the API."""
    import httpx
    import uvicorn

    from tunery.server.app import create_app
    from tunery.settings import Settings
    from tunery.store.store import base_version_id

    home = Path(tempfile.mkdtemp())
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(home=home, database_url=f"sqlite:///{home / 'db.sqlite'}", embedded_workers=0,
                        public_url=f"http://127.0.0.1:{port}")
    app = create_app(settings, start_workers=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    store = app.state.store
    store.ensure_base_models([("bench", "benchmark base", base)])
    token = store.create_token("bench")
    latencies: dict[str, list[float]] = {"prediction": [], "trainings": []}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=120) as client:
        body = {"version": base_version_id("bench"), "input": {"prompt": PROMPTS[0], "max_new_tokens": 4}}
        client.post("/v1/predictions", json=body, headers={"Prefer": "wait"})  # load the model first
        body["input"] |= {"max_new_tokens": new_tokens, "temperature": 0}
        ids = [client.post("/v1/predictions", json=body).json()["id"] for _ in range(n)]
        while True:
            t = time.perf_counter()
            status = client.get(f"/v1/predictions/{ids[-1]}").json()["status"]
            latencies["prediction"].append(time.perf_counter() - t)
            t = time.perf_counter()
            client.get("/v1/trainings")
            latencies["trainings"].append(time.perf_counter() - t)
            if status in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.02)
    server.should_exit = True
    thread.join(30)
    out = {k: {"p50_ms": pct(v, 0.5) * 1000, "p99_ms": pct(v, 0.99) * 1000, "samples": len(v)}
           for k, v in latencies.items()}
    for k, v in out.items():
        print(f"API while {n} predictions generate: GET {k:10s} p50 {v['p50_ms']:6.1f} ms  p99 {v['p99_ms']:6.1f} ms "
              f"({v['samples']} requests)", flush=True)
    return out


def in_thread(fn):
    """fn() on a thread that then ends. torch work done in a thread that lives on (here the main
    one, which then waits on the engine) was measured to slow the engine thread's torch work by
    ~20 % on 2 cores (libgomp keeps one OpenMP team per thread); in a server the engine's thread
    is the only one doing torch work, so the benchmark keeps it that way."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="the engine's precision, and the baseline's")
    parser.add_argument("--vllm-url", default=None, help="also measure the vLLM engine on this server")
    parser.add_argument("--skip-api", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.infer.embedded import EmbeddedEngine
    from tunery.models.load import pick_dtype
    from tunery.models.precision import resolve_precision
    from tunery.models.resolve import resolve_base

    work = Path(tempfile.mkdtemp())
    base = tiny_base(work / "tiny") if args.quick else args.base
    base_path = resolve_base(base).path
    adapters = in_thread(lambda: make_adapters(base_path, work))
    n = 8 if args.quick else args.new_tokens
    levels = [int(x) for x in args.levels.split(",")]
    chosen = in_thread(lambda: resolve_precision(args.precision, "cpu"))
    print(f"machine: {cpu_flags()}; engines and baseline run in {chosen.name} ({chosen.reason})", flush=True)

    # -- the baseline: plain generate, one request at a time ---------------------------------------
    tok = AutoTokenizer.from_pretrained(base_path)

    def baseline() -> float:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=pick_dtype(args.precision, "cpu")).eval()
        gen_kwargs = {"do_sample": False, "pad_token_id": tok.eos_token_id, "eos_token_id": None}

        def plain(prompt: str, k: int) -> float:
            ids = tok(prompt, return_tensors="pt")
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=k, min_new_tokens=k, **gen_kwargs)
            return time.perf_counter() - start

        plain(PROMPTS[0], 2)
        return max(n / plain(PROMPTS[i % 3], n) for i in range(3))

    plain_rate = in_thread(baseline)
    print(f"plain generate, one request at a time: {plain_rate:.1f} tok/s", flush=True)

    # -- the embedded engine -------------------------------------------------------------------------
    engine = EmbeddedEngine(base, precision=args.precision, max_batch=max(levels), max_queue=4 * max(levels))
    never = {tok.vocab_size + 10}  # no token stops a request before --new-tokens: like for like
    _no_eos(engine, never)
    embedded = sweep("embedded", engine, [str(a) for a in adapters], levels, n, args.repeat)
    engine.close()
    print(f"embedded, one request vs plain generate: {embedded[0]['tokens_per_second'] / plain_rate:.2f}x", flush=True)

    result = {"plain_tokens_per_second": plain_rate, "embedded": embedded}
    if args.vllm_url:
        from tunery.infer.vllm import VLLMEngine

        vllm = VLLMEngine(base, url=args.vllm_url, max_batch=max(levels), max_queue=4 * max(levels))
        result["vllm"] = sweep("vllm", vllm, [str(a) for a in adapters], levels, n, args.repeat)
        vllm.close()
    if not args.skip_api:
        result["api_latency"] = api_latency(base, 8, n)
    append_result({"benchmark": "predict_speed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "commit": git_commit(), "quick": args.quick, "base": args.base, "new_tokens": n,
                   "precision": chosen.name, "machine": machine(), "versions": versions(), **result})


def _no_eos(engine, never: set[int]) -> None:
    """Make every request of `engine` run to max_new_tokens (benchmark only): eos ids → an id
    that is never sampled."""
    import tunery.infer.embedded as embedded

    embedded.eos_ids = lambda model, tokenizer: set(never)  # type: ignore[assignment]


if __name__ == "__main__":
    main()
