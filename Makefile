# Bootfleet: `make up` starts the stack, `make test` runs every test. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STATE_DIR ?= var
CONFIG ?= deploy/bootfleet.yaml
PYTEST_ARGS ?=

.PHONY: up down status restart test bench demo venv system-deps clean help install uninstall

help:
	@echo "make up [CONFIG=file.yaml]   start the stack under supervisord (state in $(STATE_DIR)/)"
	@echo "make down                    stop everything make up started"
	@echo "make status                  bootfleet status"
	@echo "make test                    all tests (installs the Debian peers they drive when run as root)"
	@echo "make bench                   benchmarks against reference servers (not part of make test)"
	@echo "make demo                    one virtual PC boots through the stack, console on this terminal"
	@echo "make install / uninstall     (root) a systemd service: /opt/bootfleet, /etc/bootfleet, /var/lib/bootfleet"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then apt-get update -qq && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "bootfleet: python3 -m venv failed; install it with: apt-get install python3-venv" >&2; exit 1; fi; }
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

system-deps:
	@bash deploy/system-deps.sh || echo "bootfleet: continuing without them; the tests that need them will fail" >&2

up: venv
	@bash deploy/stack.sh up "$(STATE_DIR)" "$(CONFIG)"

down:
	@bash deploy/stack.sh down "$(STATE_DIR)"

status: venv
	@$(VENV)/bin/bootfleet --state-dir "$(STATE_DIR)" status

test: venv system-deps
	$(PY) -m pytest -q -rfE $(PYTEST_ARGS)

bench: venv system-deps
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || echo "bench $$b failed"; done

demo: venv system-deps
	$(PY) -m lab.demo

install:
	@bash deploy/install.sh install

uninstall:
	@bash deploy/install.sh uninstall

clean: down
	rm -rf $(VENV) $(STATE_DIR)
