# make install: .venv with the pinned dependencies and the project, byte-compiled, DeepSpeed's CPU ops compiled (idempotent)
# make run:     install + run the pipeline on config.yaml
# make test:    install + the test suite (two workers; TEST_WORKERS=1 for one)
# make test-e2e: the default run through Snakemake as the README shows it, Snakemake killed mid-run, SD 1.5 layouts
# make test-flux: FLUX.1 (builtin:tiny-flux) through every stage on 2 ranks, resumed, and end to end
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SNAKEMAKE_ARGS ?=
# Two pytest workers (pytest-xdist) for make test: most of a test's time is one process starting
# (imports), so two use both cores; worksteal rebalances the tests' very uneven durations. Shared
# runs are built once by whichever worker asks first (conftest.shared_once). The e2e and FLUX suites
# too (below); the fault suite's kills are timed against one process: one worker.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist worksteal
# The suites run more processes than cores (two workers, each starting 2-rank stages; .ci/run puts
# the Slurm and fault suites beside the e2e runs), and torch's OpenMP threads spin while they wait for
# work, holding a core another process needs. Passive waiting only changes how idle threads wait
# (results are the same). Measured with two busy loops beside one sampling test: 116 + 33 s spinning,
# 60 + 21 s passive; alone, 38 + 11 s vs 38 + 14 s. `make run` is left as it is.
test test-e2e test-slurm test-faults test-flux test-geometry test-wheelhouse: export OMP_WAIT_POLICY = PASSIVE

.PHONY: bytecode test-geometry test-slurm test-faults test-flux test-e2e test-wheelhouse install run test dry-run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-compile -e '.[test]'
	$(VENV)/bin/pip install --quiet --no-compile --no-deps $$($(VENV)/bin/python -m workflow.wheelhouse --data-only)
	$(VENV)/bin/python -m workflow.snakemake_hook --install
	$(VENV)/bin/python -m workflow.build_ops
	$(MAKE) --no-print-directory bytecode
	touch $(STAMP)

# Every installed module byte-compiled once, on all cores (pip's own pass, skipped above, is serial):
# where PYTHONDONTWRITEBYTECODE is set, as on CI machines, Python never saves what it compiles, and every
# process compiled torch, diffusers and transformers from source again (`import diffusers` 9.1 s of CPU,
# 3.8 s from .pyc; a stage starting 4.0 s, 2.0 s). torch ships one file of Python 3.12 syntax, which
# compileall reports and 3.11 never imports: its status is not the install's.
bytecode:
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib/python*/site-packages workflow > $(VENV)/compileall.log 2>&1 || true

run: install
	$(VENV)/bin/snakemake --cores all $(SNAKEMAKE_ARGS)

dry-run: install
	$(VENV)/bin/snakemake -n $(SNAKEMAKE_ARGS)

test: install
	$(PYTEST) $(PYTEST_ARGS)

# End to end: the default run through Snakemake as the README shows it (digit accuracy), Snakemake
# killed mid-run, and SD 1.5 repo layouts through every stage.
# Two workers: one run at a time left a core idle (the lane ran at 1.03 cores on average in .ci/run:
# stages start, import, write and wait on Snakemake's scheduling as much as they train).
test-e2e: install
	$(VENV)/bin/python -m pytest -m e2e -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The Slurm tests: they install Debian's slurm packages if missing and start a one-node cluster (root).
test-slurm: install
	$(VENV)/bin/python -m pytest -m slurm $(PYTEST_ARGS)

# Another geometry: ZeRO-0/1/3 and LoRA checkpoints of 2 ranks resumed on 1 and back on 2 (ZeRO-2 is in
# make test), ranks that never arrive (tests/test_reshape.py, tests/test_multinode.py).
test-geometry: install
	$(VENV)/bin/python -m pytest -m geometry tests/test_reshape.py tests/test_multinode.py $(PYTEST_ARGS)

# Fault injection (tests/faults): kills, corrupt shards, bad config, a full filesystem (root: tmpfs).
test-faults: install
	$(VENV)/bin/python -m pytest -m faults tests/faults $(PYTEST_ARGS)

# FLUX.1 on the CPU (builtin:tiny-flux): 2-rank full ZeRO-3 and LoRA ZeRO-2 runs merged and loaded by
# diffusers, a killed run resumed bitwise, and the digits end to end (square and bucketed).
test-flux: install
	$(VENV)/bin/python -m pytest -m flux -n $(TEST_WORKERS) --dist worksteal tests/test_flux.py $(PYTEST_ARGS)

# The wheelhouse on a bare venv (torch + numpy only): every stage runs from it. Downloads from PyPI.
test-wheelhouse: install
	$(VENV)/bin/python -m pytest -m wheelhouse tests/test_wheelhouse.py $(PYTEST_ARGS)

clean:
	rm -rf results resources logs benchmarks .snakemake

# Offline wheels for air-gapped GPU nodes (Python $(WHEEL_PYTHON), manylinux x86_64) that already have
# a CUDA torch (and numpy): every other package the workflow needs there, snakemake and its Slurm
# plugin included, at the versions `make install` resolved (the list: python -m workflow.wheelhouse).
# DeepSpeed is built here as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are JIT-compiled on the
# node if needed); packages with no wheel on PyPI (connection-pool) are built here too.
# Install there: python3 -m pip install --no-index --no-deps --target <dir> wheelhouse/*.whl
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64 --platform manylinux_2_5_x86_64

.PHONY: wheelhouse
wheelhouse: install
	mkdir -p $(WHEELHOUSE)
	$(VENV)/bin/python -m workflow.wheelhouse > $(WHEELHOUSE)/requirements.txt
	grep -v -e '^deepspeed==' -e '^connection-pool==' $(WHEELHOUSE)/requirements.txt > $(WHEELHOUSE)/binary.txt
	$(VENV)/bin/pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		--implementation cp $(WHEEL_PLATFORMS) -d $(WHEELHOUSE) -r $(WHEELHOUSE)/binary.txt
	grep -e '^connection-pool==' $(WHEELHOUSE)/requirements.txt > $(WHEELHOUSE)/source.txt
	$(VENV)/bin/pip wheel --quiet --no-deps -w $(WHEELHOUSE) -r $(WHEELHOUSE)/source.txt
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELHOUSE) \
		"$$(grep '^deepspeed==' $(WHEELHOUSE)/requirements.txt)"
	rm $(WHEELHOUSE)/binary.txt $(WHEELHOUSE)/source.txt
	ls $(WHEELHOUSE)/*.whl | wc -l
