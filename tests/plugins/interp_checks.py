"""Run the Triton kernels under the Triton interpreter on CPU tensors and print one JSON line per
case: {"name", "err", "tol", "seconds"}. Run as a script (test_triton_interp.py does so in a
subprocess, because TRITON_INTERPRET must be set before triton is first imported)."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import plugin_cases  # noqa: E402
from autoglm_trt.plugins import reference, triton_attention, triton_norm  # noqa: E402

_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def main(names: list[str]) -> int:
    torch.manual_seed(0)
    for name, check, kwargs in plugin_cases.small_cases():
        if names and not any(n in name for n in names):
            continue
        mod = triton_norm if check == "norms" else triton_attention
        # NOTE: attention stays float32 here: the interpreter's tl.dot on bf16 operands is wrong
        # (errors ~1e10 even for the unchanged direct path); the GPU tests cover bf16.
        for dtype in (torch.float32, torch.bfloat16) if check == "norms" else (torch.float32,):
            t0 = time.perf_counter()
            err = plugin_cases.CHECKS[check](mod, reference, device="cpu", dtype=dtype, **kwargs)
            row = {"name": f"{name}-{str(dtype)[6:]}", "err": err, "tol": _TOL[dtype],
                   "seconds": round(time.perf_counter() - t0, 3)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
