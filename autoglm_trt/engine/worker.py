"""Tensor-parallel worker processes (ranks 1..N-1): how rank 0 starts and watches them, and what each
one runs: report `hello`, join the group, load its weight shard (no vision tower), build its
ModelRunner, then make every runner call that rank 0 sends until it is told to stop.

A worker never outlives its parent: a watchdog thread exits the process when the parent pid changes
(the parent died, even by SIGKILL); the processes are also daemonic, so a normal exit of the parent
terminates them. Test hook: AUTOGLM_TRT_TP_FAULT="rank:phase:action" (phase hello | joined | loaded
| ready | step, action hang | exit | raise) makes that rank fail right before it reports the phase.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_objects

import torch

from autoglm_trt.config import EngineConfig, ModelConfig
from autoglm_trt.engine.distributed import (PHASES, DistInit, TensorParallelError, TPGroups, init_distributed,
                                            recv_message, set_step_channel)


@dataclass
class WorkerArgs:
    init: DistInit  # this worker's rank
    config: EngineConfig
    parent_pid: int
    cpu_threads: int  # intra-op threads on CPU (the ranks share the machine's cores)


# ---- rank 0 side: start and watch --------------------------------------------------------------
def _exit_cause(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        import signal

        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Workers:
    """Ranks 1..N-1 plus a monitor thread that records their start-up phases, errors and deaths."""

    def __init__(self, procs: dict, conns: dict, step_conns: list, on_death) -> None:
        self.procs, self.conns, self.on_death = procs, conns, on_death
        self.step_conns = step_conns  # rank 0's send ends of the step pipes, in rank order
        self.phase = {r: 0 for r in procs}  # index into PHASES
        self.errors: dict[int, str] = {}  # traceback text a worker sent before exiting
        self.closing = False  # set by rank 0's shutdown: exits are expected from then on
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._monitor, name="autoglm-tp-monitor", daemon=True)
        self.thread.start()

    def _read(self, rank: int) -> None:
        conn = self.conns[rank]
        try:
            while conn.poll():
                tag, payload = conn.recv()
                with self.cond:
                    if tag == "error":
                        self.errors[rank] = payload
                    else:
                        self.phase[rank] = max(self.phase[rank], PHASES.index(tag))
                    self.cond.notify_all()
        except (EOFError, OSError):
            self.conns.pop(rank, None)

    def _monitor(self) -> None:
        alive = dict(self.procs)
        while alive:
            by_obj = {p.sentinel: r for r, p in alive.items()}
            by_obj.update({c: r for r, c in self.conns.items()})
            for obj in wait_objects(list(by_obj), timeout=1.0):
                rank = by_obj[obj]
                if rank in self.conns:
                    self._read(rank)
                if obj == self.procs[rank].sentinel:
                    self.procs[rank].join(0.5)  # reaps it: exitcode is known from here on
                    alive.pop(rank, None)
                    with self.cond:
                        self.cond.notify_all()
                    if not self.closing:
                        self.on_death(rank)

    def describe(self, rank: int) -> str:
        p = self.procs[rank]
        deadline = time.monotonic() + 2.0
        with self.cond:  # NOTE: a worker sends its error, then exits: report the exit too
            while rank in self.errors and p.exitcode is None and time.monotonic() < deadline:
                self.cond.wait(0.1)
        text = f"rank {rank} (pid {p.pid}) {_exit_cause(p.exitcode)}"
        if rank in self.errors:
            tail = [line.strip() for line in self.errors[rank].strip().splitlines()[-3:]]
            text += ": " + " | ".join(tail)
        return text

    def dead(self) -> list[int]:
        return [r for r, p in self.procs.items() if p.exitcode is not None or r in self.errors]

    def wait_phase(self, phase: str, timeout_s: float) -> None:
        """Block until every worker has reported `phase`; raise naming the first that died or hung."""
        want, deadline = PHASES.index(phase), time.monotonic() + timeout_s
        with self.cond:
            while True:
                if self.dead():
                    raise TensorParallelError(f"tensor-parallel start-up failed: {self.describe(self.dead()[0])}")
                late = [r for r, ph in self.phase.items() if ph < want]
                if not late:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    r = late[0]
                    raise TensorParallelError(
                        f"tensor-parallel start-up failed: rank {r} (pid {self.procs[r].pid}) did not report "
                        f"'{phase}' within {timeout_s:g} s: the start-up handshake timed out (the worker hangs "
                        f"after '{PHASES[self.phase[r]]}')")
                self.cond.wait(min(left, 0.5))

    def stop(self, grace_s: float = 10.0) -> None:
        """Join the workers (they were told to stop); terminate, then kill, whoever is left."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            for end in (p.terminate, p.kill):
                if p.is_alive():
                    end()
                    p.join(3.0)
        for conn in self.step_conns:
            conn.close()


