"""The engine regression job (`make regress`): tiny engines in every mode against golden outputs in the repo.

A tiny random checkpoint (`autoglm-trt init-random --preset tiny --seed 3`) is built into an engine per
mode (fp32, int8-wo, w8a8, fp8, int4 (round-to-nearest), fp32 with tensor parallelism 2 over gloo); each runs the same prompts greedily
(text, raw completion, a drawn screenshot) and is compared with `goldens/{mode}.json`: token ids exactly,
logprobs within the mode's tolerance (the rule is in golden.py). `--update` rewrites the goldens.
"""
