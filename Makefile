# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test test-device system-tools clean

# A virtual environment with edgefleet (host and test extras), rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[host,test]'
	@# pip byte-compiles on one core; on every core it takes half the time (~20 s less on 2 cores).
	@# A file that does not compile here (torch ships one in Python 3.12 syntax) is skipped, as pip skips it.
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/edgefleet demo

# The tests start their own Mosquitto on a free port, check the systemd unit with
# systemd-analyze and load the dashboard in headless Chromium; install what the machine lacks.
system-tools:
	@missing=""; \
	  { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	  command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	  { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } || missing="$$missing chromium"; \
	  [ -z "$$missing" ] || { echo "installing$$missing (apt-get)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }

# Three worker processes (pytest-xdist), on two cores too: much of the suite waits on brokers, agents and
# timeouts, and with two workers a third of the CPU time sat idle. On 2 cores, 2026-12-07: 584-613 s
# against 710-754 s with `-n 2` (docs/benchmarks.md, "The test suite").
test: install system-tools
	$(BIN)/python -m pytest -n 3 --dist worksteal

# The device side alone, as a device installs it (no host extra), on another Python: devices may run
# 3.10 (JetPack 6), the host tools need 3.11. E.g. `make test-device DEVICE_PYTHON=python3.10`.
DEVICE_PYTHON ?= python3.10
DEVICE_VENV   ?= .venv-device
$(DEVICE_VENV)/.installed: pyproject.toml
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[tflite]' \
	  onnx pytest hypothesis pytest-xdist
	touch $@

test-device: $(DEVICE_VENV)/.installed system-tools
	$(DEVICE_VENV)/bin/python -m pytest -n 2 --dist worksteal -p no:cacheprovider tests/device_agent

clean:
	rm -rf $(VENV) $(DEVICE_VENV) .pytest_cache .hypothesis
