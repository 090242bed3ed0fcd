# Two entry points, both self-installing: `make demo` (the main job) and `make test` (the test suite).
# The virtual environment lives in .venv. torch is installed first, and only when the venv has none, so that a
# CUDA torch installed beforehand (see README) is kept and pip never replaces it with another build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_OUT ?= demo-output

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PY) -c "import torch, SFRSegmentLib; print('torch', torch.__version__, 'installed in $(VENV)')"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m SFRSegmentLib demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
