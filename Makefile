# The README's two commands: `make demo` (main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erllama-installed
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard erllama/*.pyx erllama/handles/*.pxi erllama/includes/*.pxd erllama/includes/*.h)

.PHONY: demo test install bench clean distclean

demo: $(STAMP)
	$(VENV)/bin/erllama demo

# the lint and type gate first (pyproject.toml: [tool.ruff], [tool.mypy]), then the suite
test: $(STAMP)
	$(PY) -m ruff check erllama supervision tests bench setup.py
	$(PY) -m mypy
	$(PY) -m pytest -q tests

install: $(STAMP)

bench: $(STAMP)
	$(PY) bench/native_speed.py

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.0,<4" cmake ninja numpy

# Editable install: Python changes apply at once; native sources rebuild the extension
# (llama.cpp itself comes from the build cache, see setup.py).
$(STAMP): $(PY) $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,demo,server,ray]'
	touch $@

clean:
	rm -rf build erllama/_native.cpp erllama/_native*.so

distclean: clean
	rm -rf $(VENV) deps/llama.cpp
