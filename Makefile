# imgclf: `make run` trains and evaluates on the embedded digits set; `make test` lints and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
PLOTS_PAGE := .dvc/plots/index.html
VEGA := .dvc/plots/node_modules
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint format ui serve bench clean browser-deps

install: $(VENV)/.installed $(PLOTS_PAGE)

# torch first, pinned: pip then takes the CPU build; a range would pull a multi-GB CUDA build.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# `dvc plots show` draws with Vega, which DVC's page loads from a CDN: blank offline. The pinned
# scripts (.dvc/plots/package-lock.json) are inlined into the page template that .dvc/config names.
$(PLOTS_PAGE): .dvc/plots/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix .dvc/plots
	{ printf '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC plots</title>\n'; \
	  for f in vega/build/vega.min.js vega-lite/build/vega-lite.min.js vega-embed/build/vega-embed.min.js; do \
	    printf '<script>\n'; cat $(VEGA)/$$f; printf '\n</script>\n'; done; \
	  printf '<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'; \
	} > $@.tmp && mv $@.tmp $@

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

test: lint browser-deps
	pytest

# The web page's browser test drives Debian's chromium and chromedriver (no download at test time).
# Installed once; a machine without apt-get gets a hint, and the test skips there (fails on CI).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo "sudo -n"); \
		{ $$SUDO apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "browser-deps: could not install chromium and chromium-driver (root or sudo needed); the browser test will skip"; \
	else echo "browser-deps: install chromium and chromedriver for the web page's browser test"; fi

ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# The pipeline's model: HTTP API and web page on http://127.0.0.1:8000/ (IMGCLF_TOKEN=... for a token).
serve: install
	@test -f models/model.onnx || { echo "make serve: no models/model.onnx; run \`make run\` first" >&2; exit 2; }
	imgclf serve --model models/model.onnx

bench: install
	python bench/run_all.py

clean:
	rm -rf data models bench/results .pytest_cache dvc_plots
