# Two commands on a fresh machine:
#   make test   install everything, start the local Kafka, lint, type-check, run all tests, stop Kafka
#   make demo   the whole job end to end on synthetic sensor data, then stop everything
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export KAFKA_PORT ?= 39092
export KAFKA_CONTROLLER_PORT ?= 39093
export KAFKA_BOOTSTRAP ?= 127.0.0.1:$(KAFKA_PORT)

.PHONY: help install system-deps kafka-jars tools constraints lint typecheck test unit demo bench chaos kafka-start kafka-stop clean

help:
	@echo "make test | make demo | make bench | make lint | make typecheck | make kafka-start | make kafka-stop"

# constraints.txt: the exact versions the tests ran with (make constraints regenerates it).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

system-deps:
	scripts/system-deps.sh

kafka-jars:
	deploy/kafka/kafka.sh fetch

# helm (built once into .cache/bin) for the chart tests; see scripts/tools.sh.
tools: $(BIN)/.installed
	scripts/tools.sh install

# Regenerate the pins the images build from, after changing pyproject.toml's dependencies.
constraints: $(BIN)/.installed
	scripts/tools.sh constraints

install: $(BIN)/.installed system-deps kafka-jars tools

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: install
	scripts/test.sh

unit: $(BIN)/.installed
	$(BIN)/pytest -q tests/unit

demo: install
	scripts/demo.sh

bench: install
	scripts/bench.sh

# Faults against a private broker in both delivery modes (docs/reliability.md); CHAOS_ARGS
# passes options, e.g. make chaos CHAOS_ARGS='--runs 3 --write-docs'.
chaos: install
	scripts/chaos.sh $(CHAOS_ARGS)

kafka-start: kafka-jars
	deploy/kafka/kafka.sh start

kafka-stop:
	deploy/kafka/kafka.sh stop

clean:
	-deploy/kafka/kafka.sh stop
	rm -rf .cache/kafka/data-* demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
