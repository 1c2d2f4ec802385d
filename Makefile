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

.PHONY: all setup build test demo demo-lm bench bench-smoke gpu-check info clean sanitize

all: test

$(DEPS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch numpy ninja pybind11 "setuptools>=77" wheel \
		pytest pytest-benchmark hypothesis expecttest safetensors tqdm scikit-learn matplotlib psutil \
		tokenizers transformers accelerate
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
	FASTADAPT_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests benchmarks --benchmark-disable

demo: $(BUILT)
	$(PY) -m fastadapt demo

# A small language model pretrained on English prose, adapted to Python source (both shipped with
# Python): naive fine-tuning vs alpha=0.5 with replay. About 2 minutes on 2 cores; DEMO_LM_ARGS="--seeds 0,1,2"
# reproduces docs/demo-lm.md's table.
demo-lm: $(BUILT)
	$(PY) -m fastadapt demo-lm $(DEMO_LM_ARGS)

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

# ---- sanitize: the CPU extension built with AddressSanitizer + UBSan, and the kernel tests run under it.
# The tree is copied to build/sanitize/src (only files whose content changed, so the second build is
# incremental and never misses an edit; files gone from the tree are removed from the copy) and
# built there, so the normal in-place fastadapt/_C*.so is never touched. torch and python are not
# instrumented: the ASan runtime is preloaded, leak checking is off (the interpreter leaks at exit),
# and FASTADAPT_CPU_CACHE_MB=0 turns off the gradient-block cache so every buffer is a fresh
# allocation (the cache would hide a use-after-free, as the CUDA caching allocator does). Any report
# fails the target: ASan and UBSan abort the process (-fno-sanitize-recover), and the log is also
# grepped for reports. pytest captures only sys.stdout/err (--capture=sys): with fd capture, the report
# of a process that aborts mid-test would be lost.
SAN_DIR   := build/sanitize
# SAN_DEPS= (empty) uses an existing environment as is: make sanitize PY=/path/to/python SAN_DEPS=
SAN_DEPS  ?= $(DEPS)
SAN_SRC   := $(SAN_DIR)/src
SAN_TESTS ?= tests/test_alpha_weighted_cross_entropy.py tests/test_alpha_weighted_mse.py tests/test_linear_relu.py \
             tests/test_alpha_weighted_distillation.py \
             tests/test_properties.py tests/test_determinism.py tests/test_error_table.py tests/test_extension.py
SAN_PYTEST_ARGS ?= -m "not slow and not cuda"
# the cache's own test runs on its own, with the cache on (the main run turns it off)
SAN_CACHE_TEST := tests/test_extension.py::test_cpu_gradient_cache_reuses_and_releases
SAN_LIBS   = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
SAN_ENV    = LD_PRELOAD="$(SAN_LIBS)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:verify_asan_link_order=0:halt_on_error=1:abort_on_error=0:exitcode=86:detect_stack_use_after_return=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=87 \
	FASTADAPT_CUDA=0 PYTHONPATH=$(abspath $(SAN_SRC)) PYTHONDONTWRITEBYTECODE=1

sanitize: SHELL := /bin/bash
sanitize: $(SAN_DEPS)
	@for lib in $(SAN_LIBS); do test -f $$lib || { echo "sanitize: $$lib missing (install gcc's libasan/libubsan)"; exit 1; }; done
	mkdir -p $(SAN_SRC)
	# files deleted or moved in the source tree go from the copy too (the copy keeps mtimes of unchanged files)
	cd $(SAN_SRC) && find csrc fastadapt tests docs -type f ! -name '_C*.so' ! -path '*__pycache__*' 2>/dev/null \
		| while IFS= read -r f; do test -f "$(CURDIR)/$$f" || rm -f "$$f"; done
	git ls-files -z --cached --others --exclude-standard -- csrc fastadapt tests docs setup.py pyproject.toml README.md LICENSE \
		| while IFS= read -r -d '' f; do test -f "$$f" || continue; cmp -s "$$f" "$(SAN_SRC)/$$f" \
		|| { mkdir -p "$(SAN_SRC)/$$(dirname "$$f")" && cp "$$f" "$(SAN_SRC)/$$f"; }; done
	cd $(SAN_SRC) && FASTADAPT_SANITIZE=1 FASTADAPT_CUDA=0 $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SAN_SRC) && $(SAN_ENV) $(abspath $(PY)) -c "import fastadapt, fastadapt.ops._extension as e; \
		assert e._C is not None, e._load_error; f = e._C.__file__; assert '/$(SAN_SRC)/' in f, f; print('sanitized:', f)"
	ldd $(SAN_SRC)/fastadapt/_C*.so | grep -q libasan
	cd $(SAN_SRC) && set -o pipefail; $(SAN_ENV) FASTADAPT_CPU_CACHE_MB=0 $(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys \
		$(SAN_PYTEST_ARGS) --deselect $(SAN_CACHE_TEST) $(wildcard $(SAN_TESTS)) 2>&1 | tee ../sanitize.log
	cd $(SAN_SRC) && set -o pipefail; $(SAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys $(SAN_CACHE_TEST) \
		2>&1 | tee -a ../sanitize.log
	! grep -nE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: UndefinedBehaviorSanitizer" $(SAN_DIR)/sanitize.log
	@echo "sanitize: no AddressSanitizer/UBSan reports"

clean:
	rm -rf build *.egg-info fastadapt/_C*.so $(BUILT)
