# Two commands for a fresh machine: `make demo` (run the main job on the embedded local stack)
# and `make test`. Each sets up what it needs; running either twice reuses the install.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/data/fashion
LIMIT   ?= 1000
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo up test lint clean peers

setup: $(STAMP) /usr/bin/redis-server /usr/bin/chromium

# uv resolves and installs the ~3 GB of torch wheels in seconds from its cache on a re-run
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[dev]'
	touch $(STAMP)

/usr/bin/redis-server:
	command -v redis-server >/dev/null || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server)

# the storefront's browser test drives it through Playwright (no `playwright install` offline)
/usr/bin/chromium:
	test -x /usr/bin/chromium || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

demo: setup
	$(VENV)/bin/vitrine demo --data $(DATA) --limit $(LIMIT)

up: setup
	VITRINE_IMAGE_FILE_ROOT=$(abspath $(DATA)) $(VENV)/bin/vitrine up

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# the engines benchmarks/peers.py compares against, in a venv of their own (never in Vitrine's)
PEERS   := .venv-peers
peers: $(PEERS)/.installed
$(PEERS)/.installed: benchmarks/peers-requirements.txt
	test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --disable-pip-version-check uv
	$(PEERS)/bin/uv pip install --python $(PEERS)/bin/python -r benchmarks/peers-requirements.txt
	touch $@

clean:
	rm -rf $(VENV) $(PEERS) .pytest_cache .mypy_cache
