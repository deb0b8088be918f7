# Two entry points, each doing its own set-up on a fresh Debian machine with Python 3.11:
#   make demo  - create .venv, install, run the main job end to end on the synthetic EM sample
#   make test  - create .venv, install test extras + the Debian packages napari needs, run pytest under Xvfb
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3
DEMO_OUT ?= demo_out

.PHONY: demo test install install-test system-deps wheel-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) -e ".[testing]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test system-deps

system-deps:
	@if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

demo: install
	$(BIN)/affmae demo --out $(DEMO_OUT)

test: install-test
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# What a user gets from `pip install "napari-affmae[all]"`: build the wheel, install it with that extra
# into a fresh venv (no source tree on the path) and open napari with every AFFMAE widget under Xvfb.
WHEEL_DIR := build/wheel-check
wheel-check: system-deps
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q --upgrade pip
	$(WHEEL_DIR)/venv/bin/pip wheel -q --no-deps -w $(WHEEL_DIR)/dist .
	$(WHEEL_DIR)/venv/bin/pip install -q -c constraints.txt torch==2.13.0 "$$(ls $(WHEEL_DIR)/dist/*.whl)[all]"
	cd $(WHEEL_DIR) && xvfb-run -a -s "-screen 0 1600x1000x24" venv/bin/python $(CURDIR)/.ci/open_viewer.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build
