# The two commands a fresh machine needs: `make demo` and `make test` (both install first).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

export HF_HUB_OFFLINE := 1

.PHONY: install test test-another-trajectory lint demo bench fashion-mnist clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/ruff check worker service tests bench
	$(BIN)/mypy
	$(BIN)/pytest

# The engine and lab tests again on another trajectory: one intra-op thread (another reduction
# order) and suite seed 1, as another CPU would give. An assertion that holds on one machine's
# trajectory only fails here, not on a user's machine. .ci/run runs it after `make test`.
ENGINE_TESTS := tests/test_lab.py tests/test_inversion.py tests/test_tuning.py \
  tests/test_purify.py tests/test_precision.py tests/test_warps.py tests/test_attacks.py \
  tests/test_views.py tests/test_reach.py
test-another-trajectory: install
	OMP_NUM_THREADS=1 ANTIDOTE_TEST_SEED=1 $(BIN)/pytest $(ENGINE_TESTS)

lint: install
	$(BIN)/ruff check worker service tests bench
	$(BIN)/ruff format --check worker service tests bench
	$(BIN)/mypy

# Debian's Fashion-MNIST, the main lab dataset; optional (the demo falls back to scikit-learn's digits).
fashion-mnist:
	@test -d $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "Fashion-MNIST not installed (needs root and apt-get); using scikit-learn's digits."

# The product end to end: make a backdoored lab CLIP, start the embedded service (API and a real
# Celery worker), submit through the HTTP client, follow progress, download, print CA/ASR.
demo: install
	$(BIN)/antidote lab make --attack badnets --out var/demo/badnets
	ANTIDOTE_DATA_DIR=var/demo/service $(BIN)/antidote demo --lab var/demo/badnets \
	  --out var/demo/purified

bench: install fashion-mnist
	$(BIN)/python bench/lab.py --determinism
	$(BIN)/python bench/efficacy.py

clean:
	rm -rf $(VENV) var
