# podagent: `make demo` to see it run, `make test` for the whole suite. Both use .venv here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON3 ?= python3
SRC     := agent hwsim tests bench

.PHONY: all install debs test lint typecheck pytest test-loaded demo bench install-service clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian tools the simulators, tests and demo use (net-snmp, mbpoll, socat, mosquitto, tmux).
debs:
	@bash .ci/debs.sh

lint: install
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

typecheck: install
	$(VENV)/bin/mypy

pytest: install debs
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck pytest

# The whole suite on a busy machine (CI runs on a shared 2-core box): two CPU burners run for as
# long as pytest does and are killed however it ends.
test-loaded: install debs
	@set -e; \
	$(PY) -c 'while 1: pass' & b1=$$!; \
	$(PY) -c 'while 1: pass' & b2=$$!; \
	trap 'kill $$b1 $$b2 2>/dev/null || true' EXIT INT TERM; \
	echo "test-loaded: CPU burners $$b1 $$b2"; \
	$(MAKE) --no-print-directory pytest PYTEST_ARGS='$(PYTEST_ARGS)'

demo: install debs
	$(PY) -m hwsim.demo

bench: install debs
	$(PY) bench/pod_full.py
	$(PY) bench/interlock_latency.py
	$(PY) bench/mqtt_outage.py

# Puts the unit, a config skeleton and the podagent user in place (run as root).
install-service: install
	bash systemd/install.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
