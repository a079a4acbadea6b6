# The README's two set-up commands are `make demo` and `make test`.
# Both create .venv (if missing) and install the pinned requirements and the
# package in editable mode, so nothing needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-model test test-xla clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cambrian.demo

# Train the built-in demo model from scratch and replace the committed copy (cambrian/assets/tiny-cambrian-shapes).
demo-model: $(STAMP)
	$(PY) -m cambrian.demo --retrain --save-checkpoint cambrian/assets/tiny-cambrian-shapes

test: $(STAMP)
	$(PY) -m pytest -q tests

# torch_xla on PJRT_DEVICE=CPU in its own venv (.venv-xla: torch 2.9 + torch_xla 2.9, ~4 GB of downloads).
test-xla:
	scripts/test_xla.sh

clean:
	rm -rf $(VENV) build *.egg-info
