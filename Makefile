# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The CPU path pins torch==2.13.0 (a local CPU build here; an unpinned torch pulls GBs of CUDA wheels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-gpu demo test test-gpu regress regress-update clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# On a CUDA machine: the CUDA build of torch that the machine already has, plus triton and cuda-python.
install-gpu:
	$(PYTHON) -m pip install -e ".[gpu,dev]"

demo: $(VENV)/.installed
	rm -rf demo-model
	$(VENV)/bin/autoglm-trt init-random demo-model --preset tiny
	$(PY) scripts/demo.py demo-model

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

# Engine regression: tiny engines in every mode (fp32, int8-wo, w8a8, fp8, tp 2 over gloo) against the goldens in
# autoglm_trt/regress/goldens/. regress-update rewrites them (on purpose: review the diff, then commit it).
# ATEN_CPU_CAPABILITY=default: the same CPU kernels on every x86 machine. NOTE: with AVX-512's kernels the fp8
# mode's last float bits differ, an e4m3 activation rounds the other way and a logprob moves by 6.5e-3.
REGRESS_ENV := ATEN_CPU_CAPABILITY=default
regress: $(VENV)/.installed
	$(REGRESS_ENV) $(PY) -m autoglm_trt.regress

regress-update: $(VENV)/.installed
	$(REGRESS_ENV) $(PY) -m autoglm_trt.regress --update

test-gpu:
	$(PYTHON) -m pytest -q -ra -m "gpu or multi_gpu"

clean:
	rm -rf $(VENV) demo-model .pytest_cache
