# Everything runs inside ./.venv. `make setup` is idempotent: it reinstalls only when a
# requirements file changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch: on this project's machines `torch==2.13.0` resolves to a local CPU
# wheel; an unpinned torch would pull a multi-GB CUDA build. Override on GPU nodes.
TORCH_SPEC ?= torch==2.13.0
# The embedded demo model and other downloads are cached here, shared by the demo and the tests.
export ALPACA_CACHE ?= $(CURDIR)/.cache/alpaca

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@# The web-page test drives a real headless Chromium (Debian packages).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: install Debian's chromium and chromium-driver for the web-page test"
	touch $(STAMP)

# The README's test command (CI runs it): the linter and formatter check, then every test.
test: setup lint
	$(PY) -m pytest tests

# The quick tier: every script's quick tests, without the slow, multi-process, browser and
# download tests (markers in pyproject.toml).
test-fast: setup
	$(PY) -m pytest tests -m "not slow and not distributed and not browser and not network"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: setup
	$(PY) demo.py

bench: setup
	@for b in bench/bench_*.py; do m=$$(basename $$b .py); echo "== $$b"; $(PY) -m bench.$$m || exit 1; done

clean:
	rm -rf $(VENV) demo_output
