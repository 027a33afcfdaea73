# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv is all they need):
#   make demo   create .venv, install cnc-hf, then train + evaluate + save + predict on the built-in demo data
#   make test   create .venv, install cnc-hf with the test extras (+ Debian chromium), then run the test suite
# Both work in a virtualenv of their own (.venv), which sees nothing of the machine's site-packages.
# To use another environment instead: make test VENV=/path/to/venv (it is created if missing).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU wheel that lies on this project's machines; elsewhere set TORCH_SPEC="torch" (or a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# The tests read the real CLIP BPE vocabulary from this wheel's data file; --no-deps, because its
# dependencies (torchvision, timm) are not needed and would pull another torch build.
OPEN_CLIP_SPEC ?= open-clip-torch==3.3.0

.PHONY: venv install install-test demo test benchmark gpu-wheels clean-venv

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

venv: $(PYTHON)

install: $(PYTHON)
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e .

# The tests also cover the Gradio app (extra "app") in headless Chromium (Debian's package, as root)
# and the ONNX export / ONNX Runtime path (extra "onnx").
install-test: install
	$(PYTHON) -m pip install -q -e ".[test,app,onnx]"
	$(PYTHON) -m pip install -q --no-deps "$(OPEN_CLIP_SPEC)"
	sh scripts/install_browser.sh

demo: install
	$(PYTHON) -m cnc_hf.cli demo $(DEMO_ARGS)

# The suite itself runs offline: everything it needs is installed above.
test: install-test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

benchmark: install
	$(PYTHON) -m cnc_hf_train.benchmark $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)

# Wheels the GPU machine's image lacks (it has torch, transformers, accelerate, pillow, scikit-image),
# for training/bench_gpu.sh there: pure-Python, for its Python 3.12.
gpu-wheels: $(PYTHON)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
