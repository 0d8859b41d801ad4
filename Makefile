# Two commands do everything on a fresh machine with Python 3.11:
#   make serve   venv + install + demo index + API and web page on http://127.0.0.1:8000/
#   make test    venv + install + the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INDEX ?= data/demo-index
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test test-slow demo-index bench bench-load bench-index lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The tests need the optional Ray extra too (tests/ray); `make serve` does not.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,ray]'
	touch $@

demo-index: $(VENV)/.installed
	$(BIN)/lookalike demo --index $(INDEX) --no-serve

serve: $(VENV)/.installed
	$(BIN)/lookalike demo --index $(INDEX) --host $(HOST) --port $(PORT)

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: $(VENV)/.installed-ray
	$(BIN)/python scripts/ensure_browser.py
	$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	  exit $$status

test-slow: $(VENV)/.installed-ray
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/embed.py

bench-load: $(VENV)/.installed
	$(BIN)/python benchmarks/load.py

# The 1M run takes many minutes on 2 cores; a quick one: make bench-index INDEX_SIZES=100000
INDEX_SIZES ?= demo,100000,1000000
bench-index: $(VENV)/.installed
	$(BIN)/python benchmarks/index.py --sizes $(INDEX_SIZES)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data .pytest_cache test-artifacts
