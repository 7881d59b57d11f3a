"""torch.onnx.export (TorchScript exporter) into one `model.onnx`, with external data past 2 GB.

The TorchScript exporter writes models over the protobuf limit as one file per initializer; those are
streamed into a single `model.onnx.data` (never loading all weights at once), and the result passes
`onnx.checker.check_model(path)`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

_PROTO_LIMIT = 2 << 30  # protobuf's 2 GB message limit
_INLINE_MAX = 1024  # initializers at most this big stay inside model.onnx when data goes external


def export_graph(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """Export `module(*args)` to `path` (+ `path.name + '.data'` when over 2 GB) and check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # NOTE: the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module, args, str(tmp / "model.onnx"), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True)
        consolidate(tmp / "model.onnx", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onnx.checker.check_model(str(path))


def _external_files(model: onnx.ModelProto) -> list[str]:
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out.append({e.key: e.value for e in t.external_data}["location"])
    return out


def consolidate(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; if it uses external data (or is too big), put all of it in `dst.name + '.data'`."""
    model = onnx.load(str(src), load_external_data=False)
    data_name = dst.name + ".data"
    if not _external_files(model) and src.stat().st_size < _PROTO_LIMIT:
        shutil.move(str(src), dst)
        (dst.parent / data_name).unlink(missing_ok=True)
        return
    offset = 0
    with open(dst.parent / data_name, "wb") as out:
        for t in model.graph.initializer:
            blob = _take_bytes(t, src.parent)
            if blob is None:
                continue
            pad = -offset % 64  # NOTE: aligned offsets let runtimes mmap tensors directly
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            _point_to(t, data_name, offset, len(blob))
            offset += len(blob)
    onnx.save_model(model, str(dst))


def _point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def _take_bytes(t: onnx.TensorProto, base: Path) -> bytes | None:
    """The raw bytes of an initializer that should live in the data file (clearing them from the proto)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            blob = f.read(int(info["length"])) if "length" in info else f.read()
        del t.external_data[:]
        return blob
    if t.HasField("raw_data") and len(t.raw_data) > _INLINE_MAX:
        blob = t.raw_data
        t.ClearField("raw_data")
        return blob
    return None


def graph_files(path: Path) -> list[Path]:
    """The files of an exported graph: model.onnx and its data file when there is one."""
    data = path.parent / (path.name + ".data")
    return [path, data] if data.is_file() else [path]
