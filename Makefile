# Two commands do all set-up on a fresh machine:
#   make demo   the bundled demo end to end (venv, pinned install, default model, curate run)
#   make test   the test suite (same set-up)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test model install clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the local CPU wheel; an unpinned torch pulls GBs of CUDA
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(VENV)/bin/curate fetch-model

demo: model
	$(VENV)/bin/curate demo

test: model
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .curate
