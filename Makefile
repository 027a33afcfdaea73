# Two commands do all the set-up on a fresh machine:
#   make demo   install, then train + evaluate + save + predict on the built-in demo data
#   make test   install with the test extras, then run the test suite
PYTHON ?= python3
# The CPU wheel that lies on this project's machines; elsewhere set TORCH_SPEC="torch" (or a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test benchmark gpu-wheels

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e .

# The tests also cover the Gradio app (extra "app") in headless Chromium.
install-test: install
	$(PYTHON) -m pip install -q -e ".[test,app]"
	sh scripts/install_browser.sh

demo: install
	$(PYTHON) -m cnc_hf.cli demo $(DEMO_ARGS)

test: install-test
	$(PYTHON) -m pytest -q tests

benchmark: install
	$(PYTHON) -m training.benchmark $(BENCH_ARGS)

# Wheels the GPU machine's image lacks (it has torch, transformers, accelerate, pillow, scikit-image),
# for training/bench_gpu.sh there: pure-Python, for its Python 3.12.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
