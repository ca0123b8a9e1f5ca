# make install: .venv with the pinned dependencies and the project (idempotent)
# make run:     install + run the pipeline on config.yaml
# make test:    install + the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SNAKEMAKE_ARGS ?=

.PHONY: install run test dry-run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/snakemake --cores all $(SNAKEMAKE_ARGS)

dry-run: install
	$(VENV)/bin/snakemake -n $(SNAKEMAKE_ARGS)

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf results resources logs benchmarks .snakemake
