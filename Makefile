# Quick start: `make demo` (install + the whole pipeline on embedded phantoms), `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this project is tested with; everything else comes from setup.cfg, at the
# versions in constraints.txt (those the benchmarks' baseline was recorded with).
TORCH := torch==2.14.1 torchvision==0.29.1
# Extras: test, sweep (Ray Tune), baseline (MONAI + Ray), deepspeed, prepare (medical formats), server (PostgreSQL +
# MLflow basic-auth), gpu (cuML); `dist`
# is the old name for sweep + baseline + deepspeed.
EXTRAS ?= test,dist,prepare,server
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU spinning threads of concurrent
# processes (tests, DataLoader workers, Ray trials) slow each other down by an order of magnitude.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo pneumonia train test lint bench clean

install: $(VENV)/.installed

# --no-cache-dir: where torch's CUDA libraries come from a registry (several GB) a wheel cache would double the disk
# an install needs.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir $(TORCH)
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

# The pipeline finds the finished run (--resume) and evaluates it. Two DDP processes of one thread each: on two
# cores they train nano-32 at 140 images/s against 125 for one two-thread process, with the same gradient per
# step (tests/test_train.py); `make demo DEMO_LAUNCH=launch/accelerate/cpu_1proc.yaml` trains as one process.
DEMO_LAUNCH ?= launch/accelerate/cpu_2proc.yaml

demo: install
	$(VENV)/bin/accelerate launch --config_file $(DEMO_LAUNCH) harness/train_dae.py --config jobs/phantoms_demo.yaml --resume
	$(PY) -m harness.pipeline --config jobs/phantoms_demo.yaml

# Real chest X-rays (needs ../shared/data/pneumoniamnist.npz, or set data.raw_path in the job): the same two steps.
pneumonia: install
	$(VENV)/bin/accelerate launch --config_file $(DEMO_LAUNCH) harness/train_dae.py --config jobs/pneumoniamnist.yaml --resume
	$(PY) -m harness.pipeline --config jobs/pneumoniamnist.yaml

train: install
	$(VENV)/bin/accelerate launch --config_file launch/accelerate/cpu_1proc.yaml harness/train_dae.py

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check harness tests jobs benchmarks

bench: install
	$(PY) benchmarks/run.py --suite all --small --check benchmarks/baselines/cpu-small.json

results: ; python3 benchmarks/results.py  # benchmarks/RESULTS.md from benchmarks/baselines/ and benchmarks/readings.md

clean:
	rm -rf runs .pytest_cache
