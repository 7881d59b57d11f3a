"""Structured outputs: constraints (JSON schema, regex, choice, grammar, the phone agent's actions) compiled
into per-request grammar states that fill token bitmasks (llguidance; docs/structured-outputs.md).

Imports no torch and no llguidance until a grammar is compiled or a bitmask allocated.
"""

from autoglm_trt.processing.structured.batch import StepBitmasks
from autoglm_trt.processing.structured.compiler import GrammarCompiler, compiler_for
from autoglm_trt.processing.structured.spec import (
    KINDS,
    StructuredOutputError,
    StructuredOutputs,
    tool_call_schema,
)
from autoglm_trt.processing.structured.state import (
    GrammarState,
    allocate_bitmask,
    bitmask_width,
    fill_bitmasks,
)

__all__ = ["KINDS", "GrammarCompiler", "compiler_for", "GrammarState", "StructuredOutputError", "StructuredOutputs",
           "StepBitmasks", "allocate_bitmask", "bitmask_width", "fill_bitmasks", "tool_call_schema"]
