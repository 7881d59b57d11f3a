"""Checks of plugins/triton_gemv.py, run as a script in a subprocess (test_triton_gemv.py does):

    python tests/plugins/gemv_checks.py interp   # Triton interpreter on CPU tensors vs gemv_reference
    python tests/plugins/gemv_checks.py aot [--all]  # compile for sm_90 without a GPU: spills, layout shuffles

One JSON line per case. interp: {"name", "err", "tol"}; TRITON_INTERPRET=1 must be set before triton is
imported, hence the subprocess. aot: {"name", "regs", "stack", "loop_converts", "error"}: the configs that
gemv_config picks (--all: every sweep candidate), "loop_converts" counting layout conversions inside the K
loop (x and W must share one register layout, or every step goes through shared memory).
"""

from __future__ import annotations

import json
import os
import sys

import torch

MODE = sys.argv[1] if __name__ == "__main__" and len(sys.argv) > 1 else "import"  # the GPU tests import check()
if MODE == "interp":
    os.environ["TRITON_INTERPRET"] = "1"

from autoglm_trt.plugins import triton_gemv as G

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def check(w_dt: str, x_dt: str, m: int, n: int, k: int, bias: bool = False, silu: bool = False,
          cfg: G.GemvConfig | None = None, seed: int = 0, device: str = "cpu") -> float:
    """gemv vs gemv_reference; int8 weights quantized per output channel (amax / 127)."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=g, device=device).to(_DT[x_dt])
    w = torch.randn(n, k, generator=g, device=device) * (0.1 + torch.rand(n, 1, generator=g, device=device))
    scale = None  # NOTE: rows of different ranges, so a wrong per-channel scale shows
    if w_dt == "int8":
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        w = torch.round(w / scale[:, None]).clamp(-127, 127)
    w = w.to(_DT[w_dt])
    b = torch.randn(n, generator=g, device=device).to(_DT[x_dt]) if bias else None
    y = G.gemv(x, w, scale, b, silu_mul=silu, config=cfg)
    assert y.shape == (m, n) and y.dtype == x.dtype
    if m == 0:
        return 0.0
    return rel_err(y, G.gemv_reference(x, w, scale, b, silu_mul=silu))


def interp_cases() -> list[tuple[str, dict, float]]:
    """(name, check kwargs, tolerance). bf16 outputs: the interpreter truncates to bf16 (the GPU rounds)."""
    cases = []
    for w_dt, x_dt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("int8", "fp32"), ("int8", "bf16")):
        tol = 2e-2 if x_dt == "bf16" else 1e-5
        for m in (1, 2, 3, 5):  # BLOCK_M 1, 2, 4, 8 (5 of 8 rows live)
            kw = {"w_dt": w_dt, "x_dt": x_dt, "m": m, "n": 37, "k": 131, "bias": m % 2 == 1, "silu": m >= 3}
            cases.append((f"{w_dt}-x{x_dt}-m{m}-n37-k131-bias{int(kw['bias'])}-silu{int(kw['silu'])}", kw, tol))
    # every kind of config: reductions, pipelining, warps, int8 conversions; K with a ragged last step
    for cfg in (G.GemvConfig(8, 64, 4, 1, "step"), G.GemvConfig(4, 64, 4, 1, "vec"), G.GemvConfig(4, 32, 4, 1, "end"),
                G.GemvConfig(2, 128, 1, 2, "vec"), G.GemvConfig(16, 32, 2, 3, "end"),
                G.GemvConfig(8, 64, 4, 1, "vec", "magic"), G.GemvConfig(8, 64, 4, 1, "vec", "cvt")):
        for m, silu in ((1, False), (3, True)):
            kw = {"w_dt": "int8", "x_dt": "fp32", "m": m, "n": 20, "k": 200, "bias": True, "silu": silu, "cfg": cfg}
            cases.append((f"int8-{cfg.tag}-m{m}-silu{int(silu)}", kw, 1e-5))
    edge = {"n<block_n": {"n": 3, "k": 64}, "k<block_k": {"n": 24, "k": 40}, "k%block_k==0": {"n": 24, "k": 256},
            "m9-two-row-blocks": {"m": 9, "n": 12, "k": 48}, "m0": {"m": 0, "n": 8, "k": 32}}
    for name, shape in edge.items():
        for w_dt in ("fp32", "int8"):
            kw = {"w_dt": w_dt, "x_dt": "fp32", "m": 2, "cfg": G.GemvConfig(8, 128, 4, 1, "vec"), **shape}
            cases.append((f"{w_dt}-{name}", kw, 1e-5))
    return cases


def aot_rows(every: bool) -> list[dict]:
    """Compile gemv's default configs (or every candidate) for sm_90 with the runtime's pointer/stride hints."""
    rows = []
    for bm in (1, 2, 4, 8):
        for kind in ("w16", "int8"):
            for silu in (False, True):
                cfgs = G.candidates(bm, kind, silu) if every else [G.gemv_config(bm, 4096, 13696, _KIND[kind], silu)]
                rows += [_compile(cfg, bm, kind, silu, bias=bm == 1 and not silu) for cfg in cfgs]
    return rows


_KIND = {"w16": torch.bfloat16, "int8": torch.int8}


def _compile(cfg: G.GemvConfig, bm: int, kind: str, silu: bool, bias: bool) -> dict:
    import triton
    from aot_compile import _resources
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    int8, fn = kind == "int8", G._gemv_kernel
    consts = {"HAS_SCALE": int8, "HAS_BIAS": bias, "SILU_MUL": silu, "W_CVT": G.I8_CVT.index(cfg.i8) + 1 if int8 else 0,
              "REDUCE": G.REDUCE.index(cfg.reduce), "BLOCK_M": bm, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
              "VEC": 16 if int8 else 8, "NUM_STAGES": cfg.num_stages, **({"M": 1} if bm == 1 else {})}
    ptrs = {"w_ptr": "*i8" if int8 else "*bf16", "s_ptr": "*fp32"}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "*bf16") if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts and a != "M"}
    name = f"{kind}-bm{bm}-{cfg.tag}{'-silu' if silu else ''}{'-bias' if bias else ''}"
    try:
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # noqa: BLE001 - report any compiler failure as a row
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    regs, stack = _resources(kernel.asm["cubin"])
    ttgir = kernel.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):]
    loop = loop[:loop.find("tt.num_stages")]
    return {"name": name, "regs": regs, "stack": stack, "loop_converts": loop.count("convert_layout"), "error": None}


def main() -> int:
    if MODE == "interp":
        for name, kw, tol in interp_cases():
            print(json.dumps({"name": name, "err": check(**kw), "tol": tol}), flush=True)
    elif MODE == "aot":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        for row in aot_rows("--all" in sys.argv):
            print(json.dumps(row), flush=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
