# imgclf: `make run` trains and evaluates on the embedded digits set; `make test` lints and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
PLOTS_PAGE := .dvc/plots/index.html
VEGA := .dvc/plots/node_modules
SWAGGER_NPM := src/imgclf/serving/swagger-ui
SWAGGER_UI := src/imgclf/serving/static/swagger-ui
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test test-all lint format ui serve bench clean browser-deps server-deps server \
	register gate challenger champion rollback metrics-diff team-server remote push pull reproduce

install: $(VENV)/.installed $(PLOTS_PAGE) $(SWAGGER_UI)/swagger-ui-bundle.js

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

# `imgclf serve`'s /docs loads Swagger UI from the server itself, not from a CDN: it works offline.
# The pinned files ($(SWAGGER_NPM)/package-lock.json) are copied into the package's static folder.
# --ignore-scripts: swagger-ui-dist's one dependency (@scarf/scarf) reports installs from a script.
$(SWAGGER_UI)/swagger-ui-bundle.js: $(SWAGGER_NPM)/package-lock.json
	npm ci --silent --no-audit --no-fund --ignore-scripts --prefix $(SWAGGER_NPM)
	rm -rf $(SWAGGER_UI).tmp && mkdir -p $(SWAGGER_UI).tmp
	cp $(addprefix $(SWAGGER_NPM)/node_modules/swagger-ui-dist/,swagger-ui-bundle.js swagger-ui.css \
	  favicon-32x32.png LICENSE) $(SWAGGER_UI).tmp/
	rm -rf $(SWAGGER_UI) && mv $(SWAGGER_UI).tmp $(SWAGGER_UI)

run: install
	imgclf params --check
	dvc repro
	python -m imgclf.tracking.summary

lint: install
	ruff check .
	ruff format --check .
	lint-imports
	actionlint
	zizmor --offline --persona auditor .github/workflows

format: install
	ruff check --fix .
	ruff format .

# Tests marked slow (minutes each) run where CI is set (GitHub Actions and .ci/run set it), and
# always with `make test-all`: a local `make test` stays within 15 minutes.
test: lint browser-deps server-deps
	pytest $(if $(CI),,-m "not slow")

test-all: lint browser-deps server-deps
	pytest

# `make run` on a clean copy of this work tree must give back dvc.lock, metrics/ and plots/ byte for
# byte, and a clean `git status` (tests/e2e/test_reproduce.py runs it within `make test`).
reproduce: install
	python -m tests.support.reproduce

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

# PostgreSQL (Debian's, version 15) for the shared tracking server and Optuna studies: the tests
# start private clusters of it on free ports (tests/support/servers.py postgres_server). Installed once.
# Debian's prometheus gives promtool and a real Prometheus for the alerting rules' tests.
server-deps:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && command -v promtool >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo "sudo -n"); \
		{ $$SUDO apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql-15 prometheus >/dev/null; } || \
		echo "server-deps: could not install postgresql-15 and prometheus (root or sudo needed); their tests will skip"; \
	else echo "server-deps: install PostgreSQL 15 and Prometheus for the scale-out and alerting tests"; fi

# The servers (ui, serve, server, team-server) run under imgclf.supervisor: stopping one, by Ctrl-C
# or by a kill of the process that listens on its port, stops every process it started.
SUPERVISE = python -m imgclf.supervisor --

# The MLflow UI on http://127.0.0.1:5000 (UI_PORT), without MLflow's job runner (imgclf runs no
# MLflow jobs; it would start seven more processes).
UI_PORT ?= 5000
ui: install
	@python -m imgclf.tracking.summary --ui http://127.0.0.1:$(UI_PORT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(SUPERVISE) mlflow ui --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# The pipeline's model: HTTP API and web page on http://127.0.0.1:8000/ (SERVE_PORT; IMGCLF_TOKEN=...
# for a token).
SERVE_PORT ?= 8000
serve: install
	@test -f models/model.onnx || { echo "make serve: no models/model.onnx; run \`make run\` first" >&2; exit 2; }
	$(SUPERVISE) imgclf serve --model models/model.onnx --port $(SERVE_PORT)

# --- The registry: what .github/workflows/promote.yml runs, one target per step ----------------
# Inputs come from the environment (never interpolated by a workflow): VERSION, EXPECT_CHAMPION,
# REASON, TO; GITHUB_OUTPUT and GITHUB_STEP_SUMMARY when set. MLFLOW_TRACKING_URI names the store.
OUTPUTS = $${GITHUB_OUTPUT:+--outputs "$$GITHUB_OUTPUT"}
REPORT = $${GITHUB_STEP_SUMMARY:+--report "$$GITHUB_STEP_SUMMARY"}

