# Two entry points: `make run` (set up + main demo + table) and `make test` (set up + tests).
# Needs only python3 (and make); everything else is installed into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: setup run test lint studies report bench bench-compare clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[quant,lora,prune,optim,hf,export,mlflow,dev]'
	# DeepSpeed's build needs torch present, hence a second step without build isolation (~10 s, no op builds)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed
	touch $@

# Prints how long set-up (a no-op once .venv is installed) and the demo took, and the load average they ran under.
run:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup || exit 1; t1=$$(date +%s); \
	$(VENV)/bin/membench run +experiment=demo && $(VENV)/bin/membench report results/demo --experiment demo; \
	rc=$$?; t2=$$(date +%s); \
	echo "make run: set-up $$((t1 - t0)) s, demo $$((t2 - t1)) s (load average $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"; \
	exit $$rc

# Every CPU test, the ones marked slow included (a bare `pytest` deselects those through pyproject's addopts), in
# three processes. The real-Slurm tests run beside the unit tests (they mostly wait on the scheduler; their output
# is printed when both end); then the runs and end-to-end tests. The whole suite in one process once died of a
# segfault inside Hydra's compose (deepcopy) late in the unit tests, which pass in a process of their own (not
# diagnosed: a native library's state left by earlier tests is the suspect); the session's other imports also left
# the slurmd fixture unable to run two cells at once (each alone passes). The Slurm detach test's old hang after
# SIGINT was pytest started as a background job, SIGINT ignored (tests/conftest.py restores it).
test: setup
	@log=$$(mktemp); $(PY) -m pytest -q -m 'slow or not slow' tests/e2e/test_slurm_real.py > $$log 2>&1 & slurm=$$!; \
	trap 'kill $$slurm 2>/dev/null; rm -f $$log' INT TERM; \
	$(PY) -m pytest -q -m 'slow or not slow' tests/unit; unit=$$?; \
	wait $$slurm; s=$$?; echo "--- tests/e2e/test_slurm_real.py (ran beside the unit tests):"; cat $$log; rm -f $$log; \
	[ $$unit -eq 0 ] && [ $$s -eq 0 ]
	$(PY) -m pytest -q -m 'slow or not slow' tests/runs tests/e2e --ignore=tests/e2e/test_slurm_real.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The committed CPU studies (~75 min on 2 CPU cores: the techniques study ~25 of them, the verified plan study ~12),
# the planner's predictions of the techniques study's cells, then the README/docs tables regenerated from the records.
studies: setup
	for e in checkpointing zero_stages quantization pruning llama techniques; do $(VENV)/bin/membench run +experiment=$$e || exit 1; done
	PYTHONPATH=. $(PY) scripts/predict_study.py techniques
	PYTHONPATH=. $(PY) scripts/verify_study.py
	$(PY) -m membench.readme

report: setup
	$(PY) -m membench.readme

# pytest-benchmark suite (benchmarks/, ~2 min on 2 CPU cores): one training-step benchmark per technique family.
# `make bench` saves a run with its raw round times under .benchmarks/; `make bench-compare` saves another and judges
# the two latest with membench compare's time verdict (scripts/bench_compare.py; exit 0 ok, 1 regressed, 3 inconclusive).
BENCH := $(PY) -m pytest benchmarks -q -o addopts=-ra --benchmark-enable --benchmark-columns=median,iqr,min,rounds
BENCH_COMPARE_ARGS ?=  # e.g. --time-noise-floor 0.3 on a shared machine (docs/tracking.md)
bench: setup
	$(BENCH) --benchmark-autosave --benchmark-save-data

bench-compare: setup
	$(BENCH) --benchmark-autosave --benchmark-save-data
	$(PY) scripts/bench_compare.py $(BENCH_COMPARE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
