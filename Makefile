# podagent: `make demo` to see it run, `make test` for the whole suite. Both use .venv here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON3 ?= python3
SRC     := agent hwsim tests bench

.PHONY: all install debs test lint typecheck pytest test-loaded demo bench install-service man deb \
	test-deb test-install-service clean

all: test

# pip shows what it fetches and installs: a first run takes a minute or two, never silently.
$(VENV)/.installed: pyproject.toml
	@echo "== make install: creating $(VENV) with $(PYTHON3)"
	$(PYTHON3) -m venv $(VENV)
	@echo "== make install: podagent (editable) with its dependencies and test tools, from PyPI"
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	@echo "== make install: done ($(VENV))"
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

# Most of the suite waits (polls, staleness, ramps, outages), so files run in parallel: three
# workers on this 2-core machine, one file per worker at a time (a file's tests share fixtures and,
# for the demo pod, fixed ports). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
pytest: install debs
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

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
	@echo "== make demo: the simulated demo pod and the agent against it (Ctrl-C stops both)"
	$(PY) -m hwsim.demo

bench: install debs
	$(PY) bench/pod_full.py
	$(PY) bench/interlock_latency.py
	$(PY) bench/mqtt_outage.py

# On a Debian 12 host, as root, from this tree (no dev venv needed): the service in /opt/podagent,
# podagent and podctl on PATH, users and groups, units, man pages, completion, docs, a config skeleton.
install-service:
	bash systemd/install.sh

# Man pages generated from the command lines (podagent.1, podctl.1).
man: install
	$(PY) -m agent.manpages build/man

# The Debian package (dh-virtualenv: a venv in /opt/podagent/.venv built with Debian's python3),
# written to dist/. Builds from a copy so nothing lands next to this tree.
deb:
	bash debian/build.sh

# Slow (a debootstrap'd Debian 12 root, a few minutes): the .deb installed with apt into it, then
# check-config and the daemon from it. As root.
test-deb: deb
	bash tests/install/chroot.sh deb "$$(ls -t dist/podagent_*.deb | head -1)"

# README's install route (make install-service) in a clean Debian 12 root. As root.
test-install-service:
	bash tests/install/chroot.sh install-service "$(CURDIR)"

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
