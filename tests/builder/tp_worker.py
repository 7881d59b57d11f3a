"""One tensor-parallel rank over gloo (CPU): load ENGINE_DIR's rank file, write the logits of a fixed prompt.

    python tests/builder/tp_worker.py ENGINE_DIR RANK WORLD PORT OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(engine_dir: str, rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from autoglm_trt.layers.parallel import set_parallel_state
    from autoglm_trt.models.loader import load_model

    set_parallel_state(rank, world, dist.group.WORLD)
    model = load_model(engine_dir, dtype="float32", show_progress=False)
    ids = torch.arange(1, 10) * 37  # [9]
    with torch.no_grad():
        logits = model.compute_logits(model(model.embed(ids), torch.arange(9).expand(3, -1)))  # [9, V]
    if rank == 0:
        torch.save(logits, out)
    dist.barrier()
    # NOTE: like the engine's own workers, leave with os._exit: tearing gloo down while the peer that hosts
    #  the TCP store is exiting aborted this process now and then (`terminate called without an active exception`)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
