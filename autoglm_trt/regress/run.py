"""Build the regression's checkpoint and engines, and run the fixed prompts through `LLM` in each mode."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autoglm_trt.errors import UserError
from autoglm_trt.regress.cases import MAX_TOKENS, PRESET, SEED, TOP_K, TOP_STEPS, Mode, Prompt


@dataclass
class CaseResult:
    """One prompt's greedy run (or its golden): what the comparison reads."""

    token_ids: list[int]  # [MAX_TOKENS] greedy tokens
    text: str  # their detokenized text
    logprobs: list[float]  # [MAX_TOKENS] logprob of each chosen token (= the step's best)
    margins: list[float]  # [MAX_TOKENS] best minus second-best logprob: how clear each greedy choice was
    top: list[list[tuple[int, float]]]  # [TOP_STEPS][TOP_K] (token id, logprob), best first


@dataclass
class ModeResult:
    mode: Mode
    cases: dict[str, CaseResult]  # prompt name -> result
    seconds: dict[str, float] = field(default_factory=dict)  # "build" / "load" / "generate" -> seconds


def make_checkpoint(work: Path) -> Path:
    """`autoglm-trt init-random DIR --preset tiny --seed SEED`, the same bytes on every x86 CPU.

    NOTE: torch draws float32 normals with a vectorized Box-Muller (other last bits) only when its CPU
    capability is AVX2; AVX512 and the default capability share the scalar path. The child process is
    pinned to the default one, so the weights do not depend on which CPU wrote them.
    """
    path = work / "checkpoint"
    cmd = [sys.executable, "-c", "from autoglm_trt.cli import main; main()", "init-random", str(path),
           "--preset", PRESET, "--seed", str(SEED)]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"`autoglm-trt {' '.join(cmd[3:])}` failed: {proc.stderr.strip()[-2000:]}")
    return path


def checkpoint_hash(checkpoint: Path) -> str:
    """sha256 of the checkpoint, every byte (the build manifest's "full" source hash)."""
    from autoglm_trt.formats.manifest import source_checkpoint_hash
    from autoglm_trt.models.checkpoint import checkpoint_files

    return source_checkpoint_hash(checkpoint, checkpoint_files(checkpoint), method="full")


def build_mode(checkpoint: Path, work: Path, mode: Mode) -> Path:
    """`autoglm-trt build CKPT -o ENGINE --dtype fp32 --quant Q --tp N` with small limits."""
    from autoglm_trt.builder.build import build_engine
    from autoglm_trt.builder.options import BuildConfig, ShapeLimits

    limits = ShapeLimits(max_batch_size=4, max_seq_len=256, max_num_tokens=256, max_image_patches=1024)
    cfg = BuildConfig(dtype="float32", quant=mode.quant, tp=mode.tp, limits=limits, cuda_graph_batch_sizes=(1, 2, 4))
    return build_engine(checkpoint, work / f"engine-{mode.name}", cfg, show_progress=False).engine_dir


def run_mode(engine_dir: Path, mode: Mode, prompts: tuple[Prompt, ...],
             on_phase: Callable[[str], None] = lambda phase: None) -> tuple[dict[str, CaseResult], dict[str, float]]:
    """Load the engine (limits, TP and quant from its manifest) and run every prompt greedily in one batch."""
    import torch

    from autoglm_trt.engine.llm import LLM
    from autoglm_trt.engine.sampling_params import SamplingParams

    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    llm = LLM(str(engine_dir), device="cpu", dtype="float32", num_blocks=64)
    seconds = {"load": time.perf_counter() - t0}
    on_phase("generate")
    try:
        t0 = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
        outs = llm.generate([p.build() for p in prompts], params)
        seconds["generate"] = time.perf_counter() - t0
    finally:
        if mode.tp > 1:  # NOTE: TP=1 engines must not run while a TP=2 engine lives in this process
            llm.engine.shutdown()
        del llm
        gc.collect()
    return {p.name: case_result(o) for p, o in zip(prompts, outs)}, seconds


def case_result(out) -> CaseResult:
    """A CompletionOutput with logprobs -> CaseResult."""
    lps = out.logprobs or []
    if len(lps) != len(out.token_ids) or any(len(lp.top) < 2 for lp in lps):
        raise RuntimeError(f"expected {TOP_K} logprobs per token, got {len(lps)} entries for "
                           f"{len(out.token_ids)} tokens")
    return CaseResult(token_ids=list(out.token_ids), text=out.text, logprobs=[lp.logprob for lp in lps],
                      margins=[lp.top[0][1] - lp.top[1][1] for lp in lps],
                      top=[[(int(i), float(v)) for i, v in lp.top] for lp in lps[:TOP_STEPS]])
