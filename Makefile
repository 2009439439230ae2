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

.PHONY: help setup book chapter record html html-golden test test-lib test-lib-variant test-pairing \
	test-nbval test-nbval-variant test-core-install test-browser clean

help:
	@echo "make book                    set up, execute every chapter (papermill, PROFILE=$(PROFILE)), render _build/html"
	@echo "make chapter CH=03 [PROFILE=full]  execute one chapter (output under _build/exec/PROFILE)"
	@echo "make record [CH=03]          re-record golden outputs (ci profile, CPU) into book/*.ipynb"
	@echo "make test                    set up and run every test (library, pairing, nbval natively and under"
	@echo "                             $(NBVAL_VARIANT), clean-venv install, pins, browser)"
	@echo "make test-nbval[-variant] [CH=01]   nbval strict on the golden notebooks (natively / under the variant)"

# --- environment: a local venv with the book's exact pins ----------------------------------------
# requirements/book.txt is the one file with the book's exact versions (the package, pyproject.toml,
# declares ranges); the venv is rebuilt when either file changes. The golden outputs are recorded on
# CPython $(BOOK_PYTHON), so the book's venv requires it (the package itself supports 3.10-3.13).
BOOK_PYTHON := 3.11
PINS      := requirements/book.txt
TORCH_PIN  = $(shell sed -n 's/^torch==//p' $(PINS))

$(STAMP): pyproject.toml $(PINS)
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; assert v == "$(BOOK_PYTHON)", f"the book is pinned for Python $(BOOK_PYTHON), got {v} (set PYTHON=python$(BOOK_PYTHON))"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned exactly: an unpinned resolve would pull the CUDA wheels
	$(PY) -m pip install --quiet "torch==$(TORCH_PIN)"
	$(PY) -m pip install --quiet -r $(PINS) -e ".[plot,book,test]"
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

# `make test` proves the golden outputs are not tied to this CPU: nbval runs once natively and once
# more under NBVAL_VARIANT, which changes the last digits of floating-point results the way another
# CPU does: torch's vector kernels forced to plain C++ (ATEN_CPU_CAPABILITY=default; float32 draws,
# reductions) and MKL's exp/log/BLAS to its SSE2 code path (MKL_CBWR=COMPATIBLE; float64). Measured on
# the issue's failure (full-precision glue, chapters 01 02 03 10 11 12 13): ATEN default alone breaks
# 13 cells in 6 of the 7 chapters, avx2 6 cells, numpy without AVX2/AVX512 4 cells, MKL alone 23 cells
# in all 7; this pair catches all of them. The two passes run side by side (a chapter runs on one
# thread); so do the library tests, natively and under the variant.
NBVAL_VARIANT ?= ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
NBVAL_ARGS = --nbval $(if $(CH),$(foreach c,$(CH),$(wildcard book/$(c)_*.ipynb)),book/) -p no:cacheprovider \
	--nbval-current-env --nbval-sanitize-with $(SANITIZE) --nbval-cell-timeout=900 -q

# Library tests that need only the package (torch, numpy, scipy) plus pytest and hypothesis:
# `test-core-install` runs them in a clean venv with `pip install .` and no extras.
CORE_TESTS := tests/test_sinkhorn.py tests/test_birkhoff.py tests/test_spectral.py tests/test_noise.py \
	tests/test_models.py tests/test_fixed_point.py tests/test_anneal.py tests/test_tasks.py \
	tests/test_nn.py tests/test_nn_hyper.py
CORE_VENV  ?= _build/core-venv

test: $(STAMP)
	$(MAKE) --no-print-directory test-pairing
	$(MAKE) --no-print-directory -j2 --output-sync=target test-lib test-lib-variant
	$(MAKE) --no-print-directory -j2 --output-sync=target test-nbval test-nbval-variant
	$(MAKE) --no-print-directory -j2 --output-sync=target test-core-install html-golden
	$(MAKE) --no-print-directory test-browser

test-lib: $(STAMP)
	$(call run_pytest,tests -m "not browser" -q -p no:cacheprovider)

# the library tests once more under the variant instruction set (pipeline and pin tests need not);
# its own hypothesis example database, as it runs beside test-lib
test-lib-variant: $(STAMP)
	export $(NBVAL_VARIANT) HYPOTHESIS_STORAGE_DIRECTORY=_build/hypothesis-variant TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/_build/inductor-variant; $(call run_pytest,tests -m "not browser" -q -p no:cacheprovider \
	  --ignore=tests/test_pipeline.py --ignore=tests/test_environment_pins.py)

test-pairing: $(STAMP)
	$(PY) scripts/book.py check-pairing

test-nbval: $(STAMP)
	export BOOK_PROFILE=ci CUDA_VISIBLE_DEVICES=; $(call run_pytest,$(NBVAL_ARGS))

test-nbval-variant: $(STAMP)
	@echo "[nbval] under $(NBVAL_VARIANT)"
	export BOOK_PROFILE=ci CUDA_VISIBLE_DEVICES= $(NBVAL_VARIANT); $(call run_pytest,$(NBVAL_ARGS))

# `pip install .` alone (no extras, no book) into a clean venv that already has the book's torch (an
# unpinned torch would pull the CUDA wheels): no plotting or book package may come with it, and the
# core library tests must pass against the installed package (not lib/).
test-core-install: $(STAMP)
	rm -rf $(CORE_VENV) build
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet "torch==$(TORCH_PIN)"
	$(CORE_VENV)/bin/python -m pip install --quiet .
	rm -rf build
	env -u PYTHONPATH $(CORE_VENV)/bin/python scripts/book.py check-core-env
	$(CORE_VENV)/bin/python -m pip install --quiet -c $(PINS) pytest hypothesis
	cd tests && env -u PYTHONPATH ../$(CORE_VENV)/bin/python -m pytest $(CORE_TESTS:tests/%=%) \
	  -q -p no:cacheprovider

test-browser: $(STAMP)
	$(call run_pytest,tests -m browser -q -rs)

clean:
	rm -rf _build
