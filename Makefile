# Set-up and jobs. `make demo` and `make test` work on a fresh machine: they create the venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override (e.g. TORCH_SPEC='torch>=2.5') where a different build is wanted.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-plugins-installed

.PHONY: install demo test test-fast test-avx2 bench assets clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(PY) -c "import hf_plugins.assets as a; a.ensure_assets()"

demo: assets
	$(VENV)/bin/hf-plugins demo

test: assets
	$(PY) -m pytest -q -ra

# The whole suite as an AVX2-only CPU runs it (ATen's kernels and oneDNN capped to AVX2), on an AVX-512/AMX machine.
test-avx2: assets
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 HF_PLUGINS_NATIVE_MARCH=haswell $(PY) -m pytest -q -ra

# Local convenience only; CI always runs the whole suite.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: assets
	$(PY) benchmarks/awq_quality.py
	$(PY) benchmarks/awq_cpu_speed.py
	$(PY) benchmarks/speculative_cpu.py
	$(PY) benchmarks/bitplane_cpu.py
	$(PY) benchmarks/w4ax_cpu.py
	$(PY) benchmarks/w4a4kv4_quality.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