def spawn_workers(config: EngineConfig, init: DistInit, on_death) -> Workers:
    """Start ranks 1..world-1 (spawned processes: CUDA and fork do not mix)."""
    ctx = torch.multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // init.world_size)
    procs, conns, steps = {}, {}, []
    try:
        for rank in range(1, init.world_size):
            status_recv, status_send = ctx.Pipe(duplex=False)  # worker -> rank 0: phases, errors
            step_recv, step_send = ctx.Pipe(duplex=False)  # rank 0 -> worker: step messages
            args = WorkerArgs(replace(init, rank=rank), config, os.getpid(), threads)
            proc = ctx.Process(target=worker_main, args=(args, status_send, step_recv),
                               name=f"autoglm-tp-rank{rank}", daemon=True)
            proc.start()
            status_send.close()
            step_recv.close()
            procs[rank], conns[rank] = proc, status_recv
            steps.append(step_send)
    except BaseException:
        for proc in procs.values():
            proc.kill()
        raise
    return Workers(procs, conns, steps, on_death)


# ---- worker side -------------------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)  # NOTE: the engine process is gone: no one will ever send another step

    threading.Thread(target=watch, name="autoglm-tp-parent-watchdog", daemon=True).start()


def _fault(rank: int, phase: str) -> None:
    for spec in filter(None, os.environ.get("AUTOGLM_TRT_TP_FAULT", "").split(",")):
        r, ph, action = spec.split(":")
        if int(r) == rank and ph == phase:
            if action == "hang":
                time.sleep(1e9)
            if action == "exit":
                os._exit(3)
            raise RuntimeError(f"injected fault on rank {rank} before '{phase}'")


def _report(conn, tag: str, payload=None) -> None:
    _fault(_RANK, tag)
    conn.send((tag, payload))


_RANK = -1


def worker_main(args: WorkerArgs, conn, step_conn) -> None:
    """Entry point of a spawned worker: `conn` reports to rank 0, `step_conn` brings its steps."""
    global _RANK
    _RANK = args.init.rank
    _watch_parent(args.parent_pid)
    set_step_channel([step_conn])
    try:
        if args.init.device_type == "cpu":
            torch.set_num_threads(args.cpu_threads)
        _report(conn, "hello", os.getpid())
        groups = init_distributed(args.init)
        _report(conn, "joined")
        _serve(_build(args, groups, conn))
        _leave(groups)
    except BaseException:  # noqa: BLE001 - rank 0 names this rank and shows the tail of this text
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)
    os._exit(0)


def _build(args: WorkerArgs, groups: TPGroups, conn):
    from autoglm_trt.engine.model_runner import ModelRunner
    from autoglm_trt.models.loader import apply_quantization, load_model

    cfg = args.config
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig.from_dir(cfg.model_dir)
    model = load_model(cfg.model_dir, cfg.dtype, groups.torch_device, with_vision=False, show_progress=False)
    apply_quantization(model, cfg.quant, cfg.calib_dir, cfg.act_quant)
    _report(conn, "loaded")
    runner = ModelRunner(model, model_cfg, cfg, groups.torch_device)
    _report(conn, "ready", runner.num_blocks)
    return runner


def _serve(runner) -> None:
    """Make every call rank 0 makes on its runner, on this rank's shard, until told to stop (the results
    are rank 0's business: its logits and tokens)."""
    faulty = bool(os.environ.get("AUTOGLM_TRT_TP_FAULT"))
    while True:
        msg = recv_message()
        if msg.method is None:
            return
        if faulty:
            _fault(_RANK, "step")
        getattr(runner, msg.method)(*msg.args)


def _leave(groups: TPGroups) -> None:
    """Rank 0 said stop: meet it in the custom all-reduce's closing barrier, then exit."""
    if groups.custom is not None:
        groups.custom.close(barrier=True)
