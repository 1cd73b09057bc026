"""Shared pieces of the benchmarks: the machine's measured matmul throughput, versions, results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tunery.models.precision import cpu_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"


def matmul_gflops(dtype_name: str, n: int = 1024, seconds: float = 2.0, device: str = "cpu") -> float:
    """Measured dense matmul throughput (GFLOP/s) of an n×n @ n×n product, in `dtype_name`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    elapsed = time.perf_counter() - start
    return 2 * n**3 * count / elapsed / 1e9


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    flags = cpu_info()[1]
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx_bf16"] = "amx_bf16" in flags
    info["cpu"] = cpu_flags()
    return info


def cpu_flags() -> str:
    """The CPU's model and the instruction-set flags that decide training speed, for every benchmark's output."""
    model, flags = cpu_info()
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    have = [f for f in wanted if f in flags]
    return (f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}")


def score(model, tokenizer, test_rows: list[dict]) -> dict:
    """The benchmarks' one scorer: greedy generations on prompt/completion test rows, scored by
    tunery.eval (exact match, ROUGE-L) with the completion loss."""
    import contextlib

    from tunery.eval.evaluate import evaluate_model
    from tunery.eval.metrics import exact_match, is_label_like, label_accuracy, rouge

    report = evaluate_model(model, tokenizer, test_rows, "prompt_completion",
                            columns=[("tuned", contextlib.nullcontext)], batch_size=16,
                            n_examples=len(test_rows), progress=False)
    m = report["metrics"]["tuned"]
    # Each test row's own scores, for intervals over the test rows (quality.py's paired bootstrap).
    pairs = [(e["tuned"], e["reference"]) for e in report["examples"]]
    per_row = {"exact_match": [exact_match([p], [r]) for p, r in pairs],
               "rougeL": [rouge([p], [r])["rougeL"] for p, r in pairs]}
    if is_label_like([r for _, r in pairs]):
        per_row["accuracy"] = [label_accuracy([p], [r]) for p, r in pairs]
    # accuracy: label accuracy (case and punctuation aside), where the references are labels
    return {"exact_match": m["exact_match"], "rougeL": m["rougeL"], "loss": m["loss"], "accuracy": m.get("accuracy"),
            "per_row": per_row}


def paired_interval(arm: list[list[float]], plain: list[list[float]], *, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(arm) − mean(plain) over the test rows (a paired bootstrap: the test
    rows resampled, each row's score averaged over the seeds both arms ran). `arm` and `plain`:
    per seed, per test row. It measures what the choice of test rows leaves uncertain, which the
    spread over seeds does not."""
    import random

    rows = len(plain[0])
    diff = [sum(a[i] for a in arm) / len(arm) - sum(p[i] for p in plain) / len(plain) for i in range(rows)]
    rng = random.Random(seed)
    means = sorted(sum(diff[rng.randrange(rows)] for _ in range(rows)) / rows for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def summary(values: list[float], sign: str = "") -> str:
    """mean ± standard deviation of one arm's seeds (`sign` "+" shows the mean's sign, for differences)."""
    import statistics

    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.3f} ± {spread:.3f}"


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def append_result(record: dict) -> None:
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def run_child(script: Path, args: list[str]) -> dict:
    """Run one measured configuration in its own process (so its peak RSS is its own) and return
    the JSON it prints on its last stdout line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{script.name} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
