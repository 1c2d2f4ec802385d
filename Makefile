# Every target sets itself up on a fresh machine: it creates .venv, installs torch and the
# dependencies, then builds fastadapt in place (pip install --no-build-isolation -e .) so the
# extension is compiled against the very torch it will run with. Second runs are incremental.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.fastadapt-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: all setup build test demo bench bench-smoke gpu-check info clean

all: test

$(DEPS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch numpy ninja pybind11 setuptools wheel \
		pytest pytest-benchmark hypothesis safetensors tqdm scikit-learn matplotlib psutil
	touch $@

# The editable install is made once (FASTADAPT_BUILD_EXT=0: it only links the source tree into the
# venv); the extension is then built in place, with its objects kept in build/ so that ninja
# recompiles only what changed. `pip install --no-build-isolation -e .` alone does both, from scratch.
EDITABLE := $(VENV)/.fastadapt-editable
$(EDITABLE): $(DEPS)
	FASTADAPT_BUILD_EXT=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

$(BUILT): $(EDITABLE) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(BUILT)
build: $(BUILT)

test: $(BUILT)
	$(PY) -m fastadapt info
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests benchmarks --benchmark-disable

demo: $(BUILT)
	$(PY) -m fastadapt demo

# The full suite, twice: the default CPU allocator, then PyTorch's huge-page allocator (read once at
# process start, hence its own process; loss kernels only, without the memory probes), then
# BENCHMARKS.md (between its generated markers) and benchmarks/plots/*.png. About 15 minutes on 2 cores.
# BENCH_BUDGET (seconds of timed rounds per measurement, default 2) trades time for precision.
BENCH_PYTEST := -m pytest -q -p no:cacheprovider --durations=10 --benchmark-only --benchmark-columns=min,median,iqr,rounds
BENCH_THP    := benchmarks/bench_alpha_weighted_cross_entropy.py benchmarks/bench_alpha_weighted_mse.py
bench: $(BUILT)
	$(PY) $(BENCH_PYTEST) benchmarks --benchmark-json=benchmarks/results.json $(PYTEST_ARGS)
	THP_MEM_ALLOC_ENABLE=1 BENCH_PEAK_MEMORY=0 $(PY) $(BENCH_PYTEST) $(BENCH_THP) \
		--benchmark-json=benchmarks/results_thp.json $(PYTEST_ARGS)
	$(PY) scripts/bench_report.py benchmarks/results.json benchmarks/results_thp.json -o BENCHMARKS.md \
		--plots benchmarks/plots --command "make bench  # BENCH_BUDGET=$${BENCH_BUDGET:-2}" \
		--command "python $(BENCH_PYTEST) benchmarks --benchmark-json=benchmarks/results.json $(PYTEST_ARGS)" \
		--command "THP_MEM_ALLOC_ENABLE=1 BENCH_PEAK_MEMORY=0 python $(BENCH_PYTEST) $(BENCH_THP) --benchmark-json=benchmarks/results_thp.json $(PYTEST_ARGS)"

# Every benchmark once, small shapes, no timings (what `make test` runs too).
bench-smoke: $(BUILT)
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable $(PYTEST_ARGS)

info: $(BUILT)
	$(PY) -m fastadapt info

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info fastadapt/_C*.so $(BUILT)
