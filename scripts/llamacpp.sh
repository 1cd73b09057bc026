#!/usr/bin/env bash
# Build llama.cpp's Python binding (llama-cpp-python, from its PyPI source release, which vendors
# llama.cpp) into tunery's environment, so that exported GGUF files are read back by llama.cpp
# itself (export/gguf_check.py) — the runtime Ollama and LM Studio embed.
#
#   scripts/llamacpp.sh [python]     # default: .venv/bin/python; about 4 minutes on 2 cores
#
# The build targets AVX2 (x86-64-v3) rather than the build machine's every instruction: ggml's
# AMX kernels crash where the kernel does not grant AMX tile state (virtual machines, sandboxes),
# and a check needs the same results on every machine rather than the fastest kernels. OpenMP is
# off so its runtime does not meet torch's in one process. pip keeps the built wheel in its cache,
# so a second run on the same machine installs in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
version="0.3.36"
if "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  echo "llamacpp: llama-cpp-python $version already installed" >&2
  exit 0
fi
args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
args="$args -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_OPENMP=OFF"
args="$args -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
args="$args -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
if [ "$(uname -m)" != "x86_64" ]; then
  args="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
fi
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$py" -m pip install --disable-pip-version-check -q --no-binary llama-cpp-python "llama-cpp-python==$version" >&2
echo "llamacpp: built llama-cpp-python $("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')" >&2
