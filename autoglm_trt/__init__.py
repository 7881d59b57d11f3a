"""autoglm-trt: fast inference engines for AutoGLM-Phone-9B (GLM-4.1V architecture).

`from autoglm_trt import LLM, SamplingParams` is the offline API; imports are lazy so that the CLI
starts without loading torch.
"""

__version__ = "0.1.0"

_LAZY = {"LLM": "autoglm_trt.engine.llm", "SamplingParams": "autoglm_trt.engine.sampling_params",
         "LLMEngine": "autoglm_trt.engine.llm_engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoglm_trt' has no attribute {name!r}")
