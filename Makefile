# eossl: two commands do everything on a fresh machine (see README.md).
#   make demo   create .venv, install, run the main job on the embedded sample data
#   make test   create .venv if needed, install, run the whole test suite

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-output
STAMP  := $(VENV)/.installed

.PHONY: all install demo test lint bench clean

all: test

# Reinstall when the dependency list changes. One pip command resolves everything together: the torch
# pin must be in the same command as accelerate/timm/DALI or pip picks another torch (docs/DESIGN.md).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing eossl into $(VENV) (first time: a few minutes; log: $(VENV)/install.log)"
	@$(PY) -m pip install -e '.[test]' > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@touch $@

install: $(STAMP)

demo: install
	@rm -rf $(DEMO)
	$(PY) -m eossl.launch sample-data $(DEMO)/sen12ms --patches 32 --seed 0
	$(PY) -m eossl.launch ingest $(DEMO)/sen12ms $(DEMO)/dataset --workers 2 --shard-size 16MB --budgets 8,16 --holdout-fraction 0.25
	$(PY) -m eossl.launch verify $(DEMO)/dataset --deep
	@echo
	@echo "demo results:"
	@echo "  synthetic SEN12MS tree : $(DEMO)/sen12ms"
	@echo "  dataset                : $(DEMO)/dataset  (manifest.json, rejects.jsonl, subsets.json, shards/*.tar, data.zarr)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check ingest streaming train eval launch tests

bench: install
	$(PY) -m eossl.launch bench encoding
	$(PY) -m eossl.launch bench ingest --workers 2

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache
