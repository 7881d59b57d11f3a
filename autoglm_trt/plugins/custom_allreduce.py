"""One-shot all-reduce over NVLink peer memory, for decode-sized messages (8 KB .. 1 MB).

Each rank owns one buffer shared with its peers through CUDA IPC:
    [flags: MAX_PROGRAMS x MAX_WORLD int64 | data half 0 | data half 1]   (each half `capacity` bytes)
One kernel launch does the whole exchange. Program b of every rank
  1. copies its slice of the input into data half (e % 2) of its own buffer,
  2. stores epoch e into flag [b, my rank] of every rank's buffer (release, system scope),
  3. waits until flags [b, *] of its own buffer reach e (acquire, system scope),
  4. sums its slice over all ranks' buffers, in rank order (so every rank gets the same bits).
The epoch e lives in device memory, one counter per program that only that program touches, so a
CUDA-graph replay advances it exactly like an eager call: the kernel is graph safe, and because the
input is staged into the shared buffer inside the kernel, no graph buffers need registering.
Two data halves make reuse safe: a rank rewrites half (e % 2) only at call e + 2, after passing
call e + 1's barrier, which a peer reaches only once its call e has finished (stream order). The
grid is fixed (every program joins every barrier), so all counters advance in lockstep.

NVLink multicast is never used (no cuMulticastCreate): plain peer loads and stores only.
This module imports triton: import it lazily, only on CUDA.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

MAX_WORLD = 8
MAX_PROGRAMS = 64
FLAGS_BYTES = MAX_PROGRAMS * MAX_WORLD * 8  # 4 KB, keeps the data area 16-byte aligned
DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_SPINS = 1 << 26  # polls of a peer's flag before giving up: tens of seconds
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, data_ptr, flags_ptr, deltas_ptr, counter_ptr, err_ptr, n, rank,
                     half_elems, max_spins, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """data_ptr / flags_ptr: this rank's shared buffer; deltas_ptr [WORLD]: peer buffer - own, in bytes.

    A peer that does not signal within max_spins polls (dead or hung) sets err_ptr[0] = 1 and the
    program goes on with whatever is there, so the GPU never hangs; the host reads the flag.

    NOTE: peers are addressed as own pointer + byte delta (a multiple of 256: allocations are
    256-byte aligned), so the compiler keeps the 16-byte vector loads it proves for data_ptr.
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    esize: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
    epoch = tl.load(counter_ptr + pid) + 1  # int64; only this program reads or writes it
    tl.debug_barrier()  # NOTE: every thread has read the old count before one thread stores the new
    tl.store(counter_ptr + pid, epoch)
    half = tl.multiple_of((epoch % 2) * half_elems, 64)
    offs = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n, step):  # 1. stage my slice into my shared buffer
        idx = start + offs
        mask = idx < n
        tl.store(data_ptr + half + idx, tl.load(x_ptr + idx, mask=mask), mask=mask)
    tl.debug_barrier()  # NOTE: every thread's stores come before the release below
    for p in tl.static_range(WORLD):  # 2. tell every rank (me included) that my slice is there
        peer_flags = flags_ptr + tl.multiple_of(tl.load(deltas_ptr + p) // 8, 32)
        tl.atomic_xchg(peer_flags + pid * WORLD + rank, epoch, sem="release", scope="sys")
    for p in tl.static_range(WORLD):  # 3. wait for every rank's slice
        seen = tl.atomic_add(flags_ptr + pid * WORLD + p, 0, sem="acquire", scope="sys")
        spins = 0  # NOTE: uniform over the program (the atomic's value is broadcast), so no divergence
        while seen < epoch:
            seen = tl.atomic_add(flags_ptr + pid * WORLD + p, 0, sem="acquire", scope="sys")
            spins += 1
            if spins > max_spins:
                tl.store(err_ptr, 1)
                seen = epoch
    tl.debug_barrier()
    for start in range(pid * BLOCK, n, step):  # 4. sum the slice in rank order
        idx = start + offs
        mask = idx < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            src = data_ptr + tl.multiple_of(tl.load(deltas_ptr + p) // esize, 64) + half
            acc += tl.load(src + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + idx, acc.to(x_ptr.dtype.element_ty), mask=mask)


# ---- CUDA driver calls through ctypes (libcuda ships with every driver; no extra package) ---------
class _CUipcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # NOTE: not c_char, whose field reads stop at a NUL


class _Driver:
    LAZY_ENABLE_PEER_ACCESS = 0x1

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {result} ({(msg.value or b'?').decode()})")

    def malloc_zeroed(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        self._check(self.lib.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0), ctypes.c_size_t(nbytes)), "cuMemsetD8")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _CUipcMemHandle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(ptr)), "cuIpcGetMemHandle")
        return bytes(handle.reserved)

    def ipc_open(self, raw: bytes) -> int:
        handle, ptr = _CUipcMemHandle(), ctypes.c_uint64()
        ctypes.memmove(ctypes.addressof(handle), raw, 64)
        fn = getattr(self.lib, "cuIpcOpenMemHandle_v2", None) or self.lib.cuIpcOpenMemHandle
        self._check(fn(ctypes.byref(ptr), handle, ctypes.c_uint(self.LAZY_ENABLE_PEER_ACCESS)), "cuIpcOpenMemHandle")
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._check(self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")


def _why_unsupported(world: int, device: torch.device, peers: list[int]) -> str | None:
    if device.type != "cuda":
        return "not on CUDA"
    if not 2 <= world <= MAX_WORLD:
        return f"world size {world} is outside 2..{MAX_WORLD}"
    if os.environ.get("AUTOGLM_TRT_CUSTOM_ALLREDUCE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by AUTOGLM_TRT_CUSTOM_ALLREDUCE=0"
    blocked = [p for p in peers if p != device.index and not torch.cuda.can_device_access_peer(device.index, p)]
    if blocked:
        return f"GPU {device.index} has no peer access to GPU(s) {blocked}"
    return None


class _DeviceMemory:
    """Lets torch.as_tensor view raw device memory (no ownership) through __cuda_array_interface__."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


class CustomAllReduce:
    """Sum over the tensor-parallel group through peer memory; `all_reduce(x)` falls back to NCCL.

    Build it with `CustomAllReduce.create(...)` on every rank at once (it exchanges IPC handles over
    `cpu_group`); it returns None on every rank when any rank cannot take part.
    """

    def __init__(self, rank: int, world: int, device: torch.device, nccl_group, cpu_group,
                 max_bytes: int = DEFAULT_MAX_BYTES, num_programs: int = 32, block: int = 2048,
                 max_spins: int = DEFAULT_MAX_SPINS) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.nccl_group, self.cpu_group, self.max_bytes = nccl_group, cpu_group, max_bytes
        self.num_programs, self.block = min(num_programs, MAX_PROGRAMS), block
        self.driver = _Driver()
        torch.cuda.synchronize(device)  # NOTE: makes the device's primary context current in this thread
        nbytes = FLAGS_BYTES + 2 * max_bytes
        self.own = self.driver.malloc_zeroed(nbytes)
        handles: list[bytes | None] = [None] * world
        dist.all_gather_object(handles, self.driver.ipc_handle(self.own), group=cpu_group)
        self.opened = {r: self.driver.ipc_open(h) for r, h in enumerate(handles) if r != rank}
        bases = [self.own if r == rank else self.opened[r] for r in range(world)]
        raw = torch.as_tensor(_DeviceMemory(self.own, nbytes), device=device)  # [nbytes] uint8
        self.flags = raw[:FLAGS_BYTES].view(torch.int64)  # [MAX_PROGRAMS * MAX_WORLD]
        self.data = raw[FLAGS_BYTES:]  # [2 * max_bytes] uint8, viewed as the message dtype per call
        self.deltas = torch.tensor([b - self.own for b in bases], dtype=torch.int64, device=device)  # bytes
        self.counters = torch.zeros(MAX_PROGRAMS, dtype=torch.int64, device=device)  # epochs per program
        self.error = torch.zeros(1, dtype=torch.int32, device=device)  # 1: a peer never signalled
        self.error_host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.max_spins = max_spins
        torch.cuda.synchronize(device)
        dist.barrier(group=cpu_group)  # NOTE: no rank may signal before every buffer is zeroed and mapped

    @classmethod
    def create(cls, rank: int, world: int, device: torch.device, nccl_group, cpu_group,
               **kwargs) -> tuple["CustomAllReduce | None", str | None]:
        """-> (instance, None) or (None, reason); every rank gets the same answer."""
        peers: list[int | None] = [None] * world
        dist.all_gather_object(peers, device.index if device.type == "cuda" else -1, group=cpu_group)
        reason = _why_unsupported(world, device, peers)
        if reason is None:
            try:
                _Driver()
            except OSError as exc:
                reason = f"libcuda not loadable ({exc})"
        reasons: list[str | None] = [None] * world
        dist.all_gather_object(reasons, reason, group=cpu_group)
        bad = [(r, why) for r, why in enumerate(reasons) if why is not None]
        if bad:
            return None, f"rank {bad[0][0]}: {bad[0][1]}"
        return cls(rank, world, device, nccl_group, cpu_group, **kwargs), None

    def eligible(self, x: torch.Tensor) -> bool:
        """Same answer on every rank for the same shape and dtype (the ranks must agree on the path)."""
        return (x.is_cuda and x.dtype in SUPPORTED_DTYPES and x.is_contiguous()
                and x.numel() * x.element_size() <= self.max_bytes)

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        """The peer-memory sum of x over all ranks, as a new tensor (graph capturable)."""
        out = torch.empty_like(x)
        n = x.numel()
        if n == 0:
            return out
        _one_shot_kernel[(self.num_programs,)](
            x, out, self.data.view(x.dtype), self.flags, self.deltas, self.counters, self.error, n, self.rank,
            self.max_bytes // x.element_size(), self.max_spins, WORLD=self.world, BLOCK=self.block, num_warps=8)
        return out

    def fetch_error(self) -> None:
        """Enqueue a copy of the give-up flag to the host (after a step; the next sync completes it)."""
        self.error_host.copy_(self.error, non_blocking=True)

    def error_seen(self) -> bool:
        """True when a call before the last fetch_error() gave up on a peer (no synchronization)."""
        return bool(self.error_host[0])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The hook for layers.parallel.set_all_reduce: peer memory when eligible, NCCL otherwise."""
        if self.eligible(x):
            return self.one_shot(x)
        dist.all_reduce(x, group=self.nccl_group)
        return x

    def close(self, barrier: bool = True) -> None:
        """Unmap the peers' buffers, wait for every rank to do the same, then free ours."""
        if not self.own:
            return
        torch.cuda.synchronize(self.device)
        for ptr in self.opened.values():
            self.driver.ipc_close(ptr)
        self.opened = {}
        if barrier:
            dist.barrier(group=self.cpu_group)
        self.driver.free(self.own)
        self.own = 0
