# Two commands do everything, from a clean clone:
#   make run    install, then run the main job on the offline default and print results
#   make test   install, then run the tests (tiny models + the real offline models end to end)
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/lens-iclgd
# glibc malloc thresholds: fewer page faults in large CPU forwards (see docs/performance.md)
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824

.PHONY: run test install clean
run: install
	$(CLI) run --n-test 200 --k 32 --out runs/default

# Two workers: the tests run torch on one thread each, so two of them fill a 2-core machine
# (TEST_WORKERS=0 runs them in this process). Files that load a real model stay in one worker.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

install: $(VENV)/.installed

# torch first, pinned: it is the CPU build pip finds on disk here; anything looser can
# pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) runs
