"""Compile the Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

triton.compile with an explicit GPUTarget runs the whole pipeline (TTIR -> TTGIR -> PTX -> cubin,
with the ptxas bundled in the triton wheel), so compile errors, register spills and shared-memory
use show up before any GPU time is spent. Prints one JSON line per kernel variant:
{"name", "ok", "regs", "stack", "smem", "mma", "error"}. Pointer and stride arguments get the
divisibility-by-16 hint that the runtime gives them for real tensors (so vector widths match).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from autoglm_trt.plugins import triton_attention as ta
from autoglm_trt.plugins import triton_norm as tn

TARGET = GPUTarget("cuda", 90, 32)
NOT_ALIGNED = {"num_splits", "cnt_stride", "stride_bt"}  # runtime values, not multiples of 16


def _signature(fn, dtype: str, consts: dict, ptr_types: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in NOT_ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _resources(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def build(name: str, fn, dtype: str, consts: dict, warps: int, stages: int,
          ptr_types: dict | None = None) -> dict:
    sig, attrs = _signature(fn, dtype, consts, ptr_types or {})
    try:
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                                options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:  # noqa: BLE001 - report any compiler failure as a row
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}
    regs, stack = _resources(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
    return {"name": name, "ok": True, "regs": regs, "stack": stack,
            "smem": kernel.metadata.shared, "mma": mma}


def variants(quick: bool = False) -> list[dict]:
    """All kernel variants; quick: bf16 only, block sizes 16 and 128 (for the test suite)."""
    rows = []
    part = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "cnt_ptr": "*i32",
            "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "cu_q_ptr": "*i32"}
    dtypes = (("bf16", 2),) if quick else (("bf16", 2), ("fp16", 2), ("fp32", 4))
    for dtype, esize in dtypes:
        consts = dict(GROUP=16, HEAD_DIM=128, BLOCK_N=ta._DECODE_BLOCK_N[esize], MIN_SPLIT=ta._DECODE_BLOCK_N[esize],
                      BLOCK_S=64, BLOCK_D=128)
        rows.append(build(f"decode_reduce-{dtype}", ta._decode_reduce_kernel, dtype, consts, 8, 1, part))
        for page in (16, 128) if quick else (16, 32, 64, 128):
            tile = ta._DECODE_BLOCK_N[esize]
            for direct, separate in ((False, False), (True, False), (False, True)):
                consts = dict(GROUP=16, HEAD_DIM=128, PAGE=page, BLOCK_G=16, BLOCK_D=128,
                              BLOCK_N=tile, FAN=ta._MERGE_FAN, DIRECT=direct, IEEE=dtype == "fp32",
                              MIN_SPLIT=tile, SEPARATE=separate)
                rows.append(build(f"decode-{dtype}-p{page}-direct{int(direct)}-separate{int(separate)}",
                                  ta._decode_split_kernel, dtype, consts,
                                  ta._decode_warps(esize), 2, part))
            block_m, block_n, warps, stages = ta._prefill_config(128, 16, esize)
            consts = dict(GROUP=16, HEAD_DIM=128, PAGE=page, Q_TOKENS=block_m // 16,
                          BLOCK_M=block_m, BLOCK_D=128, BLOCK_N=block_n, IEEE=dtype == "fp32")
            rows.append(build(f"prefill-{dtype}-p{page}", ta._prefill_kernel, dtype, consts,
                              warps, stages, part))
    consts = dict(KV_HEADS=2, HEAD_DIM=128, PAGE=16, BLOCK_H=2, BLOCK_D=128)
    rows.append(build("store_kv-bf16", ta._store_kv_kernel, "bf16", consts, 4, 1,
                      {"slot_ptr": "*i64"}))
    for hidden in (64, 1536, 4096, 8192):
        block, warps = tn._launch_config(hidden)
        rows.append(build(f"rms_norm-bf16-{hidden}", tn._rms_norm_kernel, "bf16", dict(BLOCK=block), warps, 1))
        for norm_a in (True, False):
            rows.append(build(f"{'norm_' if norm_a else ''}add_norm-bf16-{hidden}", tn._norm_add_norm_kernel, "bf16",
                              dict(BLOCK=block, NORM_A=norm_a), warps, 1))
    return rows


if __name__ == "__main__":
    for row in variants(quick="--quick" in sys.argv):
        print(json.dumps(row), flush=True)
    sys.exit(0)
