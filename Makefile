# make install: .venv with the pinned dependencies and the project (idempotent)
# make run:     install + run the pipeline on config.yaml
# make test:    install + the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SNAKEMAKE_ARGS ?=

.PHONY: test-slurm test-faults install run test dry-run clean

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

# The Slurm tests: they install Debian's slurm packages if missing and start a one-node cluster (root).
test-slurm: install
	$(VENV)/bin/python -m pytest -m slurm $(PYTEST_ARGS)

# Fault injection (tests/faults): kills, corrupt shards, bad config, a full filesystem (root: tmpfs).
test-faults: install
	$(VENV)/bin/python -m pytest -m faults tests/faults $(PYTEST_ARGS)

clean:
	rm -rf results resources logs benchmarks .snakemake

# Offline wheels for air-gapped GPU nodes (Python 3.12, manylinux x86_64) that already have a CUDA
# torch: the project's own dependencies that such an image usually lacks. DeepSpeed is built here
# as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are JIT-compiled on the node if needed).
# Install there: pip install --no-index --no-deps --target <dir> wheelhouse/*.whl
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_PKGS := diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 pydantic==2.14.3 \
	pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
	py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 peft==0.21.2 importlib-metadata==10.2.0 \
	tensorboard==2.21.0 tensorboard-data-server==0.7.2 absl-py==2.5.1 grpcio==1.85.3 markdown==3.11.3 \
	werkzeug==3.1.9 markupsafe==3.0.4 protobuf==7.36.2
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64

.PHONY: wheelhouse
wheelhouse: install
	mkdir -p $(WHEELHOUSE)
	$(VENV)/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d $(WHEELHOUSE) $(WHEELHOUSE_PKGS)
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELHOUSE) deepspeed==0.19.8
	ls -la $(WHEELHOUSE)
