# Two commands for a fresh Debian / Raspberry Pi OS machine: `make demo`, `make test`.
# Each installs what is missing first: a venv from the requirements files and
# Debian's mosquitto (with sudo when not root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: setup mosquitto demo test clean

setup: $(VENV)/.installed mosquitto

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { $(SUDO) apt-get update -qq && $(APT_INSTALL) mosquitto; }

demo: setup
	$(PY) iot_standin.py demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
