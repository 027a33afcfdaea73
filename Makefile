# Two commands do all the set-up on a fresh machine:
#   make demo   install, then train + evaluate + save + predict on the built-in demo data
#   make test   install with the test extras, then run the test suite
PYTHON ?= python3
# The CPU wheel that lies on this project's machines; elsewhere set TORCH_SPEC="torch" (or a CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test benchmark

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
