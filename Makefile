# The book's two commands:  `make book`  and  `make test`  (each sets itself up from nothing).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROFILE ?= ci
CH     ?=
SANITIZE := tests/nbval_sanitize.cfg

.PHONY: help setup book chapter record html html-golden test test-lib test-pairing test-nbval test-browser clean

help:
	@echo "make book                    set up, execute every chapter (papermill, PROFILE=$(PROFILE)), render _build/html"
	@echo "make chapter CH=03 [PROFILE=full]  execute one chapter (output under _build/exec/PROFILE)"
	@echo "make record [CH=03]          re-record golden outputs (ci profile, CPU) into book/*.ipynb"
	@echo "make test                    set up and run every test (library, pairing, nbval, pins, browser)"

# --- environment: a local venv with the pinned dependencies ------------------------------------
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (set PYTHON=python3.11)"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned exactly: an unpinned resolve would pull the CUDA wheels
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bistochastic)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# --- command 1: build the book ------------------------------------------------------------------
book: $(STAMP)
	$(PY) scripts/book.py execute --profile $(PROFILE)
	$(PY) scripts/book.py stage --source executed --profile $(PROFILE)
	$(PY) scripts/book.py html
	@echo "[book] rendered: _build/html/index.html"

chapter: $(STAMP)
	@test -n "$(CH)" || (echo "usage: make chapter CH=03 [PROFILE=full]" && exit 2)
	$(PY) scripts/book.py execute --profile $(PROFILE) --chapters $(CH)

record: $(STAMP)
	$(PY) scripts/book.py record $(if $(CH),--chapters $(CH),)

# render the committed golden notebooks (no execution): what `make test` checks in the browser
html-golden: $(STAMP)
	$(PY) scripts/book.py stage --source golden
	$(PY) scripts/book.py html

# --- command 2: run every test ------------------------------------------------------------------
# pytest exits 5 when it collects nothing: that is a broken suite, reported as such.
define run_pytest
	rc=0; $(PY) -m pytest $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests for: $(1)"; exit 1; fi; exit $$rc
endef

test: $(STAMP)
	$(MAKE) --no-print-directory test-lib
	$(MAKE) --no-print-directory test-pairing
	$(MAKE) --no-print-directory test-nbval
	$(MAKE) --no-print-directory html-golden
	$(MAKE) --no-print-directory test-browser

test-lib: $(STAMP)
	$(call run_pytest,tests -m "not browser" -q)

test-pairing: $(STAMP)
	$(PY) scripts/book.py check-pairing

test-nbval: $(STAMP)
	export BOOK_PROFILE=ci CUDA_VISIBLE_DEVICES=; $(call run_pytest,--nbval book/ -p no:cacheprovider --nbval-current-env --nbval-sanitize-with $(SANITIZE) --nbval-cell-timeout=900 -q)

test-browser: $(STAMP)
	$(call run_pytest,tests -m browser -q -rs)

clean:
	rm -rf _build
