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

# Every CPU test, the ones marked slow included, in three pytest processes at once (scripts/test_all.sh says why and
# how they are grouped); exit 0 only when every group passed.
test: setup
	@bash scripts/test_all.sh $(PY)

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
