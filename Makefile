# Two set-up commands (see README):  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install demo test bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first, so the project's torch>=2.4 range is already met (no CUDA download)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m client.demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m bench.run

proto: install
	$(PY) -m proto.generate

clean:
	rm -rf $(VENV) .demo-work
