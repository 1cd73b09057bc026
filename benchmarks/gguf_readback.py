"""GGUF logit error per type and family, in llama.cpp itself and in transformers' GGUF loader.

Each tiny random family of tests/families.py (Llama 2 and 3, Mistral, Qwen2.5 and 3, Gemma 2 and 3,
Phi-3) is written in every GGUF type and read back by both readers of export/gguf_check.py on its
prompts (tolerances lifted, so every number is printed): the largest |logit difference| relative
to the largest logit, and the share of positions whose top token is the original model's. The
transformers reader is the baseline: the two readers read the same bytes, so where their numbers
agree the file is read the same way by the runtime users run and by code that shares nothing with
it. Also printed: the same for files with a deliberate layout error (q/k not permuted, Gemma's
norms without their +1), which the tolerances must reject.

    python benchmarks/gguf_readback.py                  # all families and types (~10 minutes)
    python benchmarks/gguf_readback.py --families llama-3,gemma-2 --quants f32,q8_0,q4_0

llama.cpp's reader needs llama-cpp-python (scripts/llamacpp.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402


def measure(path: Path, folder: Path, reader: str) -> tuple[float, float]:
    from tunery.export.gguf_check import check_gguf

    r = check_gguf(path, folder, reader=reader)
    return r["max_abs_diff"] / r["logit_scale"], r["argmax_agreement"]


def main() -> None:
    import tunery.export.gguf as gguf_export
    from families import FAMILIES, make_family
    from tunery.export.gguf import QUANTS, write_gguf
    from tunery.export.gguf_check import READERS, TOLERANCES, default_reader

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--quants", default=",".join(QUANTS))
    args = parser.parse_args()
    if default_reader() != "llama.cpp":
        raise SystemExit("llama-cpp-python is not installed: run scripts/llamacpp.sh")
    bounds = {k: dict(v) for k, v in TOLERANCES.items()}
    for k in TOLERANCES:  # print every number; the bounds are shown beside them
        TOLERANCES[k] = {"rel": 1e9, "argmax": 0.0}
    print(cpu_flags())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{'family':9} {'quant':5} | {'transformers: diff/scale, top-1':32} | {'llama.cpp: diff/scale, top-1':30} | bound")
        for name in args.families.split(","):
            folder = make_family(name, root / name)
            for quant in args.quants.split(","):
                path = root / f"{name}-{quant}.gguf"
                write_gguf(folder, path, quant=quant)
                got = {reader: measure(path, folder, reader) for reader in READERS}
                t, c = got["transformers"], got["llama.cpp"]
                print(f"{name:9} {quant:5} | {t[0]:10.3g} {t[1]:8.3f}{'':13} | {c[0]:10.3g} {c[1]:8.3f}{'':11} | "
                      f"{bounds[quant]['rel']:g}, {bounds[quant]['argmax']:g}", flush=True)
                rows.append({"family": name, "quant": quant,
                             **{f"{r}_{k}": v for r in READERS for k, v in zip(("rel", "top1"), got[r], strict=True)}})
                path.unlink()
        print("deliberately broken files (llama.cpp):")
        for name, layout, change in (("llama-3", "llama", {"permute": False}), ("gemma-2", "gemma2", {"norm_shift": 0.0})):
            original = gguf_export.LAYOUTS[layout]
            gguf_export.LAYOUTS[layout] = dataclasses.replace(original, **change)
            try:
                for quant in ("f16", "q8_0", "q4_0"):
                    path = root / f"broken-{name}-{quant}.gguf"
                    write_gguf(root / name if (root / name).is_dir() else make_family(name, root / name), path, quant=quant)
                    rel, top1 = measure(path, root / name, "llama.cpp")
                    print(f"{name:9} {quant:5} {change}: {rel:.3g} of scale, top-1 {top1:.3f}", flush=True)
                    rows.append({"family": name, "quant": quant, "broken": str(change), "llama.cpp_rel": rel,
                                 "llama.cpp_top1": top1})
            finally:
                gguf_export.LAYOUTS[layout] = original
    append_result({"benchmark": "gguf_readback", "commit": git_commit(), "machine": machine(),
                   "versions": versions(), "rows": rows})


if __name__ == "__main__":
    main()
