# eossl: two commands do everything on a fresh machine (see README.md).
#   make demo   create .venv, install, run the main job on the embedded sample data
#   make test   create .venv if needed, install, run the whole test suite

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-output
# The demo's one MLflow store (train and eval share it), kept inside the demo's folder.
DEMO_MLFLOW = sqlite:///$(abspath $(DEMO))/mlflow.db
STAMP  := $(VENV)/.installed

.PHONY: all install demo study test lint format bench gpu-check clean

all: test

# Reinstall when the dependency list changes. One pip command resolves everything together, within the
# exact tested set of constraints.txt: the torch pin must be in the same command as accelerate/timm/DALI
# or pip picks another torch (docs/DESIGN.md). EXTRAS picks the DALI build: cuda13 or cuda12 (README).
# Then everything is byte-compiled once, on every core (pip's own compile runs on one): where
# PYTHONDONTWRITEBYTECODE is set, as in many CI images and containers, Python never keeps what it compiles
# and every process would compile torch, mlflow and timm from source again (measured: 30 CPU-seconds to
# import them without .pyc files, 9 with). Files that do not compile (Python 2 examples shipped inside
# some packages) are listed in the log and are not an error.
EXTRAS ?= test,cuda13
SITE_PACKAGES = $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing eossl into $(VENV) (first time: a few minutes; log: $(VENV)/install.log)"
	@$(PY) -m pip install --no-compile -e '.[$(EXTRAS)]' -c constraints.txt > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@$(PY) -m compileall -q -j 0 $(SITE_PACKAGES) eossl ingest streaming train eval launch >> $(VENV)/install.log 2>&1 || true
	@touch $@

install: $(STAMP)

# The demo's pre-training is CPU-sized: resnet18 on 96 px views, partial S1/S2 fusion (so one model is
# evaluated on s1, s2 and s1s2), a 512-key queue, 15 epochs of 72 patches.
DEMO_TRAIN = --set backbone=resnet18 --set mode=fusion_partial --set batch_size=16 --set size=96 \
	--set queue_size=512 --set hidden=512 --set epochs=15 --set workers=1 --set moco.momentum=0.99 \
	--set lr_scaling=none \
	--set log_every=5 --set ckpt_every=25

# DINO on S1 only: a tiny ViT, 96 px global and 4 x 48 px local crops, 6 epochs.
DEMO_DINO = --set backbone=vit_tiny_patch16_224 --set batch_size=16 --set size=96 --set local_size=48 \
	--set n_local=4 --set out_dim=1024 --set epochs=6 --set warmup_epochs=1 --set workers=1 --set log_every=5 \
	--set ckpt_every=0

demo: install
	@rm -rf $(DEMO)
	$(PY) -m eossl.launch sample-data $(DEMO)/sen12ms --patches 96 --seed 0
	$(PY) -m eossl.launch ingest $(DEMO)/sen12ms $(DEMO)/dataset --workers 2 --shard-size 32MB --budgets 8,32 --holdout-fraction 0.25
	$(PY) -m eossl.launch verify $(DEMO)/dataset --deep
	MLFLOW_TRACKING_URI=$(DEMO_MLFLOW) $(PY) -m eossl.launch train moco --data $(DEMO)/dataset --out $(DEMO)/runs/moco $(DEMO_TRAIN)
	MLFLOW_TRACKING_URI=$(DEMO_MLFLOW) $(PY) -m eossl.launch eval classify --checkpoint $(DEMO)/runs/moco --dataset $(DEMO)/dataset \
		--budget 32 --seeds 0,1,2 --protocol linear --out $(DEMO)/eval
	MLFLOW_TRACKING_URI=$(DEMO_MLFLOW) $(PY) -m eossl.launch train dino --data $(DEMO)/dataset --out $(DEMO)/runs/dino $(DEMO_DINO)
	MLFLOW_TRACKING_URI=$(DEMO_MLFLOW) $(PY) -m eossl.launch attention --checkpoint $(DEMO)/runs/dino --dataset $(DEMO)/dataset \
		--first 3 --out $(DEMO)/attention
	MLFLOW_TRACKING_URI=$(DEMO_MLFLOW) $(PY) -m eossl.launch eval segment --checkpoint $(DEMO)/runs/dino --dataset $(DEMO)/dataset \
		--inputs s1 --budget 32 --seeds 0 --protocol finetune --epochs 10 --crop 128 --write-maps --out $(DEMO)/segment
	@echo
	@echo "demo results:"
	@echo "  synthetic SEN12MS tree : $(DEMO)/sen12ms"
	@echo "  dataset                : $(DEMO)/dataset  (manifest.json, rejects.jsonl, subsets.json, shards/*.tar, data.zarr)"
	@echo "  MoCo-v2 run            : $(DEMO)/runs/moco  (config.yaml, history.jsonl, checkpoints/, backbone/)"
	@echo "  classification table   : $(DEMO)/eval/results.md (and results.csv, cells/*/confusion.png)"
	@echo "  DINO run (S1, ViT)     : $(DEMO)/runs/dino"
	@echo "  attention figures      : $(DEMO)/attention/*.png (summary.json: mIoU of token clusters and masks vs land cover)"
	@echo "  land-cover maps        : $(DEMO)/segment/results.md, cells/*/predictions.png, cells/*/maps/*.tif (GeoTIFF)"
	@echo "  MLflow (one store)     : mlflow ui --backend-store-uri $(DEMO_MLFLOW)"

# A 2 x 2 scaling study (batch size 8/32 x 2/6 epochs, linear probes) on the demo dataset (~4 min);
# re-running it resumes. Table and plots: $(DEMO)/study/results.md, *.png.
study: install
	@test -f $(DEMO)/dataset/manifest.json || $(MAKE) demo
	MLFLOW_TRACKING_URI= $(PY) -m eossl.launch study --config launch/studies/demo_batch_epochs.yaml

# Two pytest workers (pytest-xdist), one test file at a time each: much of the suite waits on processes
# and servers it starts, so two workers finish it in well under the time of one on a 2-core machine.
# Files are handed out in collection order, longest first (tests/conftest.py LONGEST_FILES), not by
# their number of tests. TEST_WORKERS=0 runs it in one process. The slowest tests are listed at the end.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The formatter keeps every line within the configured 110 characters; the linter catches what it cannot
# (long strings and comments, unused names, import order).
LINT_DIRS = eossl ingest streaming train eval launch tests examples

lint: install
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/ruff check $(LINT_DIRS)

format: install
	$(VENV)/bin/ruff format $(LINT_DIRS)
	$(VENV)/bin/ruff check --fix $(LINT_DIRS)

bench: install
	$(PY) -m eossl.launch bench encoding
	$(PY) -m eossl.launch bench ingest --workers 2

# The GPU machine's check (docs/BENCHMARKS.md): eossl doctor, pytest -m gpu, bench train/loader (when DALI
# is there) -> one JSON file. No install stamp and no pip: it runs this checkout with any Python that has
# torch, e.g. `make gpu-check PY=python3`, through a folder of links that makes the stage folders
# importable as eossl.* (what the package-dir mapping does for an install).
GPU_CHECK ?= gpu-check.json
GPU_PATH  ?= $(CURDIR)/build/gpu-check-path

gpu-check:
	@mkdir -p $(GPU_PATH)/eossl
	@for stage in ingest streaming train eval launch; do ln -sfn $(CURDIR)/$$stage $(GPU_PATH)/eossl/$$stage; done
	PYTHONPATH=$(GPU_PATH)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m eossl.launch.doctor.gpu_check --out $(GPU_CHECK)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache
