# zipfline: the two commands of the quick start are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STORE ?= sqlite:///mlflow.db
PORT ?= 5000

.PHONY: demo test test-fast lint format ui java wordnet clean cluster-up cluster-down cluster-demo
CLUSTER ?= cluster
WORDNET ?= /usr/share/wordnet

# The venv is (re)installed when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "zipfline needs Python 3.11+ (found " + sys.version.split()[0] + ")")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "zipfline: installing into $(VENV) (a few minutes the first time; log in $(VENV)/install.log)"
	@{ $(BIN)/python -m pip install --upgrade pip && $(BIN)/python -m pip install -e '.[dev]'; } \
	  > $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; echo "zipfline: install failed, see $(VENV)/install.log" >&2; exit 1; }
	@touch $(STAMP)

java:
	@v=$$($${JAVA_HOME:+$$JAVA_HOME/bin/}java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)\(\.\([0-9]*\)\)\{0,1\}.*/\1 \3/p' | head -n1); \
	set -- $$v; major=$${1:-0}; [ "$$major" = 1 ] && major=$${2:-0}; \
	if [ "$$major" -lt 17 ] 2>/dev/null || [ -z "$$v" ]; then \
	  echo "zipfline: Java 17+ is required for Spark (found: $${v:-none}); install it, e.g. apt-get install openjdk-17-jre-headless, or set JAVA_HOME" >&2; exit 2; fi

# `make wordnet`: WordNet (Debian's wordnet-base), installed when root: the augment stage's
# synonyms and the real-text case (generate.source=wordnet).
wordnet:
	@test -f $(WORDNET)/data.noun || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "zipfline: installing WordNet (apt-get install wordnet-base)"; \
	    { apt-get install -y -qq wordnet-base || { apt-get update -qq && apt-get install -y -qq wordnet-base; }; } >/dev/null 2>&1; fi; \
	  test -f $(WORDNET)/data.noun || { echo "zipfline: WordNet is missing from $(WORDNET): install Debian's wordnet-base (apt-get install wordnet-base), or leave augment.enabled=false and generate.source=synthetic" >&2; exit 2; }; }

demo: $(STAMP) java
	$(BIN)/zipfline run $(ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist; 0: in this one), stealing work from
# each other; they share one Spark-made pipeline run (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP) java
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check core querylog pipelines jobs trainers data_quality tests bench
	$(BIN)/ruff format --check core querylog pipelines jobs trainers data_quality tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_import_layers.py

format: $(STAMP)
	$(BIN)/ruff check --fix core querylog pipelines jobs trainers data_quality tests bench
	$(BIN)/ruff format core querylog pipelines jobs trainers data_quality tests bench

# A Spark standalone master and 2 workers, a Dask scheduler and 2 workers, an MLflow server, all
# on 127.0.0.1; pids, logs and stores in $(CLUSTER)/. conf/cluster/ points at them.
cluster-up: $(STAMP) java
	$(BIN)/python -m pipelines.cluster up --dir $(CLUSTER)

cluster-down: $(STAMP)
	$(BIN)/python -m pipelines.cluster down --dir $(CLUSTER)

# The whole pipeline submitted to the standalone master: stages as Spark jobs on its executors,
# training as TorchDistributor barrier tasks, reference runs on Dask, tracking on the server.
cluster-demo: $(STAMP) java
	SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON=$(abspath $(BIN)/python) \
	  $(BIN)/spark-submit --master spark://127.0.0.1:7077 --conf spark.driver.host=127.0.0.1 \
	  --conf spark.driver.bindAddress=127.0.0.1 --conf spark.executor.memory=1g \
	  --conf spark.ui.enabled=false pipelines/cli.py run --env cluster \
	  --set data.root=$(abspath $(CLUSTER))/data

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf data mlflow.db mlartifacts .pytest_cache
