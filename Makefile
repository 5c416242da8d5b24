# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   create .venv, install fedcvr, synthesise the default marketplace, validate and summarise it,
#               then run a 5-round federation of its 5 merchants on this machine (fedcvr simulate)
#   make test   create .venv, install fedcvr with its test tools, run the test suite offline (the fast lane, under
#               5 minutes on 2 cores; `make test-slow` runs the integration lane, CI runs both)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= data/demo

.PHONY: install demo test test-slow test-deployment bench lint clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedcvr needs Python 3.11 or newer: run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same command as the packages that depend on it (a bare `torch` pulls a CUDA build)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedcvr data synth --out $(DEMO_DIR) --seed 0 --overwrite
	$(BIN)/fedcvr data validate $(DEMO_DIR)
	# DP-SGD at epsilon 8 (the app's default); add --no-dp to compare without privacy
	HF_HUB_OFFLINE=1 $(BIN)/fedcvr simulate --data $(DEMO_DIR) --rounds 5 --out runs/demo

PYTEST := HF_HUB_OFFLINE=1 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m pytest -q --durations=15

# everything but the integration lane
test: install
	$(PYTEST) -m "not slow and not deployment"

# the integration lane (tests marked slow): whole federations, `flwr run`, real data where present, the built wheel
test-slow: install
	$(PYTEST) -m "slow and not deployment"

# a SuperLink and three merchant nodes on 127.0.0.1 with TLS, node authentication, DP-SGD and SecAgg+ (6-8 min)
test-deployment: install
	$(PYTEST) -m deployment tests/test_deployment.py

# speed, memory and communication against their references (about an hour and a half on 2 cores); figures in BENCHMARKS.md
bench: install
	HF_HUB_OFFLINE=1 FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m fedcvr.simulations.benchmarks --out runs/bench

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
