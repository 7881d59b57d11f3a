"""Stream .safetensors files tensor by tensor, so a 20 GB rank file never sits in memory at once.

Writing: the header (names, dtypes, shapes, offsets) is planned up front from a meta-device model; each
tensor is then written at its offset as soon as it is ready, in any order. The result is a standard
safetensors file (`safetensors.safe_open` reads it).
Reading: one sequential pass with plain reads (no mmap, whose touched pages would count as resident
memory on top of the model), hashing every byte on the way, so verifying the sha256 costs no second read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class SafetensorsWriter:
    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        """specs: name -> (dtype, shape) of every tensor the file will hold (insertion order = layout)."""
        self.path = Path(path)
        self.specs = dict(specs)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        pos = 0
        for name, (dtype, shape) in self.specs.items():
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = pos
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # NOTE: the format pads the header with spaces to 8-byte alignment
        self.data_start = 8 + len(raw)
        self.total_bytes = self.data_start + pos
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self.total_bytes)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{name} was not planned for {self.path.name}")
        if (tensor.dtype, tuple(tensor.shape)) != (spec[0], tuple(spec[1])):
            raise ValueError(f"{name}: planned {spec[0]} {tuple(spec[1])}, got {tensor.dtype} {tuple(tensor.shape)}")
        if name in self._written:
            raise ValueError(f"{name} written twice to {self.path.name}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.seek(self.data_start + self.offsets[name])
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._written.add(name)

    def close(self) -> None:
        self._file.close()
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            raise RuntimeError(f"{self.path.name}: {len(missing)} planned tensors were never written "
                               f"(first: {missing[0]})")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def iter_tensors(path: str | Path, hasher=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, reading each tensor once; `hasher` sees every byte of the file.

    NOTE: hashing runs on a helper thread (hashlib frees the GIL), one tensor behind the reads: loading
    with the sha256 check costs about what loading without it does.
    """
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as f, ThreadPoolExecutor(1) as pool:
        raw_len = f.read(8)
        (n,) = struct.unpack("<Q", raw_len)
        raw = f.read(n)
        hasher.update(raw_len + raw)
        header = json.loads(raw)
        header.pop("__metadata__", None)
        pos, pending = 0, None
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = e["data_offsets"]
            gap = f.read(start - pos) if start > pos else b""
            t = torch.empty(e["shape"], dtype=CODE_DTYPES[e["dtype"]])
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(buf) != end - start:
                raise EOFError(f"{path} is truncated inside {name}")
            if pending is not None:
                pending.result()  # hashes stay in file order: one update at a time
            pending = pool.submit(_update, hasher, gap, buf)
            pos = end
            yield name, t
        if pending is not None:
            pending.result()
        while chunk := f.read(16 << 20):
            hasher.update(chunk)


def _update(hasher, gap: bytes, buf: memoryview) -> None:
    if gap:
        hasher.update(gap)
    hasher.update(buf)
