# Everything a fresh machine with Python 3.11 needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first so that pip takes these builds (served from local disk on the
# project's machines) instead of resolving a newer one; the package itself asks only torch>=2.3.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo figures test test-nbs test-py check-export readme clean slurm-up

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/sit-workbench demo

# the README's figures (tracked): the demo's samples, loss and summary, and the widgets' screenshot (needs chromium)
figures: install
	$(BIN)/sit-workbench demo --figures figures
	SIT_WORKBENCH_FIGURES=figures $(BIN)/python -m pytest -q tests/test_widgets_browser.py

# the package and README.md must be what the notebooks generate
check-export: install
	$(BIN)/nbdev_export
	$(MAKE) readme
	@if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$$(git status --porcelain -- sit_workbench README.md)" ]; then \
		git status --porcelain -- sit_workbench README.md; \
		echo "the notebooks and sit_workbench/ or README.md disagree: run nbdev_export and make readme, then commit"; exit 1; fi

# Two notebooks run side by side on one thread each; OpenMP threads sleep instead of spinning while they wait
# (spinning threads slow a shared 2-core machine down many times over).
test-nbs: install
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/nbdev_test --n_workers 2

# pytest: test files shared between two workers (pytest-xdist), a file per worker at a time, one thread each, the
# longest files first (tests/conftest.py orders them)
test-py: install
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12 tests/

test: check-export test-nbs test-py

# a one-node SLURM cluster on this machine for tests/test_slurm.py (root, Debian; returns at once when one is up)
slurm-up:
	bash tests/slurm/start.sh

readme: install
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN

clean:
	rm -rf $(VENV) _proc _docs
