# imgclf: `make run` trains and evaluates on the embedded digits set; `make test` lints and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint format ui bench clean

install: $(VENV)/.installed

# torch first, pinned: pip then takes the CPU build; a range would pull a multi-GB CUDA build.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: install
	imgclf params --check
	dvc repro
	python -m imgclf.summary

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

test: lint
	pytest

ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: install
	python bench/run_all.py

clean:
	rm -rf data models metrics plots bench/results .pytest_cache
