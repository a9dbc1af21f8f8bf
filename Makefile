# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned first: an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-faults test-slow test-ui lint venv clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/difftune-demo

# Two workers of one torch thread each: most tests wait on imports and small kernels that one thread runs as fast
# as two, so on CI's 2 cores two workers nearly halve the wall time, and one thread each keeps torch's OpenMP threads
# from spinning against each other. The minutes-long demo test is scheduled first (tests/conftest.py).
TEST_WORKERS ?= 2

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The long fault-injection variant: a kill at every phase of every save, at random steps, and real SIGINTs.
test-faults: venv
	$(BIN)/python -m pytest -q -m faults tests/reliability

# End-to-end runs too long for CI's budget: the flow demo against its bar.
test-slow: venv
	$(BIN)/python -m pytest -q -m slow tests

# The web app in a real headless browser: Debian's chromium and chromedriver (apt-get install chromium chromium-driver),
# driven by selenium. Screenshots of each page go to $UI_SCREENSHOTS, else tests/artifacts/ui/.
test-ui: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m ui tests/app

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache
