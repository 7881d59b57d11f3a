#!/usr/bin/env bash
# One engine replica on Ray Serve against plain `serve`, one GPU, one after the other on the same machine: TTFT and
# throughput over the OpenAI streaming API with `autoglm-trt bench` (issue 19's target: within 5%).
#   OUT=/path benchmarks/ray_vs_serve_gpu.sh [MODEL_DIR]     (no MODEL_DIR: a random phone-9b checkpoint in /tmp)
# Needs Ray Serve importable: on a machine without PyPI, carry .ray/ from benchmarks/pack_ray_for_device.sh.
# Writes $OUT/ray_vs_serve.json (the comparison), {serve,ray}-{text,image}.json (bench reports) and the server logs.
# Environment: TEXT_LEVELS (default 1,32), MAX_SECONDS (per text level, default 30).
set -euo pipefail
out=${OUT:?set OUT to the output folder}
mkdir -p "$out"
if ! python3 -c "import ray.serve" 2>/dev/null; then
  [ -d .ray ] || { echo "Ray Serve is not importable and there is no .ray/ (benchmarks/pack_ray_for_device.sh)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .ray/*.whl
  tar -xJf .ray/ray-trim.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  export PATH=/tmp/site/bin:$PATH
fi
model=${1:-/tmp/phone9b-random}
[ -e "$model/config.json" ] || python3 -m autoglm_trt.cli init-random "$model" --preset phone-9b --seed 0 >/dev/null
python3 -c "from autoglm_trt.calibration.screens import draw_screen; draw_screen('chat', 1, (1080, 2400)).save('/tmp/shot.png')"

run() {  # run NAME [serve options...]: start, bench text and screenshot requests, stop
  local name=$1 pid
  shift
  python3 -m autoglm_trt.cli serve "$model" --device cuda --port 8000 --grpc-port -1 "$@" >"$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 900); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { tail -40 "$out/$name.log"; exit 1; }
    sleep 1
  done
  python3 -m autoglm_trt.cli bench http://127.0.0.1:8000 --concurrency "${TEXT_LEVELS:-1,32}" --prompt-len 467 \
    --gen-len 256 --logprobs --max-seconds "${MAX_SECONDS:-30}" --json "$out/$name-text.json" >/dev/null
  python3 -m autoglm_trt.cli bench http://127.0.0.1:8000 --concurrency 1 --prompt-len 467 --gen-len 64 --logprobs \
    --image /tmp/shot.png --unique-images --num-requests 8 --json "$out/$name-image.json" >/dev/null
  kill -INT "$pid"
  wait "$pid" || true
}

run serve
run ray --replicas 1
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"target": "one Ray replica within 5% of plain serve (TTFT p50 and output tok/s)", "levels": []}
for kind in ("text", "image"):
    serve = json.loads((out / f"serve-{kind}.json").read_text())["levels"]
    ray = json.loads((out / f"ray-{kind}.json").read_text())["levels"]
    for a, b in zip(serve, ray):
        row = {"workload": kind, "concurrency": a["concurrency"],
               "serve_ttft_p50_ms": a["ttft_p50_ms"], "ray_ttft_p50_ms": b["ttft_p50_ms"],
               "serve_output_tok_s": a["output_tokens_per_s"], "ray_output_tok_s": b["output_tokens_per_s"],
               "serve_itl_p50_ms": a["itl_p50_ms"], "ray_itl_p50_ms": b["itl_p50_ms"],
               "failed": [a["failed"], b["failed"]]}
        row["ttft_ratio"] = round(b["ttft_p50_ms"] / a["ttft_p50_ms"], 4)
        row["throughput_ratio"] = round(b["output_tokens_per_s"] / a["output_tokens_per_s"], 4)
        row["within_5pct"] = row["ttft_ratio"] <= 1.05 and row["throughput_ratio"] >= 0.95
        report["levels"].append(row)
report["all_within_5pct"] = all(r["within_5pct"] for r in report["levels"])
(out / "ray_vs_serve.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
PY
