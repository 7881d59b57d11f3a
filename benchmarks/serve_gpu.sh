#!/usr/bin/env bash
# Serving benchmark on one GPU, as a user runs it: `autoglm-trt serve` on a checkpoint, then
# `autoglm-trt bench` over the OpenAI streaming API, with 467-in / 256-out text prompts and with a
# 1080x2400 phone screenshot (a distinct copy per request, so every one is a cold image + prefill).
#   benchmarks/serve_gpu.sh MODEL_DIR OUT_DIR [extra serve options...]
# Writes OUT_DIR/serve.log, text.json, image.json (and throughput.json). Environment: TEXT_LEVELS, IMAGE_LEVELS
# (comma-separated client counts), MAX_SECONDS (per text level), NUM_REQUESTS (per text level; default 4 x clients),
# NOLP_LEVELS (text levels run again without logprobs, as a throughput client asks: greedy requests without
# logprobs decode several steps per GPU window; empty: none), NOLP_SECONDS and NOLP_REQUESTS (per such level).
# The text and image levels ask for logprobs so that every token arrives in a chunk of its own (TTFT, ITL).
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
cli=(python -m autoglm_trt.cli)
"${cli[@]}" serve "$model" --device cuda --port 8000 --grpc-port -1 "$@" >"$out/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 900); do
  if python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 "$pid" 2>/dev/null || { tail -40 "$out/serve.log"; exit 1; }
  sleep 1
done
python -c "from autoglm_trt.calibration.screens import draw_screen; draw_screen('chat', 1, (1080, 2400)).save('/tmp/shot.png')"
"${cli[@]}" bench http://127.0.0.1:8000 --concurrency "${TEXT_LEVELS:-1,8,32,128}" --prompt-len 467 --gen-len 256 \
  --logprobs --max-seconds "${MAX_SECONDS:-60}" ${NUM_REQUESTS:+--num-requests "$NUM_REQUESTS"} --json "$out/text.json"
"${cli[@]}" bench http://127.0.0.1:8000 --concurrency "${IMAGE_LEVELS:-1,8}" --prompt-len 467 --gen-len 256 \
  --logprobs --image /tmp/shot.png --unique-images --num-requests 8 --json "$out/image.json"
if [ -n "${NOLP_LEVELS:-}" ]; then
  "${cli[@]}" bench http://127.0.0.1:8000 --concurrency "$NOLP_LEVELS" --prompt-len 467 --gen-len 256 \
    --max-seconds "${NOLP_SECONDS:-${MAX_SECONDS:-60}}" ${NOLP_REQUESTS:+--num-requests "$NOLP_REQUESTS"} \
    --json "$out/throughput.json"
fi
grep -E "ready|KV|captured|listening" "$out/serve.log" | head -20 || true
