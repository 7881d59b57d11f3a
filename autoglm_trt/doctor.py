"""`autoglm-trt doctor`: what this machine offers the toolkit, the first thing to run when something fails."""

from __future__ import annotations

import importlib
import platform
import sys

from rich.console import Console
from rich.table import Table


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding, not a crash
        return f"not importable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "installed"))


def _cuda_rows() -> list[tuple[str, str]]:
    import torch

    if not torch.cuda.is_available():
        return [("CUDA", "no CUDA device: the engine runs on the CPU (slow, for tests and demos)")]
    rows = [("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        rows.append((f"  cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                    f"{free / 2**30:.1f} / {total / 2**30:.1f} GiB free"))
    if torch.cuda.device_count() > 1:
        peer = torch.cuda.can_device_access_peer(0, 1)
        rows.append(("  peer access 0<->1", "yes (NVLink/PCIe P2P: custom all-reduce usable)" if peer else "no"))
    return rows


def _onnxruntime_row() -> tuple[str, str]:
    try:
        import onnxruntime as ort
    except Exception as exc:  # noqa: BLE001
        return ("onnxruntime", f"not importable ({type(exc).__name__})")
    return ("onnxruntime", f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")


def _tensorrt_row() -> tuple[str, str]:
    version = _version("tensorrt")
    if version.startswith("not importable"):
        return ("tensorrt", f"{version}: `build --backend tensorrt` is unavailable; the torch backend is used")
    return ("tensorrt", version)


def run_doctor() -> None:
    import torch

    table = Table(title="autoglm-trt doctor", show_header=False)
    from autoglm_trt import __version__

    rows = [("autoglm-trt", __version__), ("python", f"{sys.version.split()[0]} ({platform.machine()})"),
            ("torch", torch.__version__), *_cuda_rows(), ("triton", _version("triton")),
            _onnxruntime_row(), ("onnx", _version("onnx")), _tensorrt_row(),
            ("cuda-python", _version("cuda.bindings")), ("transformers (tests only)", _version("transformers"))]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
