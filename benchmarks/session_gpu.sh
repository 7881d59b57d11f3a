#!/usr/bin/env bash
# One lent-GPU call that does several measurements in order, each under its own time limit, writing logs and JSON
# to OUT_DIR (what finished comes back even when a later part runs out of time).
#   benchmarks/session_gpu.sh OUT_DIR PART[,PART...]
# Parts (run in this order, tests last):
#   tests       the GPU-marked tests of the engine, the INT4 kernels and the grammar bitmask kernel
#   decode      bench_decode.py, bf16, batch 1 and 64, this tree                       -> decode_new.json
#   decode_old  the same from OLD_TREE (a copy of an earlier commit's autoglm_trt/ and benchmarks/,
#               e.g. `git archive COMMIT autoglm_trt benchmarks | tar -x -C .old`)     -> decode_old.json
#   int4        bench_decode.py --quant int4-awq, batch 1, 8, 32                      -> decode_int4.json
#   int8 / fp8  the same with --quant int8-wo / fp8                                    -> decode_{int8,fp8}.json
#   kernels     bench_int4.py (INT4 GEMV/GEMM candidates vs cuBLAS and the bandwidth floor) -> bench_int4.json
#   verify      bench_verify.py: one step of 1..16 query tokens per row at batch 1 and 8 -> verify.json
#   structured  bench_structured_gpu.py: JSON-schema constrained vs free rows at batch 1 and 32 -> structured.json
#   agent       agent_gpu.py: serve + the agent workload (AGENT_QUANTS, AGENT_SPEC, the old tree too) -> agent_gpu.json
# The phone-9b random checkpoint is written to /tmp/phone-9b first (27 s on an H100) when a part needs it.
set -uo pipefail
out=$1 parts=,$2,
old=${OLD_TREE:-.old}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
t0=$(date +%s)
say() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
has() { [[ $parts == *,$1,* ]]; }
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
if has decode || has decode_old || has int4 || has int8 || has fp8 || has verify || has agent || has structured; then
  say "init-random phone-9b"
  timeout 150 python -m autoglm_trt.cli init-random /tmp/phone-9b --preset phone-9b --device cuda >/dev/null
fi
decode() {  # name, extra args...
  local name=$1; shift
  say "bench_decode $name"
  timeout "${DECODE_S:-150}" python benchmarks/bench_decode.py --model-dir /tmp/phone-9b --hf-batch-sizes '' \
    --json "$out/decode_$name.json" "$@" 2>&1 | grep -v "━" | tail -40
}
has decode && decode new --batch-sizes 1,64
if has decode_old; then
  say "bench_decode old ($old)"
  (cd "$old" && PYTHONPATH=$PWD:/tmp/site timeout "${DECODE_S:-150}" python benchmarks/bench_decode.py \
    --model-dir /tmp/phone-9b --batch-sizes 1,64 --hf-batch-sizes '' --json "$out/decode_old.json" 2>&1 | tail -8)
fi
has int4 && decode int4 --quant int4-awq --batch-sizes 1,8,32
has int8 && decode int8 --quant int8-wo --batch-sizes 1,8,32
has fp8 && decode fp8 --quant fp8 --batch-sizes 1,8,32
if has kernels; then
  say "bench_int4"
  timeout "${KERNELS_S:-200}" python benchmarks/bench_int4.py --budget-s "${KERNELS_BUDGET_S:-150}" \
    --json "$out/bench_int4.json" 2>&1 | tail -40
fi
if has verify; then
  say "bench_verify"
  timeout "${VERIFY_S:-150}" python benchmarks/bench_verify.py --model-dir /tmp/phone-9b --json "$out/verify.json" 2>&1 | tail -20
fi
if has structured; then
  say "bench_structured_gpu"
  timeout "${STRUCTURED_S:-150}" python benchmarks/bench_structured_gpu.py --model-dir /tmp/phone-9b \
    --json "$out/structured.json" 2>&1 | grep -v "━" | tail -12
fi
if has agent; then
  say "agent_gpu"
  timeout "${AGENT_S:-300}" python benchmarks/agent_gpu.py --out "$out" --quants "${AGENT_QUANTS:-fp8}" \
    --spec "${AGENT_SPEC:-off,ngram}" ${AGENT_OLD:+--old-tree "$old"} --budget-s "$(( ${AGENT_S:-300} - 15 ))" 2>&1 | tail -25
fi
if has tests; then
  say "GPU tests"
  timeout "${TESTS_S:-150}" python -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests/engine tests/plugins/test_int4_gemm.py \
    tests/plugins/test_bitmask.py} 2>&1 | tail -25 | tee "$out/gpu_tests.log"
fi
say "done"
