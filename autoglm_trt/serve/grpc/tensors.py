"""KServe v2 tensors <-> numpy: typed `contents` or little-endian `raw_*_contents` (what
tritonclient sends); BYTES elements are 4-byte little-endian length + bytes in raw form."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from autoglm_trt.serve.errors import ServeError

DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _bad(message: str) -> ServeError:
    return ServeError(message, status=400)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("malformed BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad("malformed BYTES tensor: element longer than the data")
        items.append(raw[pos:pos + n])
        pos += n
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


MAX_DIMS = 8  # NOTE: every tensor of this model has 1-3; numpy itself stops at 64
MAX_ELEMENTS = 1 << 26  # a 64 MiB message holds fewer elements than this


def _shape(tensor: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS:
        raise _bad(f"input {tensor.name}: {len(shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise _bad(f"input {tensor.name}: negative dimension in shape {list(shape)}")
    if math.prod(shape) > MAX_ELEMENTS:  # NOTE: Python ints, so a product of huge dims cannot overflow
        raise _bad(f"input {tensor.name}: shape {list(shape)} has more elements than any request can carry")
    return shape


def _decode(tensor: Any, raw: bytes | None) -> np.ndarray:
    dtype, shape = tensor.datatype, _shape(tensor)
    if dtype not in DTYPES and dtype != "BYTES":
        raise _bad(f"input {tensor.name}: unsupported datatype {dtype}")
    if raw is not None:
        if dtype == "BYTES":
            values: Any = deserialize_bytes(raw)
        else:
            np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
            if len(raw) % np_dtype.itemsize:
                raise _bad(f"input {tensor.name}: {len(raw)} raw bytes is not a whole number of {dtype}")
            values = np.frombuffer(raw, dtype=np_dtype)
    else:
        if dtype not in _CONTENTS_FIELD:
            raise _bad(f"input {tensor.name}: {dtype} must be sent in raw_input_contents")
        values = list(getattr(tensor.contents, _CONTENTS_FIELD[dtype]))
    try:
        arr = np.array(values, dtype=object if dtype == "BYTES" else DTYPES[dtype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"input {tensor.name}: values do not fit {dtype} ({exc})") from None
    if arr.size != math.prod(shape):
        raise _bad(f"input {tensor.name}: shape {list(shape)} needs {math.prod(shape)} elements, got {arr.size}")
    return arr.reshape(shape)


def input_arrays(request: Any) -> dict[str, np.ndarray]:
    """{input name: array} of a ModelInferRequest."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise _bad(f"input {tensor.name} given twice")
        out[tensor.name] = _decode(tensor, raw[i] if raw else None)
    return out


def add_output(response: Any, name: str, array: np.ndarray, datatype: str) -> None:
    """Append one output tensor to a ModelInferResponse (raw little-endian contents)."""
    out = response.outputs.add()
    out.name, out.datatype = name, datatype
    out.shape.extend(int(d) for d in array.shape)
    if datatype == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]
        response.raw_output_contents.append(serialize_bytes(items))
    else:
        np_dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=np_dtype).tobytes())
