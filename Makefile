# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   -> venv, install, train the digits model (~4 min on 2 CPU cores), sample a PNG grid
#   make test   -> venv, install with test extras, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/digits

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,reference]"

demo: install
	$(BIN)/python -m diffjax train --config configs/digits_ddpm.py --workdir $(WORKDIR)
	$(BIN)/python -m diffjax sample --workdir $(WORKDIR) --sampler ddim --steps 50 --guidance 2.0 \
	    --num 100 --out $(WORKDIR)/samples_ddim50_w2.npz
	@echo "sample grid (one column per class 0..9): $(WORKDIR)/samples_ddim50_w2.png"

test: install-test
	$(BIN)/python -m pytest tests -n 2 --dist loadscope --durations=25

clean:
	rm -rf $(VENV) runs