# The evaluated models/model.onnx becomes a version of registry.model_name (once per file).
register: install
	imgclf register $(OUTPUTS)

# The gates, changing nothing: on a pull request, before anything is registered.
gate: install
	imgclf promote --dry-run $(REPORT)

# Gate the registered version; on a pass it becomes `challenger`, waiting for approval.
challenger: install
	imgclf promote --to challenger --reason "$${REASON:-gates passed}" $(REPORT) $(OUTPUTS)

# The approved challenger becomes `champion`, unless the champion moved since it was gated (exit 3).
champion: install
	@test -n "$$VERSION" || { echo "make champion: set VERSION (the challenger's version)" >&2; exit 2; }
	imgclf promote --version "$$VERSION" --to champion --expect-champion "$${EXPECT_CHAMPION:-none}" \
		--reason "$${REASON:-approved}" $(REPORT) $(OUTPUTS)

rollback: install
	@test -n "$$REASON" || { echo "make rollback: set REASON (why the champion goes back)" >&2; exit 2; }
	imgclf rollback --to "$${TO:-previous}" --reason "$$REASON" $(REPORT)

# This work tree's metrics against BASE (a git revision, default main), as a markdown table.
metrics-diff: install
	{ echo "### Metrics against $${BASE:-main}"; dvc metrics diff "$${BASE:-main}" --md; } | tee -a "$${GITHUB_STEP_SUMMARY:-/dev/null}"

# A tracking and registry server for a team or CI (a runner's own mlflow.db starts empty): sqlite
# and artifacts under ./mlflow-server, proxied, so clients need only MLFLOW_TRACKING_URI=http://HOST:PORT.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
server: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(SUPERVISE) mlflow server \
		--host $(SERVER_HOST) --port $(SERVER_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow-server/mlflow.db \
		--artifacts-destination $(CURDIR)/mlflow-server/artifacts

# The shared tracking server for a team: runs and the registry in PostgreSQL, artifacts proxied into
# S3 (README: Scaling out). BACKEND_URI=postgresql+psycopg2://USER@HOST:5432/DB (the password in
# PGPASSWORD or ~/.pgpass) and ARTIFACTS_URI=s3://BUCKET/PATH come from the environment, as do the
# server's AWS credentials (and AWS_ENDPOINT_URL_S3 for an S3-compatible store); clients need only
# MLFLOW_TRACKING_URI=http://HOST:PORT. SERVER_HOST=0.0.0.0 to listen beyond this machine.
team-server: install
	@case "$$BACKEND_URI" in postgresql+psycopg2://?*) ;; \
	"") echo "make team-server: set BACKEND_URI=postgresql+psycopg2://USER@HOST:PORT/DB" >&2; exit 2;; \
	*) echo "make team-server: BACKEND_URI must start postgresql+psycopg2:// (the installed driver), not $${BACKEND_URI%%:*}:" >&2; exit 2;; esac
	@case "$$ARTIFACTS_URI" in s3://?*) ;; \
	*) echo "make team-server: set ARTIFACTS_URI=s3://BUCKET/PATH (got '$$ARTIFACTS_URI')" >&2; exit 2;; esac
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(SUPERVISE) mlflow server \
		--host $(SERVER_HOST) --port $(SERVER_PORT) --workers 1 \
		--backend-store-uri "$$BACKEND_URI" --artifacts-destination "$$ARTIFACTS_URI"

# --- Data and models on a DVC remote (README: Scaling out) -------------------------------------
# URL=s3://BUCKET/PATH: the default remote; only the URL goes into .dvc/config (commit it).
# Credentials and endpoint stay out of git: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)
# and AWS_ENDPOINT_URL_S3 for an S3-compatible store, or `dvc remote modify --local storage ...`.
remote: install
	@test -n "$$URL" || { echo "make remote: set URL (e.g. URL=s3://bucket/imgclf)" >&2; exit 2; }
	dvc remote add --default --force storage "$$URL"

# Data, models and the run cache: a clone that pulls them runs no stage that already ran.
push: install
	dvc push --run-cache

# Every clone can call it (CI does) before `make run`: without a remote there is nothing to pull,
# and outputs nobody pushed are only warned about (DVC lists them); `dvc repro` then makes them.
pull: install
	@remotes=$$(dvc remote list) || exit; \
	if test -z "$$remotes"; then echo "make pull: no DVC remote configured (make remote URL=s3://...), nothing to pull"; \
	else echo "dvc pull --run-cache --allow-missing"; dvc pull --run-cache --allow-missing; fi

bench: install
	python bench/run_all.py

clean:
	rm -rf data models bench/results .pytest_cache dvc_plots
