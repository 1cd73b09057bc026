"""What `precision auto` means on this machine, and why.

On a GPU: bf16 where the GPU supports it, else fp32. On a CPU: bf16 only where the CPU has bf16
instructions (avx512_bf16 or AMX) *and* a short probe at start-up measures bf16 matrix
products clearly faster than fp32 ones — oneDNN runs bf16 on such CPUs at 2–3× the fp32 rate,
while on a CPU without them bf16 is emulated and two orders of magnitude slower. The probe
multiplies matrices of a transformer's shape for about a tenth of a second per dtype, once per
process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

# bf16 must beat fp32 by this much on the probe: below it, the casts autocast adds eat the gain.
MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    reason: str


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and instruction-set flags, from /proc/cpuinfo (empty where it is missing)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", set()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return model, flags


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction-set flags (avx512_bf16, amx_bf16)."""
    flags = cpu_info()[1]
    return sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def _rate(dtype, m: int, k: int, n: int, seconds: float) -> float:
    """Measured GFLOP/s of an (m×k)@(k×n) product."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # first call: oneDNN picks and builds its kernel
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 2:
        a @ b
        count += 1
    return 2 * m * k * n * count / elapsed / 1e9


@functools.lru_cache(maxsize=1)
def cpu_probe(seconds: float = 0.1) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of a 512×1024 @ 1024×1024 product on this CPU: a batch of token
    activations through a projection, the shape of most of a training step's work."""
    import torch

    return _rate(torch.float32, 512, 1024, 1024, seconds), _rate(torch.bfloat16, 512, 1024, 1024, seconds)


@functools.lru_cache(maxsize=8)
def resolve_precision(precision: str, device: str, *, quantized: bool = False) -> Precision:
    """`precision` as it will run on `device`, with the reason for the choice. `quantized` (a
    4-bit QLoRA base) keeps fp32 on a CPU: bitsandbytes' CPU 4-bit kernels are fast only there."""
    if precision != "auto":
        return Precision(precision, "asked for")
    if quantized and not device.startswith("cuda"):
        return Precision("fp32", "auto: a 4-bit (QLoRA) base computes in fp32 on a CPU")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: the GPU supports bf16")
        return Precision("fp32", "auto: the GPU has no bf16")
    flags = cpu_bf16_flags()
    if not flags:
        return Precision("fp32", "auto: this CPU has no bf16 instructions (avx512_bf16, amx_bf16)")
    fp32, bf16 = cpu_probe()
    measured = f"bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} ({bf16 / fp32:.1f}×) on this CPU ({', '.join(flags)})"
    if bf16 >= MIN_SPEEDUP * fp32:
        return Precision("bf16", f"auto: {measured}")
    return Precision("fp32", f"auto: {measured}, under the {MIN_SPEEDUP}× that pays for autocast")
